"""The one batch type (:class:`gemma4vl.data.batch.Batch`): its model inputs are exactly the model's keyword
arguments, ``to`` moves every tensor, ``from_prompt`` builds what the collator builds for the same single row, and
the data package loads neither Megatron nor Transformer Engine."""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from gemma4vl.data import Batch, RowReport
from gemma4vl.data.collate import Collator, assemble_row
from gemma4vl.data.images import to_pixel_values
from gemma4vl.labels import IGNORE_INDEX
from test_data_support import config, data_uri, images, processor_dir, reference_messages, write_jsonl

__all__ = ["processor_dir"]
ROOT = Path(__file__).resolve().parents[1]


def _messages() -> list[dict]:
    """The reference conversation (system, two questions with an image each, two answers), images inline."""
    return reference_messages([data_uri(image) for image in images()])


def _batch() -> Batch:
    ids = torch.tensor([[2, 7, 9, 9, 3, 0], [2, 5, 6, 0, 0, 0]])
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[0, 3:5] = torch.tensor([3, 1])
    return Batch(input_ids=ids, position_ids=torch.arange(6).expand(2, 6).clone(),
                 segment_ids=(ids != 0).long(), mm_token_type_ids=(ids == 9).long(),
                 pixel_values=torch.rand(1, 4, 48), image_position_ids=torch.zeros(1, 4, 2, dtype=torch.long),
                 labels=labels, rows=RowReport(bad_rows=[(4, "corrupt_image", "row 4")], row_stats=(10, 1)))


def test_model_kwargs_are_the_models_keyword_inputs():
    from gemma4vl.models import Gemma4VLModel

    params = set(inspect.signature(Gemma4VLModel.forward).parameters) - {"self", "runtime_gather_output"}
    batch = _batch()
    assert set(batch.model_kwargs()) == params == {
        "input_ids", "position_ids", "segment_ids", "mm_token_type_ids", "pixel_values", "image_position_ids",
        "labels"}
    assert all(batch.model_kwargs()[k] is getattr(batch, k) for k in params)
    # the row report is bookkeeping, never a model input
    assert "rows" not in batch.model_kwargs() and "bad_rows" not in batch.model_kwargs()
    assert torch.equal(batch.loss_mask(), torch.tensor([[0, 0, 0, 1, 1, 0], [0] * 6], dtype=torch.float32))


def test_to_moves_every_tensor_and_keeps_the_report():
    batch = _batch()
    moved = batch.to("meta")
    for name, value in moved.model_kwargs().items():
        assert value.device.type == "meta" and value.shape == getattr(batch, name).shape, name
        assert getattr(batch, name).device.type == "cpu"  # the original is untouched
    assert moved.rows is batch.rows
    prompt = Batch.from_prompt([2, 7, 9], image_token_id=9).to("meta")
    assert prompt.pixel_values is None and prompt.image_position_ids is None and prompt.labels is None
    assert prompt.input_ids.device.type == "meta"


def test_from_prompt_equals_the_collated_single_row(processor_dir, tmp_path):
    """For one unpacked, unpadded row the prompt batch and the collator's batch hold the same model inputs
    (bit for bit, images included); only the labels differ (a prompt has none)."""
    path = write_jsonl(tmp_path / "rows.jsonl", [{"messages": _messages()}])
    ds = config(processor_dir, path).build_split("train")
    [(_, enc)] = ds.samples(0)
    image_token_id = ds.rows.encoder.image_token_id
    collated = Collator(ds.rows.encoder.settings, ds.rows.encoder.pad_id, seq_length=1024, pad_to_seq_length=False,
                        pad_to_multiple_of=1)([assemble_row([enc], image_token_id)])
    pixels, positions = to_pixel_values([(im.pixels, im.grid) for im in enc.images], ds.rows.encoder.settings)
    prompt = Batch.from_prompt(enc.input_ids, image_token_id, pixels, positions)
    assert len(enc.images) == 2 and collated.input_ids.shape == (1, len(enc))
    for name, value in collated.model_kwargs().items():
        if name == "labels":
            assert prompt.labels is None and int((value != IGNORE_INDEX).sum()) > 0
            continue
        assert getattr(prompt, name).dtype == value.dtype, name
        assert torch.equal(getattr(prompt, name), value), name
    assert int(prompt.mm_token_type_ids.sum()) == int(np.sum(enc.input_ids == image_token_id)) > 0
    # the same batch from a tensor of ids
    again = Batch.from_prompt(torch.as_tensor(enc.input_ids), image_token_id, pixels, positions)
    assert torch.equal(again.input_ids, prompt.input_ids) and torch.equal(again.position_ids, prompt.position_ids)


def test_the_evaluation_prompt_is_the_training_rows_prefix(processor_dir, tmp_path):
    """The validation question the trainer decodes (answers.load_probes -> Probe.batch) is the collated training
    row of that conversation up to the generation prompt."""
    from gemma4vl.training.answers import load_probes

    messages = _messages()[:3]  # system, user with an image, one answer
    path = write_jsonl(tmp_path / "rows.jsonl", [{"messages": messages}])
    cfg = config(processor_dir, path, validation_split="train")  # the empty thought channel, as decoded
    [probe] = load_probes(cfg, 1)
    ds = cfg.build_split("validation")
    image_token_id = ds.rows.encoder.image_token_id
    row = ds.collate_fn([ds[0]])
    prompt = probe.batch(image_token_id)
    n = prompt.input_ids.shape[1]
    assert 0 < n < row.input_ids.shape[1]
    for name in ("input_ids", "position_ids", "segment_ids", "mm_token_type_ids"):
        assert torch.equal(getattr(prompt, name), getattr(row, name)[:, :n]), name
    assert torch.equal(prompt.pixel_values, row.pixel_values)
    assert torch.equal(prompt.image_position_ids, row.image_position_ids)
    # the loss starts at the answer: nothing in the prompt but its last token (which predicts the answer's first)
    assert int((row.labels[0, : n - 1] != IGNORE_INDEX).sum()) == 0 and row.labels[0, n - 1] != IGNORE_INDEX


def test_data_package_imports_no_megatron():
    """``gemma4vl.data`` (the pipeline, its schema, the batch) loads neither Megatron nor Transformer Engine."""
    code = ("import sys, gemma4vl.data, gemma4vl.data.config, gemma4vl.data.batch; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('megatron', 'transformer_engine')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
