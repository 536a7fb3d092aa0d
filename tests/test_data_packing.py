"""Packing: the packed form is exact (same per-token loss as each sample run alone, 1e-5 fp32, through our
Megatron model), the plan is deterministic, cached, efficient, and the dataset is resumable item by item."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from gemma4vl.data import assemble_row, pack
from gemma4vl.data.demo import write_demo_dataset
from gemma4vl.labels import IGNORE_INDEX
from test_data_support import config, images, processor_dir, reference_messages, write_jsonl

__all__ = ["processor_dir"]


def _rows(tmp_path) -> list[dict]:
    """Conversations of every shape: two images, one image, text only, multi-turn, different lengths."""
    a, b = images()
    a.save(tmp_path / "a.png")
    b.save(tmp_path / "b.png")
    two = reference_messages(["a.png", "b.png"])
    one = [{"role": "user", "content": [{"type": "image", "image": "b.png"}, {"type": "text", "text": "Colour?"}]},
           {"role": "assistant", "content": "Green and red."}]
    text = [{"role": "user", "content": "Say something long."}, {"role": "assistant", "content": "Something " * 6}]
    multi = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
             {"role": "user", "content": [{"type": "image", "image": "a.png"}, {"type": "text", "text": "This?"}]},
             {"role": "assistant", "content": "A gradient."}]
    return [{"messages": m} for m in (two, one, text, multi, one, text)]


@pytest.fixture(scope="module")
def packed_dataset(processor_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("packing")
    path = write_jsonl(d / "rows.jsonl", _rows(d))
    return config(processor_dir, path, packing=True, seq_length=400, pad_to_seq_length=True).build_split("train")


def test_packed_row_layout(packed_dataset):
    ds = packed_dataset
    assert len(ds) == ds.plan.num_bins < 6  # several conversations share rows
    item = ds[0]
    samples = ds.samples(0)
    assert item["num_samples"] == len(samples) >= 2
    lengths = [len(e) for _, e in samples]
    seg = item["segment_ids"].numpy()
    assert seg.tolist() == sum(([k + 1] * n for k, n in enumerate(lengths)), [])
    pos = item["position_ids"].numpy()
    starts = np.cumsum([0] + lengths[:-1])
    assert pos[starts].tolist() == [0] * len(lengths)
    assert pos.tolist() == sum((list(range(n)) for n in lengths), [])
    labels = item["labels"].numpy()
    assert labels[starts[1:] - 1].tolist() == [IGNORE_INDEX] * (len(lengths) - 1)  # never predict a neighbour
    assert labels[-1] == IGNORE_INDEX
    n_images = sum(len(e.images) for _, e in samples)
    assert len(item["images"]) == n_images
    batch = ds.collate_fn([ds[i] for i in range(len(ds))])
    assert batch.input_ids.shape == (len(ds), 400)
    assert batch.pixel_values.shape[0] == sum(len(e.images) for i in range(len(ds)) for _, e in ds.samples(i))


def test_packed_batch_loss_equals_samples_run_alone(megatron_cpu, packed_dataset, processor_dir):
    """Per-token loss of every sample inside packed rows == its loss run alone (fp32, 1e-5)."""
    from gemma4vl.testing.megatron_harness import load_megatron

    ds = packed_dataset
    _, model = load_megatron(processor_dir)
    model[0].eval()
    batch = ds.collate_fn([ds[i] for i in range(len(ds))])
    assert batch.rows.bad_rows == [] and batch.rows.row_stats == (ds.plan.num_rows, 0)
    with torch.no_grad():
        packed = model[0](**batch.model_kwargs())
    assert packed.shape == batch.input_ids.shape
    checked = 0
    for i in range(len(ds)):
        offset = 0
        for _, enc in ds.samples(i):
            alone = ds.collate_fn([assemble_row([enc], ds.rows.encoder.image_token_id)])
            with torch.no_grad():
                single = model[0](**alone.model_kwargs())[0, : len(enc)]
            inside = packed[i, offset: offset + len(enc)]
            assert (single != 0).sum() == (alone.labels != IGNORE_INDEX).sum() > 0
            torch.testing.assert_close(inside, single, rtol=0, atol=1e-5)
            offset += len(enc)
            checked += 1
        assert packed[i, offset:].abs().sum() == 0  # padding carries no loss
    assert checked == 6


def test_pack_is_deterministic_and_efficient():
    rng = np.random.default_rng(0)
    # realistic 26B-A4B rows: one 896x896 image (256 soft tokens + 2 markers) and 120-280 text tokens
    lengths = (258 + rng.integers(120, 280, size=5000)).astype(np.int32)
    order = rng.permutation(5000)
    offsets, rows = pack(lengths, order, 8192, 1000)
    again = pack(lengths, order, 8192, 1000)
    assert np.array_equal(offsets, again[0]) and np.array_equal(rows, again[1])
    assert sorted(rows.tolist()) == list(range(5000))  # every row exactly once
    fill = np.add.reduceat(lengths[rows], offsets[:-1])
    assert fill.max() <= 8192
    efficiency = lengths.sum() / (len(fill) * 8192)
    assert efficiency >= 0.95, efficiency
    with pytest.raises(ValueError, match="cannot be packed into 100"):
        pack(lengths, order, 100, 1000)


def test_demo_set_packing_efficiency_and_plan_cache(processor_dir, tmp_path, caplog):
    write_demo_dataset(tmp_path / "demo", num_train=2000, num_val=50)
    cfg = config(processor_dir, tmp_path / "demo", packing=True, shuffle=True, seq_length=2048)
    ds = cfg.build_split("train")
    print(f"\ndemo set: {ds.plan.summary('train')}")
    assert ds.plan.efficiency >= 0.97 and ds.plan.bin_rows.size == 2000
    with caplog.at_level(logging.INFO, logger="gemma4vl.data"):
        again = cfg.build_split("train")
    assert any("cached plan" in r.getMessage() for r in caplog.records)
    assert np.array_equal(again.plan.bin_rows, ds.plan.bin_rows)
    _, source = cfg.pipeline("train")
    other = config(processor_dir, tmp_path / "demo", packing=True, shuffle=True, seq_length=2048, seed=7)
    assert other.plan_path(source, "p") != cfg.plan_path(source, "p")  # settings are part of the key
    assert cfg.plan_path(source, "q") != cfg.plan_path(source, "p")  # so is the processor
    with open(tmp_path / "demo" / "train.jsonl", "a") as f:  # and the data
        f.write(open(tmp_path / "demo" / "validation.jsonl").readline())
    _, changed = cfg.pipeline("train")
    assert len(changed) == 2001 and cfg.plan_path(changed, "p") != cfg.plan_path(source, "p")


def test_epochs_resume_and_determinism(processor_dir, tmp_path):
    write_demo_dataset(tmp_path / "demo", num_train=120, num_val=10)
    cfg = config(processor_dir, tmp_path / "demo", packing=True, shuffle=True, seq_length=512)
    ds = cfg.build_split("train", num_samples=50)
    bins = ds.plan.num_bins
    assert len(ds) == bins * -(-50 // bins) >= 50
    epochs = [[ds.bin_of(e * bins + k) for k in range(bins)] for e in range(len(ds) // bins)]
    assert all(sorted(e) == list(range(bins)) for e in epochs) and epochs[0] != epochs[1]
    fresh = cfg.build_split("train", num_samples=50)  # a resumed run builds the dataset anew
    for i in (0, 3, bins + 1, len(ds) - 1):
        a, b = ds[i], fresh[i]
        assert all(torch.equal(a[k], b[k]) for k in ("input_ids", "labels", "position_ids", "segment_ids"))
        assert all(torch.equal(x[0], y[0]) for x, y in zip(a["images"], b["images"]))


def test_parallel_length_pass_matches_serial(processor_dir, tmp_path):
    """plan_num_proc > 1 gives the identical plan; a bad row found in a worker process still names its row."""
    import json

    from gemma4vl.data import BadRowError

    rows = [{"messages": [{"role": "user", "content": f"Question {i} " + "x" * (i % 37)},
                          {"role": "assistant", "content": f"Answer {i}."}]} for i in range(1200)]
    rows[1100] = {"messages": [{"role": "user", "content": [{"type": "image", "image": "gone.png"}]},
                               {"role": "assistant", "content": "?"}]}
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    plans = [config(processor_dir, path, packing=True, shuffle=True, seq_length=512, bad_rows="skip",
                    plan_num_proc=n, cache_dir=str(tmp_path / f"c{n}")).build_split("train").plan for n in (1, 2)]
    for name in ("lengths", "status", "truncation", "bin_offsets", "bin_rows"):
        assert np.array_equal(getattr(plans[0], name), getattr(plans[1], name)), name
    assert plans[1].skipped() == {"missing_image": 1}
    with pytest.raises(BadRowError, match=r"row 1100: missing_image"):
        config(processor_dir, path, plan_num_proc=2, cache_dir=str(tmp_path / "e")).build_split("train")
