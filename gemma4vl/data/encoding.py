"""Conversation -> token ids, loss targets and images, with the processor's own chat template.

How the text is built (so the loss mask is right by construction, not by searching for markers):

1. The chat template renders the conversation one message at a time; the text each message adds is its segment.
   The template must be prefix-stable (rendering ``messages[:k+1]`` extends ``messages[:k]``); it is checked.
2. An assistant segment is ``header + body + "\\n"``: ``header`` is the template's generation prompt without the thought
   channel (``<|turn>model\\n``), ``body`` the rendered answer up to and including ``<turn|>``. Only ``body`` is a
   target. Before it goes, per ``thought_prefix``, the empty thought channel ``<|channel>thought\\n<channel|>`` that
   Gemma 4 (26B-A4B / 31B) emits first when thinking is off, as prompt: ``"every_turn"`` (default; NeMo AutoModel's
   choice), ``"last_turn"`` (only the final assistant turn, i.e. exactly the inference prompt for it) or ``"none"``
   (the template's own history rendering, which starts the answer where the model expects ``<|channel>``: ~9 nats
   of initial loss instead of ~3). With ``enable_thinking`` the system turn gets ``<|think|>``, no empty channel
   is added, and an assistant ``reasoning_content`` becomes a target ``<|channel>thought\\n...\\n<channel|>``.
3. The text is tokenized once (offsets map characters to tokens); each ``<|image|>`` becomes
   ``<|image>`` + N x ``<|image|>`` + ``<image|>`` (N from the image size and budget), exactly the processor's
   expansion. Tests check the ids against ``Gemma4Processor.__call__``.

Targets are per token (the token itself is to be predicted); :mod:`gemma4vl.data.collate` shifts them into labels.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from gemma4vl.data.errors import BadRowError
from gemma4vl.data.formats import Conversation
from gemma4vl.data.images import ImageLoader, ImageSettings, ProcessedImage, process_pixels

THOUGHT_PREFIXES = ("every_turn", "last_turn", "none")
TRAIN_ON = ("all_assistant_turns", "last_assistant_turn")
OVERLONG = ("drop", "truncate_turns", "truncate_tokens", "error")
CHANNEL_OPEN, CHANNEL_CLOSE = "<|channel>thought\n", "<channel|>"


@dataclasses.dataclass
class Encoded:
    """One conversation, tokenized."""

    input_ids: np.ndarray  # [L] int32, images expanded
    target: np.ndarray  # [L] bool, True on tokens the model is trained to produce
    images: list[ProcessedImage]  # decoded images (empty in the length pass)
    num_images: int
    truncation: int  # -1: none; else messages kept ("truncate_turns") or tokens kept ("truncate_tokens")

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


class ConversationEncoder:
    """Encodes :class:`Conversation` objects with a loaded ``Gemma4Processor`` (see the module docstring)."""

    def __init__(self, processor, settings: ImageSettings, *, enable_thinking: bool = False,
                 thought_prefix: str = "every_turn", train_on: str = "all_assistant_turns"):
        from transformers.utils.chat_template_utils import _compile_jinja_template

        if thought_prefix not in THOUGHT_PREFIXES:
            raise ValueError(f"thought_prefix must be one of {THOUGHT_PREFIXES}, got {thought_prefix!r}")
        if train_on not in TRAIN_ON:
            raise ValueError(f"train_on must be one of {TRAIN_ON}, got {train_on!r}")
        template = processor.chat_template
        if not isinstance(template, str) or not template:
            raise ValueError("the processor has no chat template (expected Gemma 4's chat_template.jinja)")
        self.tokenizer = processor.tokenizer
        self.backend = self.tokenizer.backend_tokenizer
        self.settings = settings
        self.enable_thinking = enable_thinking
        self.thought_prefix = thought_prefix
        self.train_on = train_on
        self._template = _compile_jinja_template(template)
        self._template_vars = dict(self.tokenizer.special_tokens_map)
        for name in ("image_token_id", "image_token", "boi_token", "eoi_token"):
            if getattr(processor, name, None) is None:
                raise ValueError(f"the processor has no {name}: not a Gemma4Processor")
        tok = self.tokenizer
        self.image_token_id = int(processor.image_token_id)
        self.image_token = processor.image_token
        self.boi_id = int(tok.convert_tokens_to_ids(processor.boi_token))
        self.eoi_id = int(tok.convert_tokens_to_ids(processor.eoi_token))
        if tok.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token")
        self.pad_id = int(tok.pad_token_id)
        self.header, self.empty_channel = self._probe_generation_prompt()
        self.end_of_turn = self._probe_end_of_turn()

    # ------------------------------------------------------------------------------------------------ template
    def render(self, messages: Sequence[dict], add_generation_prompt: bool = False,
               enable_thinking: bool | None = None) -> str:
        thinking = self.enable_thinking if enable_thinking is None else enable_thinking
        return self._template.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                     enable_thinking=thinking, tools=None, documents=None, **self._template_vars)

    def _probe_generation_prompt(self) -> tuple[str, str]:
        """(header, empty thought channel) of the template's generation prompt."""
        probe = [{"role": "user", "content": "x"}]
        on = self.render(probe, True, True)[len(self.render(probe, False, True)):]
        off = self.render(probe, True, False)[len(self.render(probe, False, False)):]
        if not off.startswith(on) or not on:
            raise ValueError(f"unexpected chat template: generation prompts {on!r} (thinking) / {off!r} (not)")
        channel = off[len(on):]
        if channel not in ("", CHANNEL_OPEN + CHANNEL_CLOSE):
            raise ValueError(f"unexpected thought prefix {channel!r} in the generation prompt")
        return on, channel

    def _probe_end_of_turn(self) -> str:
        """The marker that closes an answer (``<turn|>``), from how the template renders one."""
        user = [{"role": "user", "content": "x"}]
        delta = self.render(user + [{"role": "assistant", "content": "y"}])[len(self.render(user)):]
        if not delta.startswith(self.header + "y"):
            raise ValueError(f"unexpected chat template: an answer renders as {delta!r}")
        marker = delta[len(self.header) + 1:].rstrip()
        if not marker:
            raise ValueError(f"unexpected chat template: answers have no end-of-turn marker ({delta!r})")
        return marker

    def segments(self, messages: Sequence[dict]) -> tuple[list[tuple[str, bool]], list[int]]:
        """Text pieces (text, is_target) and, per message, the index of the piece that ends it (messages between
        two assistant turns share one piece: the template is only rendered around assistant turns)."""
        assistant_idx = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        last = assistant_idx[-1] if assistant_idx else -1
        bounds = sorted({i for i in assistant_idx if i > 0} | {i + 1 for i in assistant_idx} | {len(messages)})
        pieces: list[tuple[str, bool]] = []
        ends: list[int] = []
        prev, prev_k = "", 0
        for k in bounds:
            try:
                cur = self.render(messages[:k])
            except Exception as e:  # noqa: BLE001 - jinja raises many kinds
                raise BadRowError("template_error", f"chat template failed on messages[:{k}]: "
                                                    f"{type(e).__name__}: {e}")
            if not cur.startswith(prev):
                raise BadRowError("template_error", f"the chat template is not prefix-stable at message {k - 1}")
            delta, prev = cur[len(prev):], cur
            if k - 1 == prev_k and messages[prev_k]["role"] == "assistant" and prev_k > 0:
                trained = self.train_on == "all_assistant_turns" or prev_k == last
                pieces.extend(self._assistant_pieces(delta, messages[prev_k], trained, prev_k == last))
            else:
                pieces.append((delta, False))
            ends.extend([len(pieces) - 1] * (k - prev_k))
            prev_k = k
        return pieces, ends

    def _assistant_pieces(self, delta: str, message: dict, trained: bool, is_last: bool) -> list[tuple[str, bool]]:
        head = self.header if delta.startswith(self.header) else ""  # "" continues the previous model turn
        body = delta[len(head):]
        cut = body.rfind(self.end_of_turn)
        if cut < 0:
            raise BadRowError("template_error", f"assistant turn does not end with {self.end_of_turn!r}")
        cut += len(self.end_of_turn)
        out = [(head, False)]
        reasoning = message.get("reasoning_content")
        if self.enable_thinking and reasoning:
            out.append((f"{CHANNEL_OPEN}{reasoning}\n{CHANNEL_CLOSE}", trained))
        elif head and self.empty_channel and not self.enable_thinking and (
            self.thought_prefix == "every_turn" or (self.thought_prefix == "last_turn" and is_last)
        ):
            out.append((self.empty_channel, False))
        out += [(body[:cut], trained), (body[cut:], False)]
        return out

    # ------------------------------------------------------------------------------------------------ tokens
    def _tokenize(self, pieces: list[tuple[str, bool]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """ids, per-token target flags, and each piece's end in tokens."""
        text = "".join(p for p, _ in pieces)
        char_target = np.zeros(len(text) + 1, dtype=np.int32)
        piece_ends, pos = [], 0
        for piece, is_target in pieces:
            if is_target:
                char_target[pos + 1: pos + len(piece) + 1] = 1
            pos += len(piece)
            piece_ends.append(pos)
        enc = self.backend.encode(text, add_special_tokens=False)
        ids = np.asarray(enc.ids, dtype=np.int32)
        offsets = np.asarray(enc.offsets, dtype=np.int64).reshape(-1, 2)
        csum = np.cumsum(char_target)
        target = (csum[offsets[:, 1]] - csum[offsets[:, 0]]) > 0
        return ids, target, np.searchsorted(offsets[:, 1], np.asarray(piece_ends), side="right")

    def _expand_images(self, ids: np.ndarray, target: np.ndarray, counts: list[int]) -> tuple[np.ndarray, ...]:
        slots = np.flatnonzero(ids == self.image_token_id)
        if len(slots) != len(counts):
            raise BadRowError("image_count_mismatch", f"{len(counts)} image(s) but the text has {len(slots)} "
                              f"{self.image_token} tokens (is the literal {self.image_token} in a message?)")
        if not counts:
            return ids, target, np.arange(len(ids) + 1)
        id_parts, tgt_parts, prev = [], [], 0
        for slot, n in zip(slots, counts):
            id_parts += [ids[prev:slot], np.array([self.boi_id] + [self.image_token_id] * n + [self.eoi_id],
                                                  dtype=np.int32)]
            tgt_parts += [target[prev:slot], np.zeros(n + 2, dtype=bool)]
            prev = slot + 1
        id_parts.append(ids[prev:])
        tgt_parts.append(target[prev:])
        # new position of every old token boundary (to map message ends)
        grow = np.zeros(len(ids) + 1, dtype=np.int64)
        grow[slots + 1] = np.asarray(counts) + 1
        return np.concatenate(id_parts), np.concatenate(tgt_parts), np.arange(len(ids) + 1) + np.cumsum(grow)

    def encode(self, conv: Conversation, *, sizes: Sequence[tuple[int, int]] | None = None,
               loader: ImageLoader | None = None, max_length: int | None = None, overlong: str = "drop",
               truncation: int = -1) -> Encoded:
        """Encode ``conv``. Images: ``sizes`` ((w, h) per image: the length pass, nothing decoded) or ``loader``
        (decoded and patchified). ``max_length`` applies the ``overlong`` policy; ``truncation`` replays the
        length pass's decision (``Encoded.truncation``) instead."""
        if overlong not in OVERLONG:
            raise ValueError(f"overlong must be one of {OVERLONG}, got {overlong!r}")
        processed = None
        if loader is not None:
            processed = [process_pixels(loader.rgb(v), self.settings) for v in conv.images]
            counts = [p.num_soft_tokens for p in processed]
        elif sizes is not None:
            if len(sizes) != len(conv.images):
                raise ValueError(f"{len(sizes)} image sizes for {len(conv.images)} images")
            counts = [self.settings.num_soft_tokens(w, h) for w, h in sizes]
        else:
            raise ValueError("encode needs image sizes or an image loader")
        enc = self._encode_counts(conv.messages, counts, max_length, overlong, truncation)
        if processed is not None:
            enc.images = processed[: enc.num_images]
        return enc

    def _encode_counts(self, messages: Sequence[dict], counts: list[int], max_length: int | None, overlong: str,
                       truncation: int) -> Encoded:
        if truncation >= 0 and overlong == "truncate_turns":
            messages = messages[:truncation]
        pieces, msg_ends = self.segments(messages)
        ids, target, piece_tok_ends = self._tokenize(pieces)
        n_images = self._count_images(messages)
        ids, target, remap = self._expand_images(ids, target, counts[:n_images])
        msg_tok_ends = remap[piece_tok_ends[msg_ends]]
        enc = Encoded(ids, target, [], n_images, truncation if truncation >= 0 else -1)
        if overlong == "truncate_tokens" and truncation >= 0:
            enc = self._cut(enc, truncation)
        elif max_length is not None and len(enc) > max_length:
            enc = self._shorten(messages, counts, enc, msg_tok_ends, max_length, overlong)
        if not enc.target.any():
            raise BadRowError("no_assistant_turn", "no assistant token is left to train on")
        return enc

    @staticmethod
    def _count_images(messages: Sequence[dict]) -> int:
        return sum(1 for m in messages if isinstance(m["content"], list) for p in m["content"] if p["type"] == "image")

    def _cut(self, enc: Encoded, length: int) -> Encoded:
        ids = enc.input_ids[:length]
        return Encoded(ids, enc.target[:length], [], int(np.count_nonzero(ids == self.eoi_id)), length)

    def _shorten(self, messages, counts, enc, msg_tok_ends, max_length, overlong) -> Encoded:
        if overlong == "drop":
            raise BadRowError("too_long", f"{len(enc)} tokens > seq_length {max_length}")
        if overlong == "error":
            raise BadRowError("too_long", f"{len(enc)} tokens > data.seq_length={max_length} (data.overlong=error; "
                                          "drop / truncate_turns / truncate_tokens shorten or skip such rows)",
                              fatal=True)
        if overlong == "truncate_tokens":
            cut = max_length
            opened = np.flatnonzero(enc.input_ids[:cut] == self.boi_id)
            closed = np.flatnonzero(enc.input_ids[:cut] == self.eoi_id)
            if len(opened) > len(closed):  # the cut falls inside an image: cut before its <|image>
                cut = int(opened[-1])
            out = self._cut(enc, cut)
            if not out.target.any():
                raise BadRowError("too_long", f"{len(enc)} tokens > seq_length {max_length}, and cutting at {cut} "
                                              "(never inside an image) leaves no assistant token")
            return out
        # truncate_turns: the longest prefix of whole messages that ends with an assistant turn and fits.
        slack = 16  # a shorter conversation may gain the thought prefix on its new last turn
        for keep in range(len(messages) - 1, 0, -1):
            if messages[keep - 1]["role"] != "assistant" or msg_tok_ends[keep - 1] > max_length + slack:
                continue
            try:
                out = self._encode_counts(messages[:keep], counts, None, overlong, -1)
            except BadRowError:
                continue
            if len(out) <= max_length:
                out.truncation = keep
                return out
        raise BadRowError("too_long", f"{len(enc)} tokens > seq_length {max_length}, and no shorter prefix of "
                                      "whole turns ending with an assistant turn fits")

    def encode_prompt(self, conv: Conversation, loader: ImageLoader) -> tuple[np.ndarray, list[ProcessedImage], str]:
        """For evaluation: (prompt ids ending in the generation prompt, its images, the reference answer) where the
        prompt is every message before the last assistant message."""
        last = max(i for i, m in enumerate(conv.messages) if m["role"] == "assistant")
        messages = conv.messages[:last]
        answer = conv.messages[last]["content"]
        if not isinstance(answer, str):
            answer = "".join(p.get("text", "") for p in answer if p["type"] == "text")
        n_images = self._count_images(messages)
        images = [process_pixels(loader.rgb(v), self.settings) for v in conv.images[:n_images]]
        text = self.render(messages, add_generation_prompt=True)
        ids = np.asarray(self.backend.encode(text, add_special_tokens=False).ids, dtype=np.int32)
        ids, _, _ = self._expand_images(ids, np.zeros(len(ids), dtype=bool), [im.num_soft_tokens for im in images])
        return ids, images, answer
