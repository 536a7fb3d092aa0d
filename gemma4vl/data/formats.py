"""Conversation formats: one dataset row -> a :class:`Conversation` (messages for the chat template + the images,
in placeholder order).

Formats (``format`` in the config):

- ``messages`` (HF / OpenAI chat): column ``messages`` holds ``[{"role", "content"}]``; ``content`` is a string or a
  list of parts ``{"type": "text", "text"}`` / ``{"type": "image", "image" | "path" | "url": ...}`` /
  ``{"type": "image_url", "image_url": {"url"}}``. An image part without a payload takes the next image of the
  ``images`` column. Roles: system / developer / user / assistant / model.
- ``llava`` (LLaVA-Instruct): column ``conversations`` holds ``[{"from", "value"}]`` with ``<image>`` placeholders in
  the text; images in column ``image`` (a path or a list). Roles: human / gpt / system.
- ``sharegpt`` (ShareGPT, LLaMA-Factory style): column ``conversations`` holds ``[{"from", "value"}]`` (or
  ``{"role", "content"}``) with ``<image>`` placeholders; images in column ``images``; an optional ``system``
  column. Roles: human / user / gpt / assistant / system.

A content without images becomes one string (its text parts joined), so a conversation renders the same
whether a file stored it as strings or as part lists. In every format a string content may hold
``image_placeholder`` markers that take images from the images column in order; the number of placeholders must
equal the number of images. An image value is a path (relative to the image root), raw bytes, a ``datasets.Image``
struct ``{"bytes", "path"}``, a PIL image or a ``data:`` URI; it is only decoded later (:mod:`gemma4vl.data.images`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from gemma4vl.data.errors import BadRowError

FORMATS = ("messages", "llava", "sharegpt")
CANONICAL_ROLES = ("system", "user", "assistant")


@dataclasses.dataclass(frozen=True)
class FormatSpec:
    """Where a format keeps its data (the config's column fields override these defaults)."""

    messages_column: str
    images_column: str | None
    system_column: str | None
    role_map: Mapping[str, str]


DEFAULT_SPECS: dict[str, FormatSpec] = {
    "messages": FormatSpec(
        "messages", "images", None,
        {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "model": "assistant"},
    ),
    "llava": FormatSpec("conversations", "image", None, {"system": "system", "human": "user", "gpt": "assistant"}),
    "sharegpt": FormatSpec(
        "conversations", "images", "system",
        {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"},
    ),
}


@dataclasses.dataclass
class Conversation:
    """A normalised conversation: what the chat template renders, and the images its image parts stand for."""

    messages: list[dict]
    """``{"role": "system" | "user" | "assistant", "content": str | list of {"type": "text", "text"} /
    {"type": "image"}}``; assistant messages may carry ``reasoning_content``."""
    images: list[Any]
    """Undecoded image values, one per image part, in order of appearance."""

    @property
    def num_images(self) -> int:
        return len(self.images)


def resolve_spec(
    fmt: str,
    messages_column: str | None = None,
    images_column: str | None = None,
    system_column: str | None = None,
    role_map: Mapping[str, str] | None = None,
) -> FormatSpec:
    """The format's defaults with the configured overrides applied (validated)."""
    if fmt not in DEFAULT_SPECS:
        raise ValueError(f"unknown dataset format {fmt!r}; choose one of {', '.join(FORMATS)}")
    base = DEFAULT_SPECS[fmt]
    roles = dict(role_map) if role_map is not None else dict(base.role_map)
    bad = {k: v for k, v in roles.items() if v not in CANONICAL_ROLES}
    if bad:
        raise ValueError(f"role_map values must be one of {CANONICAL_ROLES}; got {bad}")
    return FormatSpec(
        messages_column or base.messages_column,
        images_column if images_column is not None else base.images_column,
        system_column if system_column is not None else base.system_column,
        roles,
    )


def _is_empty(value: Any) -> bool:
    return value is None or (isinstance(value, (list, tuple)) and len(value) == 0) or value == ""


def _image_list(value: Any) -> list[Any]:
    if _is_empty(value):
        return []
    if isinstance(value, (list, tuple)):
        return [v for v in value]
    return [value]  # a single path / bytes / struct


def _inline_image(part: Mapping[str, Any]) -> Any:
    """The payload of an image part, or None when it takes the next image of the images column."""
    for key in ("image", "path", "url"):
        if part.get(key) is not None:
            return part[key]
    if isinstance(part.get("image_url"), Mapping) and part["image_url"].get("url") is not None:
        return part["image_url"]["url"]
    return None


class _Images:
    """Hands out the images column's images in order, to parts and placeholders that have none of their own."""

    def __init__(self, images: list[Any], column: str | None):
        self.images, self.column, self.next = images, column, 0
        self.wanted = 0

    def take(self) -> Any:
        self.wanted += 1
        if self.next >= len(self.images):
            return None
        self.next += 1
        return self.images[self.next - 1]

    def check_all_used(self, inline: int) -> None:
        if self.wanted != len(self.images):
            raise BadRowError(
                "image_count_mismatch",
                f"{self.wanted} image placeholder(s) without an inline image but {len(self.images)} image(s) in "
                f"column {self.column!r}" + (f" ({inline} inline image(s) besides)" if inline else ""),
            )


def _split_placeholders(text: str, placeholder: str, pool: _Images, out: list[dict], images: list[Any]) -> None:
    pieces = text.split(placeholder) if placeholder else [text]
    for i, piece in enumerate(pieces):
        if i:
            out.append({"type": "image"})
            images.append(pool.take())
        if piece:
            out.append({"type": "text", "text": piece})


def _content(content: Any, where: str, placeholder: str, pool: _Images, images: list[Any]) -> tuple[Any, int]:
    """Normalised content and the number of inline images it carried."""
    if content is None:
        return "", 0
    if isinstance(content, str):
        if placeholder and placeholder in content:
            parts: list[dict] = []
            _split_placeholders(content, placeholder, pool, parts, images)
            return parts, 0
        return content, 0
    if not isinstance(content, (list, tuple)):
        raise BadRowError("malformed_row", f"{where}.content must be a string or a list of parts, "
                                           f"got {type(content).__name__}")
    parts, inline = [], 0
    for j, part in enumerate(content):
        if not isinstance(part, Mapping) or not isinstance(part.get("type"), str):
            raise BadRowError("malformed_row",
                              f"{where}.content[{j}] must be a mapping with a 'type', got {part!r:.80}")
        kind = part["type"]
        if kind == "text":
            text = part.get("text")
            if text is None:
                text = ""
            if not isinstance(text, str):
                raise BadRowError("malformed_row", f"{where}.content[{j}].text must be a string")
            _split_placeholders(text, placeholder, pool, parts, images)
        elif kind in ("image", "image_url"):
            payload = _inline_image(part)
            parts.append({"type": "image"})
            if payload is None:
                images.append(pool.take())
            else:
                images.append(payload)
                inline += 1
        else:
            raise BadRowError("malformed_row", f"{where}.content[{j}] has unsupported type {kind!r} "
                                               "(expected 'text', 'image' or 'image_url')")
    if not any(p["type"] == "image" for p in parts):  # text only: one string, however it was stored
        return "".join(p["text"] for p in parts), inline
    return parts, inline


def parse_row(row: Mapping[str, Any], fmt: str, spec: FormatSpec, *, image_placeholder: str = "<image>",
              system_prompt: str | None = None) -> Conversation:
    """One dataset row -> :class:`Conversation`; raises :class:`BadRowError` for a row that cannot be used."""
    column = spec.messages_column
    if column not in row:
        raise BadRowError("malformed_row", f"no column {column!r} (columns: {sorted(row)}); set messages_column")
    raw = row[column]
    if raw is None or (isinstance(raw, (list, tuple)) and len(raw) == 0):
        raise BadRowError("empty_conversation", f"column {column!r} holds no messages")
    if not isinstance(raw, (list, tuple)):
        raise BadRowError("malformed_row", f"column {column!r} must be a list of messages, got {type(raw).__name__}")
    if spec.images_column is not None and spec.images_column in row:
        pool = _Images(_image_list(row[spec.images_column]), spec.images_column)
    else:
        pool = _Images([], spec.images_column)

    messages: list[dict] = []
    images: list[Any] = []
    inline = 0
    if spec.system_column is not None and not _is_empty(row.get(spec.system_column)):
        system = row[spec.system_column]
        if not isinstance(system, str):
            raise BadRowError("malformed_row", f"column {spec.system_column!r} must be a string")
        messages.append({"role": "system", "content": system})
    for i, message in enumerate(raw):
        where = f"{column}[{i}]"
        if not isinstance(message, Mapping):
            raise BadRowError("malformed_row", f"{where} must be a mapping, got {type(message).__name__}")
        role_key, content_key = ("from", "value") if message.get("from") is not None else ("role", "content")
        source_role = message.get(role_key)
        if not isinstance(source_role, str):
            raise BadRowError("malformed_row", f"{where} has no '{role_key}' string")
        role = spec.role_map.get(source_role)
        if role is None:
            raise BadRowError("unknown_role", f"{where} has role {source_role!r}; known roles: "
                                              f"{sorted(spec.role_map)} (extend role_map to map it)")
        content, n_inline = _content(message.get(content_key), where, image_placeholder, pool, images)
        inline += n_inline
        out = {"role": role, "content": content}
        reasoning = message.get("reasoning_content") or message.get("reasoning")
        if role == "assistant" and reasoning:
            out["reasoning_content"] = reasoning
        if role == "system" and messages:
            raise BadRowError("malformed_row", f"{where}: a system message must come first")
        messages.append(out)
    pool.check_all_used(inline)
    if any(img is None for img in images):
        raise BadRowError("image_count_mismatch", f"{sum(img is None for img in images)} image placeholder(s) "
                                                  f"have no image (column {spec.images_column!r})")
    if system_prompt is not None and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})

    body = [m for m in messages if m["role"] != "system"]
    if not body or all(isinstance(m["content"], str) and not m["content"].strip() for m in body):
        raise BadRowError("empty_conversation", "the conversation has no user or assistant content")
    if not any(m["role"] == "assistant" for m in body):
        raise BadRowError("no_assistant_turn", "no assistant message: nothing to train on")
    if body[0]["role"] == "assistant":
        raise BadRowError("first_turn_is_assistant", "the first non-system message is from the assistant")
    return Conversation(messages, images)
