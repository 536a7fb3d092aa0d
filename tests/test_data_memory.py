"""Memory stays flat while iterating a large generated dataset: rows are read from memory-mapped Arrow one at a time
and the packing plan is a few int arrays, so RSS does not grow with the number of rows (measured: RSS growth from
the first item to the end, and the plan's bytes)."""

from __future__ import annotations

import json
import os

import psutil
import pytest

from gemma4vl.testing.fixtures import make_image
from test_data_support import config, processor_dir

__all__ = ["processor_dir"]
MB = 1 << 20


def write_generated(directory, num_rows: int, num_images: int = 16):
    """``num_rows`` one-image conversations of varied length over ``num_images`` shared image files."""
    (directory / "imgs").mkdir(parents=True)
    for k in range(num_images):
        make_image(k, (48 + 4 * (k % 5), 64)).save(directory / "imgs" / f"{k}.png")
    words = "the quick brown fox jumps over a lazy dog near river banks".split()
    with open(directory / "train.jsonl", "w") as f:
        for i in range(num_rows):
            filler = " ".join(words[(i + j) % len(words)] for j in range(i % 40))
            row = {"messages": [
                {"role": "user", "content": [{"type": "image", "image": f"imgs/{i % num_images}.png"},
                                             {"type": "text", "text": f"Question {i}: {filler}?"}]},
                {"role": "assistant", "content": f"Answer {i} {filler[: i % 23]}."}]}
            f.write(json.dumps(row) + "\n")
    return directory


def rss_parts() -> dict:
    """Anonymous (heap) and file-backed (e.g. memory-mapped Arrow) resident MB of this process (Linux)."""
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("RssAnon:", "RssFile:")):
                key, value = line.split(":")
                fields[key] = int(value.split()[0]) / 1024
    return fields


def iterate_and_measure(ds, every: int = 100) -> dict:
    """Iterate every item (and collate it); RSS in MB at the first item and its maximum afterwards."""
    process = psutil.Process()
    ds.collate_fn([ds[0]])  # warm-up: lazy imports, first allocations
    parts0 = rss_parts()
    start = process.memory_info().rss
    peak = start
    rows = 0
    for i in range(len(ds)):
        batch = ds.collate_fn([ds[i]])
        rows += int(batch.segment_ids.max())
        if i % every == 0:
            peak = max(peak, process.memory_info().rss)
    end = process.memory_info().rss
    peak = max(peak, end)
    parts1 = rss_parts()
    return {"start_mb": start / MB, "growth_mb": (peak - start) / MB, "end_growth_mb": (end - start) / MB,
            **{f"{k}_growth_mb": parts1.get(k, 0) - parts0.get(k, 0) for k in ("RssAnon", "RssFile")},
            "rows": rows, "items": len(ds)}


def _run(processor_dir, tmp_path, num_rows, **kw):
    data = write_generated(tmp_path / "gen", num_rows)
    cfg = config(processor_dir, data, packing=True, shuffle=True, seq_length=2048, **kw)
    ds = cfg.build_split("train")
    plan_bytes = sum(a.nbytes for a in (ds.plan.lengths, ds.plan.status, ds.plan.truncation, ds.plan.bin_offsets,
                                        ds.plan.bin_rows))
    stats = iterate_and_measure(ds)
    stats["plan_bytes"] = plan_bytes
    stats["efficiency"] = ds.plan.efficiency
    print(f"\n{num_rows} rows: {stats}")
    assert stats["rows"] == num_rows
    assert plan_bytes <= 20 * num_rows  # ~13 bytes per row, nothing decoded is kept
    return stats


def test_rss_flat_over_3000_rows(processor_dir, tmp_path):
    stats = _run(processor_dir, tmp_path, 3000)
    assert stats["growth_mb"] < 50, stats


@pytest.mark.slow
def test_rss_flat_over_50k_rows(processor_dir, tmp_path):
    stats = _run(processor_dir, tmp_path, 50_000, plan_num_proc=2)
    assert stats["growth_mb"] < 200, stats
    assert os.path.getsize(tmp_path / "gen" / "train.jsonl") > 8 * MB  # the data is not small
