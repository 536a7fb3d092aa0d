"""Bad rows under both policies: ``error`` names dataset, row and reason; ``skip`` counts, logs and carries on.
Hostile input (a 100k x 100k PNG header, paths leaving the dataset directory) is refused without allocating or
reading outside."""

from __future__ import annotations

import logging
import os
import struct
import tracemalloc
import zlib

import pytest

from gemma4vl.data import BadRowError, ImageLoader
from test_data_support import config, data_uri, images, png_bytes, processor_dir, write_jsonl

__all__ = ["processor_dir"]


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims width x height (8-bit RGB) and holds one tiny IDAT: a decompression bomb's header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def good(i: int) -> dict:
    return {"messages": [{"role": "user", "content": [{"type": "image", "image": "ok.png"},
                                                      {"type": "text", "text": f"Question {i}?"}]},
                         {"role": "assistant", "content": f"Answer {i}."}]}


def user_assistant(user, assistant="Fine.", **extra) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}], **extra}


BAD_ROWS = {
    "missing_image": user_assistant([{"type": "image", "image": "nope.png"}, {"type": "text", "text": "?"}]),
    "corrupt_image": user_assistant([{"type": "image", "image": "data:image/png;base64,bm90IGFuIGltYWdl"},
                                     {"type": "text", "text": "?"}]),
    "empty_conversation": {"messages": []},
    "no_assistant_turn": {"messages": [{"role": "user", "content": "Anyone?"}]},
    "unknown_role": {"messages": [{"role": "narrator", "content": "Once"}, {"role": "assistant", "content": "x"}]},
    "more_placeholders": user_assistant("<image> and <image>: same?", images=["ok.png"]),
    "fewer_placeholders": user_assistant("<image> what is this?", images=["ok.png", "ok.png"]),
    "image_too_large": user_assistant([{"type": "image", "image": "bomb.png"}, {"type": "text", "text": "?"}]),
    "image_path_escapes_root": user_assistant([{"type": "image", "image": "../outside.png"},
                                               {"type": "text", "text": "?"}]),
}
REASON = {"more_placeholders": "image_count_mismatch", "fewer_placeholders": "image_count_mismatch"}


def write_case(tmp_path, bad_row: dict):
    d = tmp_path / "data"
    d.mkdir()
    images()[1].save(d / "ok.png")
    (d / "bomb.png").write_bytes(png_header(100_000, 100_000))
    images()[0].save(tmp_path / "outside.png")
    return write_jsonl(d / "rows.jsonl", [good(0), good(1), bad_row, good(3)])


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_bad_row_error_policy(case, processor_dir, tmp_path):
    path = write_case(tmp_path, BAD_ROWS[case])
    with pytest.raises(BadRowError) as info:
        config(processor_dir, path, bad_rows="error").build_split("train")
    reason = REASON.get(case, case)
    assert info.value.reason == reason and info.value.row == 2
    assert str(info.value).startswith(f"dataset {path} [train], row 2: {reason}: ")


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_bad_row_skip_policy(case, processor_dir, tmp_path, caplog):
    path = write_case(tmp_path, BAD_ROWS[case])
    with caplog.at_level(logging.WARNING, logger="gemma4vl.data"):
        ds = config(processor_dir, path, bad_rows="skip", max_skipped_fraction=0.5).build_split("train")
    reason = REASON.get(case, case)
    assert ds.plan.skipped() == {reason: 1}
    assert sorted(r for i in range(len(ds)) for r in ds.rows_of(i)) == [0, 1, 3]
    assert [ds[i]["num_samples"] for i in range(len(ds))] == [1, 1, 1]
    logged = [r.getMessage() for r in caplog.records if "skipping bad row" in r.getMessage()]
    assert len(logged) == 1 and f"row 2: {reason}" in logged[0]
    assert "[train]: 3 of 4 rows used" in ds.plan.summary(str(path) + " [train]")


def truncated_png_case(tmp_path):
    data = png_bytes(images()[1])
    d = tmp_path / "data"
    d.mkdir()
    images()[1].save(d / "ok.png")
    (d / "cut.png").write_bytes(data[: len(data) // 2])  # header intact, pixel data cut
    return write_jsonl(d / "rows.jsonl", [good(0), user_assistant([{"type": "image", "image": "cut.png"},
                                                                   {"type": "text", "text": "?"}]), good(2)])


def test_image_failing_only_at_decode_time(processor_dir, tmp_path, caplog):
    """The header passes the length pass; decoding fails in __getitem__: error raises with the row, skip drops
    the sample from its packed row; verify_images moves the failure into the length pass."""
    path = truncated_png_case(tmp_path)
    ds = config(processor_dir, path, bad_rows="error", packing=True).build_split("train")
    assert ds.plan.skipped() == {} and len(ds) == 1
    with pytest.raises(BadRowError, match=r"row 1: corrupt_image: image data does not decode"):
        ds[0]
    ds = config(processor_dir, path, bad_rows="skip", packing=True, max_skipped_fraction=0.5).build_split("train")
    item = ds[0]
    assert item["num_samples"] == 2 and dict(ds.skipped.counts) == {"corrupt_image": 1}
    assert item["segment_ids"].unique().tolist() == [1, 2]
    # reported with the item (the trainer logs and counts it over all ranks: gemma4vl/training/bad_rows.py)
    assert [(row, reason) for row, reason, _ in item["bad_rows"]] == [(1, "corrupt_image")]
    assert "row 1: corrupt_image: image data does not decode" in item["bad_rows"][0][2]
    assert item["row_stats"] == (3, 0)
    ds = config(processor_dir, path, bad_rows="skip", verify_images=True, max_skipped_fraction=0.5,
                cache_dir=str(tmp_path / "verified")).build_split("train")
    assert ds.plan.skipped() == {"corrupt_image": 1}


def test_too_many_bad_rows_is_an_error(processor_dir, tmp_path):
    path = write_case(tmp_path, BAD_ROWS["missing_image"])
    with pytest.raises(ValueError, match=r"skipped 1 of 4 rows \(missing_image 1\): more than "
                                         r"max_skipped_fraction=0.1"):
        config(processor_dir, path, bad_rows="skip").build_split("train")


def test_decompression_bomb_header_is_refused_without_allocating(tmp_path):
    loader = ImageLoader(tmp_path, max_pixels=40_000_000, max_bytes=1 << 20)
    # 100k x 100k: PIL's own bomb check fires first; 8000 x 8000 (64 MP): ours (max_image_pixels).
    for (w, h), message in (((100_000, 100_000), "decompression-bomb check"), ((8000, 8000), r"8000x8000 = ")):
        bomb = png_header(w, h)
        (tmp_path / "bomb.png").write_bytes(bomb)
        for value in ("bomb.png", bomb, {"bytes": bomb, "path": None}):
            tracemalloc.start()
            with pytest.raises(BadRowError, match=f"image_too_large: .*{message}"):
                loader.rgb(value)
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            assert peak < 256 * 1024, f"refusing {type(value).__name__} allocated {peak} bytes"
    big = tmp_path / "big.bin"
    big.write_bytes(b"\0" * (1 << 20 + 1))
    with pytest.raises(BadRowError, match=r"image_too_large: image file 'big.bin' has 2097152 bytes"):
        loader.size("big.bin")


def test_paths_leaving_the_root_are_refused_unread(tmp_path, monkeypatch):
    from PIL import Image

    root = tmp_path / "root"
    root.mkdir()
    outside = tmp_path / "secret.png"
    images()[0].save(outside)
    os.symlink(outside, root / "link.png")
    opened = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda fp, *a, **k: opened.append(fp) or real_open(fp, *a, **k))
    loader = ImageLoader(root, max_pixels=10**7, max_bytes=10**7)
    for value in ("../secret.png", str(outside), "link.png", "sub/../../secret.png", {"bytes": None,
                                                                                      "path": "../secret.png"}):
        with pytest.raises(BadRowError, match="image_path_escapes_root: .* outside the image root"):
            loader.rgb(value)
    for value in ("http://example.com/a.png", "s3://bucket/a.png"):
        with pytest.raises(BadRowError, match="unsupported_image: .* URL"):
            loader.rgb(value)
    assert opened == []
    images()[1].save(root / "fine.png")
    assert loader.rgb("fine.png").shape == (64, 64, 3) and opened == [str(root / "fine.png")]
    assert loader.rgb(data_uri(images()[1])).shape == (64, 64, 3)
