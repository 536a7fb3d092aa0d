"""Every format x source x image kind reads the same conversation to identical input ids, labels and pixel values,
and those are exactly what ``Gemma4Processor`` produces (ids, mm_token_type_ids, pixel_values, image_position_ids)."""

from __future__ import annotations

import json

import datasets
import numpy as np
import pyarrow as pa
import pytest
import torch
from transformers import AutoProcessor

from gemma4vl.labels import IGNORE_INDEX
from gemma4vl.data.sources import load_source
from test_data_support import (
    A1, A2, config, data_uri, first_batch, images, llava_row, messages_row, png_bytes, processor_dir,
    reference_messages, sharegpt_row, write_image_files, write_jsonl,
)

__all__ = ["processor_dir"]


def _arrow_file(ds: datasets.Dataset, path):
    table = ds.with_format("arrow")[:]
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return path


# Each case writes one row holding the reference conversation and returns (path, config overrides).
def _messages_jsonl_paths(d, imgs):
    a, b = write_image_files(d, imgs)
    return write_jsonl(d / "data.jsonl", [messages_row(a, b, string_contents=True)]), {}


def _messages_json_images_column(d, imgs):
    a, b = write_image_files(d, imgs)
    path = d / "data.json"
    path.write_text(json.dumps([messages_row(a, b, inline=False)]))
    return path, {}


def _messages_jsonl_data_uri(d, imgs):
    return write_jsonl(d / "data.jsonl", [messages_row(*map(data_uri, imgs))]), {}


def _messages_parquet_bytes(d, imgs):
    datasets.Dataset.from_list([messages_row(*map(png_bytes, imgs))]).to_parquet(d / "data.parquet")
    return d / "data.parquet", {}


def _messages_arrow_image_feature(d, imgs):
    ds = datasets.Dataset.from_list([messages_row(*imgs, inline=False)])  # PIL -> datasets.Image column
    assert isinstance(ds.features["images"].feature, datasets.Image)
    return _arrow_file(ds, d / "data.arrow"), {}


def _messages_save_to_disk_pil_inline(d, imgs):
    datasets.Dataset.from_list([messages_row(*imgs)]).save_to_disk(str(d / "saved"))
    return d / "saved", {}


def _messages_directory(d, imgs):
    a, b = write_image_files(d / "ds", imgs)
    write_jsonl(d / "ds" / "train.jsonl", [messages_row(a, b)])
    return d / "ds", {}


def _llava_jsonl_paths(d, imgs):
    a, b = write_image_files(d, imgs)
    return write_jsonl(d / "llava.jsonl", [llava_row(a, b)]), {"format": "llava"}


def _llava_parquet_bytes(d, imgs):
    datasets.Dataset.from_list([llava_row(*map(png_bytes, imgs))]).to_parquet(d / "llava.parquet")
    return d / "llava.parquet", {"format": "llava"}


def _llava_save_to_disk_dict(d, imgs):
    ds = datasets.Dataset.from_list([llava_row(*imgs)])
    datasets.DatasetDict({"train": ds, "validation": ds}).save_to_disk(str(d / "saved"))
    return d / "saved", {"format": "llava"}


def _sharegpt_jsonl_paths(d, imgs):
    a, b = write_image_files(d, imgs)
    return write_jsonl(d / "sg.jsonl", [sharegpt_row(a, b)]), {"format": "sharegpt"}


def _sharegpt_arrow_bytes(d, imgs):
    return _arrow_file(datasets.Dataset.from_list([sharegpt_row(*map(png_bytes, imgs))]), d / "sg.arrow"), {
        "format": "sharegpt"}


def _sharegpt_parquet_dir_custom_columns(d, imgs):
    row = sharegpt_row(*imgs)
    row = {"dialogue": row["conversations"], "pics": row["images"], "sys": row["system"]}
    (d / "pq").mkdir()
    datasets.Dataset.from_list([row]).to_parquet(d / "pq" / "train-00000-of-00001.parquet")
    return d / "pq", {"format": "sharegpt", "messages_column": "dialogue", "images_column": "pics",
                      "system_column": "sys"}


CASES = {f.__name__.lstrip("_"): f for f in (
    _messages_jsonl_paths, _messages_json_images_column, _messages_jsonl_data_uri, _messages_parquet_bytes,
    _messages_arrow_image_feature, _messages_save_to_disk_pil_inline, _messages_directory, _llava_jsonl_paths,
    _llava_parquet_bytes, _llava_save_to_disk_dict, _sharegpt_jsonl_paths, _sharegpt_arrow_bytes,
    _sharegpt_parquet_dir_custom_columns,
)}


@pytest.fixture(scope="module")
def reference(processor_dir):
    """Gemma4Processor on the reference conversation (the template's own rendering: thought_prefix="none")."""
    processor = AutoProcessor.from_pretrained(processor_dir)
    imgs = images()
    text = processor.apply_chat_template(reference_messages(imgs), tokenize=False)
    out = processor(text=[text], images=[imgs], add_special_tokens=False, return_tensors="pt")
    return processor, out


def _expected_labels(processor, ids: torch.Tensor) -> torch.Tensor:
    """Labels derived independently: each answer (text after ``<|turn>model\\n``) and its ``<turn|>``."""
    tok = processor.tokenizer
    header = tok("<|turn>model\n", add_special_tokens=False)["input_ids"]
    end = tok.convert_tokens_to_ids("<turn|>")
    ids = ids.tolist()
    target = [False] * len(ids)
    for i in range(len(ids) - len(header) + 1):
        if ids[i: i + len(header)] == header:
            j = i + len(header)
            while ids[j] != end:
                target[j] = True
                j += 1
            target[j] = True
    labels = [ids[t + 1] if target[t + 1] else IGNORE_INDEX for t in range(len(ids) - 1)] + [IGNORE_INDEX]
    return torch.tensor(labels)


@pytest.mark.parametrize("case", sorted(CASES))
def test_format_and_source_read_identically(case, reference, processor_dir, tmp_path):
    processor, ref = reference
    path, overrides = CASES[case](tmp_path, images())
    batch = first_batch(config(processor_dir, path, thought_prefix="none", **overrides))
    assert torch.equal(batch.input_ids, ref["input_ids"])
    assert torch.equal(batch.mm_token_type_ids, ref["mm_token_type_ids"])
    assert torch.equal(batch.pixel_values, ref["pixel_values"])  # bit for bit
    assert torch.equal(batch.image_position_ids, ref["image_position_ids"])
    assert torch.equal(batch.labels[0], _expected_labels(processor, ref["input_ids"][0]))
    assert tuple(batch.pixel_values.shape) == (2, 280, 48)
    # 40x32 is upscaled to 72x56 (18x14 patches -> 63 soft tokens); 64x64 stays (64)
    assert int(batch.mm_token_type_ids.sum()) == 63 + 64
    labelled = batch.labels[0][batch.labels[0] != IGNORE_INDEX]
    assert processor.tokenizer.decode(labelled) == f"{A1}<turn|>{A2}<turn|>"
    assert torch.equal(batch.position_ids[0], torch.arange(batch.input_ids.shape[1]))
    assert batch.segment_ids.unique().tolist() == [1]


def test_default_settings_agree_across_formats(processor_dir, tmp_path):
    """With the default thought prefix too, the three formats give the same tensors."""
    batches = []
    for case in ("messages_jsonl_paths", "llava_parquet_bytes", "sharegpt_arrow_bytes"):
        d = tmp_path / case
        d.mkdir()
        path, overrides = CASES[case](d, images())
        batches.append(first_batch(config(processor_dir, path, **overrides)))
    for other in batches[1:]:
        for key in ("input_ids", "labels", "pixel_values", "image_position_ids", "mm_token_type_ids"):
            assert torch.equal(getattr(batches[0], key), getattr(other, key)), key


@pytest.mark.parametrize("budget", [70, 140, 280])
def test_image_budget_is_configurable(processor_dir, tmp_path, budget):
    """A 96x96 image is resized to 64x64 (70: 64 soft tokens), 88x88 (140: 121) or 128x128 (280: 256)."""
    from gemma4vl.testing.fixtures import make_image

    big = make_image(3, 96)
    big.save(tmp_path / "big.png")
    row = {"messages": [{"role": "user", "content": [{"type": "image", "image": "big.png"},
                                                     {"type": "text", "text": "?"}]},
                        {"role": "assistant", "content": "ok"}]}
    path = write_jsonl(tmp_path / "d.jsonl", [row])
    batch = first_batch(config(processor_dir, path, max_soft_tokens=budget, cache_dir=str(tmp_path / f"c{budget}")))
    n = int(batch.mm_token_type_ids.sum())
    assert n == {70: 64, 140: 121, 280: 256}[budget]
    assert batch.pixel_values.shape[1] == budget * 4


def test_text_only_row(processor_dir, tmp_path):
    row = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}
    batch = first_batch(config(processor_dir, write_jsonl(tmp_path / "t.jsonl", [row])))
    assert batch.pixel_values is None and batch.image_position_ids is None
    assert int(batch.mm_token_type_ids.abs().sum()) == 0
    assert batch.input_ids.shape == batch.labels.shape == batch.segment_ids.shape


def test_directory_splits_and_missing_paths(tmp_path):
    d = tmp_path / "ds"
    write_jsonl(d / "train-00000.jsonl", [{"x": 1}, {"x": 2}])
    write_jsonl(d / "validation.jsonl", [{"x": 3}])
    (d / "images").mkdir()
    for i in range(5):
        (d / "images" / f"{i}.png").write_bytes(b"")
    assert len(load_source(str(d), "train")) == 2
    assert len(load_source(str(d), "validation")) == 1
    with pytest.raises(ValueError, match=r"has splits \['train', 'validation'\] \(from file names\), not 'test'"):
        load_source(str(d), "test")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_source(str(tmp_path / "nope.jsonl"), "train")
    assert load_source(str(d / "train-00000.jsonl"), "train").image_root == str(d.resolve())
    assert np.array_equal(load_source(str(d), "train", max_rows=1).dataset["x"], [1])


def test_hub_name_goes_through_load_dataset(processor_dir, tmp_path, monkeypatch, reference):
    """A name that is no local path is a hub dataset: ``datasets.load_dataset(name, split=...)`` (stubbed here: no
    hub access in CI); it has no image directory, so relative image paths in it are bad rows."""
    calls = []
    by_path = messages_row({"path": "a.png", "bytes": None}, {"path": "b.png", "bytes": None}, inline=False)
    hub = datasets.Dataset.from_list([messages_row(*images(), inline=False), by_path])  # a datasets.Image column
    assert isinstance(hub.features["images"].feature, datasets.Image)

    def fake_load_dataset(path, *args, **kwargs):
        calls.append((path, args, kwargs))
        return hub

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    cfg = config(processor_dir, "someone/vqa-set", thought_prefix="none", bad_rows="skip", max_skipped_fraction=0.5,
                 cache_dir=str(tmp_path / "cache"), subset="en", revision="0123abc")
    ds = cfg.build_split("train")
    assert calls == [("someone/vqa-set", (), {"name": "en", "revision": "0123abc", "split": "train",
                                              "cache_dir": str(tmp_path / "cache" / "hf_datasets")})]
    assert ds.plan.skipped() == {"missing_image": 1} and "no image directory (set image_root)" in ds.plan.examples[0]
    batch = ds.collate_fn([ds[0]])
    assert torch.equal(batch.input_ids, reference[1]["input_ids"])
    assert torch.equal(batch.pixel_values, reference[1]["pixel_values"])
