"""Shared helpers of the data pipeline tests (no tests here): the processor fixture, a reference conversation in
every format, dataset writers for every source kind."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import pytest

from gemma4vl.data import Batch, Gemma4VLDataConfig
from gemma4vl.testing.fixtures import make_image
from gemma4vl.testing.pytest_fixtures import tiny_checkpoint

SYSTEM = "You answer briefly."
Q1, A1, Q2, A2 = "What colour dominates?", "Mostly green.", "And here?", "Blue."
IMAGE_A = ((40, 32), 1)  # (width, height), seed: non-square, resized by nothing at the 70 budget
IMAGE_B = ((64, 64), 2)


@pytest.fixture(scope="session")
def processor_dir(tmp_path_factory) -> Path:
    """The tiny checkpoint (Gemma4Processor: patch 4, pooling 2, 70 soft tokens) shared by the session."""
    return tiny_checkpoint(tmp_path_factory).path


def images():
    return [make_image(seed, size) for size, seed in (IMAGE_A, IMAGE_B)]


def png_bytes(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def data_uri(image) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode()


def reference_messages(imgs=None) -> list[dict]:
    """The conversation every table case stores: system, two turns, one image per user turn."""
    a, b = imgs if imgs is not None else images()
    return [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": [{"type": "image", "image": a}, {"type": "text", "text": Q1}]},
        {"role": "assistant", "content": A1},
        {"role": "user", "content": [{"type": "image", "image": b}, {"type": "text", "text": Q2}]},
        {"role": "assistant", "content": A2},
    ]


def messages_row(a, b, *, inline: bool = True, string_contents: bool = False) -> dict:
    def image_part(value):
        return {"type": "image", "image": value} if inline else {"type": "image"}

    def text(value):
        return value if string_contents else [{"type": "text", "text": value}]

    row = {"messages": [
        {"role": "system", "content": text(SYSTEM)},
        {"role": "user", "content": [image_part(a), {"type": "text", "text": Q1}]},
        {"role": "assistant", "content": text(A1)},
        {"role": "user", "content": [image_part(b), {"type": "text", "text": Q2}]},
        {"role": "assistant", "content": text(A2)},
    ]}
    if not inline:
        row["images"] = [a, b]
    return row


def llava_row(a, b) -> dict:
    return {"conversations": [
        {"from": "system", "value": SYSTEM},
        {"from": "human", "value": f"<image>\n{Q1}"},
        {"from": "gpt", "value": A1},
        {"from": "human", "value": f"<image>\n{Q2}"},
        {"from": "gpt", "value": A2},
    ], "image": [a, b]}


def sharegpt_row(a, b) -> dict:
    return {"conversations": [
        {"from": "human", "value": f"<image>{Q1}"},
        {"from": "gpt", "value": A1},
        {"from": "human", "value": f"<image>{Q2}"},
        {"from": "gpt", "value": A2},
    ], "system": SYSTEM, "images": [a, b]}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


def write_image_files(directory: Path, imgs, names=("imgs/a.png", "imgs/b.png")) -> list[str]:
    for image, name in zip(imgs, names):
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        image.save(directory / name, format="PNG")
    return list(names)


def config(processor_dir, path, **overrides) -> Gemma4VLDataConfig:
    """A test config: no packing, no shuffling, exact-length batches, plans cached next to the data."""
    kwargs = dict(processor_path=str(processor_dir), path=str(path), packing=False, shuffle=False, seq_length=1024,
                  pad_to_seq_length=False, pad_to_multiple_of=1)
    kwargs.update(overrides)
    return Gemma4VLDataConfig(**kwargs)


def first_batch(cfg: Gemma4VLDataConfig, which: str = "train", index: int = 0) -> Batch:
    ds = cfg.build_split(which)
    return ds.collate_fn([ds[index]])
