"""Throughput of the data pipeline: preprocessing (row parse, image decode + patchify, chat template, tokens,
labels) + packing + collation, in samples/s and tokens/s, on two sets:

- demo: the synthetic VQA set (64x64 PNG, tiny processor: patch 4, pooling 2, 70-token budget);
- realistic: one 896x896 JPEG (~150 KB, photo-like) + ~200 text tokens per row, with 26B-A4B's image settings
  (patch 16, pooling 3, 280-token budget: 256 soft tokens), packed into 8192-token rows.

Each set is measured single-worker (in-process, 1 torch thread, as one DataLoader worker runs) and with DataLoader
workers, against baselines measured in the same run on the same rows: the raw HF path (PIL decode,
``apply_chat_template``, ``Gemma4Processor(text, images)``; no labels, no packing) and PIL decode alone (a floor).
The length pass (plan building) and the packing efficiency are reported too.

    .venv/bin/python bench/data.py [--rows 2000] [--samples 300] [--workers 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gemma4vl.data import Gemma4VLDataConfig, load_processor  # noqa: E402
from gemma4vl.data.demo import write_demo_dataset  # noqa: E402
from gemma4vl.testing.fixtures import write_tokenizer_and_processor  # noqa: E402

WORDS = ("image photo scene colour light shadow person street building tree sky water car window door table "
         "chair dog cat bird flower road sign left right above below near far small large bright dark").split()


def photo(seed: int, size: int = 896):
    """A photo-like JPEG subject: smooth gradients, overlapping shapes, mild sensor noise."""
    from PIL import Image, ImageDraw

    rng = np.random.RandomState(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    base = np.stack([0.5 + 0.4 * np.sin(rng.uniform(2, 8) * xx + rng.uniform(2, 8) * yy + rng.uniform(0, 6))
                     for _ in range(3)], -1)
    noisy = np.clip(base + rng.normal(0, 0.02, base.shape), 0, 1)
    image = Image.fromarray((noisy * 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(12):
        x0, y0 = rng.randint(0, size, 2)
        r = rng.randint(20, 200)
        draw.ellipse([x0, y0, x0 + r, y0 + r], fill=tuple(int(c) for c in rng.randint(0, 255, 3)))
    return image


def write_realistic(out: Path, rows: int, distinct_images: int = 48) -> dict:
    (out / "images").mkdir(parents=True, exist_ok=True)
    sizes = []
    for k in range(distinct_images):
        buf = io.BytesIO()
        photo(k).save(buf, format="JPEG", quality=90)
        (out / "images" / f"{k}.jpg").write_bytes(buf.getvalue())
        sizes.append(len(buf.getvalue()))
    rng = np.random.RandomState(0)
    with open(out / "train.jsonl", "w") as f:
        for i in range(rows):
            question = " ".join(rng.choice(WORDS, rng.randint(18, 26))) + "?"
            answer = " ".join(rng.choice(WORDS, rng.randint(6, 10))) + "."
            f.write(json.dumps({"messages": [
                {"role": "user", "content": [{"type": "image", "image": f"images/{i % distinct_images}.jpg"},
                                             {"type": "text", "text": f"Describe the {question}"}]},
                {"role": "assistant", "content": answer}]}) + "\n")
    return {"jpeg_kb": float(np.mean(sizes)) / 1024}


def measure_items(ds, n_items: int, workers: int) -> tuple[float, int, int]:
    """(seconds, samples, real tokens) to produce and collate items 0..n_items-1, batch size 1."""
    if workers == 0:
        t0 = time.perf_counter()
        samples = tokens = 0
        for i in range(n_items):
            batch = ds.collate_fn([ds[i]])
            samples += int(batch.segment_ids.max())
            tokens += int((batch.segment_ids > 0).sum())
        return time.perf_counter() - t0, samples, tokens
    loader = torch.utils.data.DataLoader(ds, batch_size=1, num_workers=workers, collate_fn=ds.collate_fn,
                                         sampler=range(n_items), prefetch_factor=4, persistent_workers=False)
    it = iter(loader)
    first = next(it)  # workers started and warm
    t0 = time.perf_counter()
    samples = tokens = 0
    for batch in it:
        samples += int(batch.segment_ids.max())
        tokens += int((batch.segment_ids > 0).sum())
    del first
    return time.perf_counter() - t0, samples, tokens


def baselines(ds, processor, n_samples: int) -> dict:
    """Raw HF processor path and PIL decode alone over the first ``n_samples`` rows of ``ds``'s source."""
    from PIL import Image

    rows = [ds.rows.conversation(i) for i in range(n_samples)]
    root = Path(ds.rows.loader.root)
    t0 = time.perf_counter()
    for conv in rows:
        [np.asarray(Image.open(root / v).convert("RGB")) for v in conv.images]
    decode = time.perf_counter() - t0
    t0 = time.perf_counter()
    tokens = 0
    for conv in rows:
        imgs = [Image.open(root / v).convert("RGB") for v in conv.images]
        text = processor.apply_chat_template(conv.messages, tokenize=False)
        out = processor(text=[text], images=[imgs], add_special_tokens=False, return_tensors="pt")
        tokens += out["input_ids"].shape[1]
    raw = time.perf_counter() - t0
    return {"decode": (decode, n_samples, 0), "processor": (raw, n_samples, tokens)}


def bench_set(name: str, cfg: Gemma4VLDataConfig, n_samples: int, workers: list[int]) -> list[dict]:
    processor = load_processor(cfg.processor_path)
    t0 = time.perf_counter()
    ds = cfg.build_split("train")
    plan_s = time.perf_counter() - t0
    per_item = ds.plan.bin_rows.size / ds.plan.num_bins
    n_items = max(2, min(ds.plan.num_bins, int(np.ceil(n_samples / per_item))))
    n_base = min(n_samples, 200)
    results = []
    base = baselines(ds, processor, n_base)
    for label, (secs, samples, tokens) in (("PIL decode only (floor)", base["decode"]),
                                            ("raw HF processor (baseline)", base["processor"])):
        results.append({"set": name, "what": label, "workers": 0, "samples_s": samples / secs,
                        "tokens_s": tokens / secs})
    results.append({"set": name, "what": "length pass (plan)", "workers": 0, "samples_s": ds.plan.num_rows / plan_s,
                    "tokens_s": ds.plan.real_tokens / plan_s})
    for w in workers:
        secs, samples, tokens = measure_items(ds, n_items, w)
        results.append({"set": name, "what": "ours: preprocess+pack+collate", "workers": w,
                        "samples_s": samples / secs, "tokens_s": tokens / secs})
    baseline = results[1]["samples_s"]
    for r in results:
        r["vs_baseline"] = r["samples_s"] / baseline
    results.append({"set": name, "what": f"packing efficiency @ {cfg.seq_length}", "value": ds.plan.efficiency,
                    "rows": ds.plan.num_rows, "sequences": ds.plan.num_bins,
                    "mean_row_tokens": float(ds.plan.lengths[ds.plan.bin_rows].mean())})
    return results


def print_table(results: list[dict]) -> None:
    print(f"\n{'set':<10} {'what':<32} {'workers':>7} {'samples/s':>10} {'tokens/s':>11} {'vs baseline':>11}")
    print("-" * 86)
    for r in results:
        if "value" in r:
            print(f"{r['set']:<10} {r['what']:<32} {'':>7} {'':>10} {'':>11} {100 * r['value']:>10.1f}%"
                  f"   ({r['rows']} rows, {r['sequences']} sequences, {r['mean_row_tokens']:.0f} tokens/row)")
        else:
            print(f"{r['set']:<10} {r['what']:<32} {r['workers']:>7} {r['samples_s']:>10.1f} {r['tokens_s']:>11.0f} "
                  f"{r['vs_baseline']:>10.2f}x")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=2000, help="rows per generated set (plan / packing efficiency)")
    p.add_argument("--samples", type=int, default=300, help="samples timed per measurement")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers for the multi-worker figure")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # one DataLoader worker's share
    load_before = os.getloadavg()[0]
    results = []
    with tempfile.TemporaryDirectory(prefix="gemma4vl-bench-") as tmp:
        tmp = Path(tmp)
        tiny = write_tokenizer_and_processor(tmp / "tiny", max_soft_tokens=70).path
        real = write_tokenizer_and_processor(tmp / "real", patch_size=16, pooling_kernel_size=3,
                                             max_soft_tokens=280).path
        write_demo_dataset(tmp / "demo", num_train=args.rows, num_val=10)
        demo = Gemma4VLDataConfig(processor_path=str(tiny), path=str(tmp / "demo"), seq_length=2048)
        results += bench_set("demo", demo, args.samples, [0, args.workers])
        info = write_realistic(tmp / "realistic", args.rows)
        realistic = Gemma4VLDataConfig(processor_path=str(real), path=str(tmp / "realistic"), seq_length=8192)
        results += bench_set("realistic", realistic, args.samples, [0, args.workers])
        text_tokens = results[-1]["mean_row_tokens"] - 258
        print(f"realistic rows: one 896x896 JPEG ({info['jpeg_kb']:.0f} KB mean) -> 256 soft tokens + 2 markers, "
              f"{text_tokens:.0f} text tokens (template included); {torch.get_num_threads()} torch thread(s)")
    print_table(results)
    print(f"machine: {os.cpu_count()} CPUs, 1-min load average {load_before:.2f} before / {os.getloadavg()[0]:.2f} "
          "after (other processes compete for the CPUs when it is above the bench's own ~1-2)")
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
