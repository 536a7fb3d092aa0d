"""The data group's one schema (fields documented, YAML keys == fields, values validated, Megatron-Bridge's
dataloader fields among them) and its plumbing into Megatron-Bridge's ``DatasetProvider``: datasets sized for the
run, deterministic sharding over data-parallel ranks by Megatron's own sampler, resume from ``consumed_samples``,
and DataLoader workers giving the same batches as the main process."""

from __future__ import annotations

import ast
import dataclasses
import inspect
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from gemma4vl.data.config import Gemma4VLDataConfig
from gemma4vl.data.demo import write_demo_dataset
from test_data_support import processor_dir

__all__ = ["processor_dir"]
CONF = Path(__file__).resolve().parents[1] / "conf" / "data"


@pytest.fixture(scope="module")
def provider_cls():
    from gemma4vl.config.data_provider import Gemma4VLDatasetProvider

    return Gemma4VLDatasetProvider


def _documented_fields(cls) -> set[str]:
    """Field names followed by a docstring in ``cls``'s own source."""
    body = ast.parse(inspect.getsource(cls)).body[0].body
    out = set()
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) \
                and isinstance(nxt.value.value, str) and nxt.value.value.strip():
            out.add(node.target.id)
    return out


def test_every_field_has_a_docstring_and_the_loader_fields_are_megatron_bridges(provider_cls):
    from megatron.bridge.data.base import DataloaderConfig

    from gemma4vl.config.schema import RunConfig
    from gemma4vl.data.config import _LOADER_FIELDS

    own = {f.name for f in dataclasses.fields(Gemma4VLDataConfig)}
    assert own == _documented_fields(Gemma4VLDataConfig)
    loader = {f.name for f in dataclasses.fields(DataloaderConfig)}
    assert set(_LOADER_FIELDS) == loader and loader < own
    # the run config's data group is this schema; the provider holds it and copies what Megatron-Bridge reads
    assert {f.name: f.type for f in dataclasses.fields(RunConfig)}["data"] == "Gemma4VLDataConfig"
    assert {f.name for f in dataclasses.fields(provider_cls)} == loader | {"data", "seq_length"}


@pytest.mark.parametrize("name", ["demo", "local"])
def test_yaml_keys_are_exactly_the_fields(name, provider_cls, processor_dir, tmp_path):
    conf = OmegaConf.load(CONF / f"{name}.yaml")
    assert set(conf.keys()) == {f.name for f in dataclasses.fields(Gemma4VLDataConfig)}
    conf.processor_path = str(processor_dir)
    conf.path = str(tmp_path)
    data = Gemma4VLDataConfig(**OmegaConf.to_container(conf, resolve=True))
    cfg = provider_cls.from_config(data)
    assert cfg.data is data and cfg.data.format == "messages" and cfg.seq_length == data.seq_length
    expected = {"demo": ("single", 2, False), "local": ("single", 4, True)}[name]
    assert (cfg.dataloader_type, cfg.num_workers, cfg.pin_memory) == expected == (
        data.dataloader_type, data.num_workers, data.pin_memory)


@pytest.mark.parametrize("field,value,message", [
    ("format", "alpaca", "data.format must be one of"),
    ("thought_prefix", "sometimes", "data.thought_prefix must be one of"),
    ("max_soft_tokens", 100, r"data.max_soft_tokens must be one of \(70, 140, 280, 560, 1120\)"),
    ("seq_length", 0, "data.seq_length must be >= 1"),
    ("bad_rows", "ignore", "data.bad_rows must be one of"),
    ("dataloader_type", "batch", r"data.dataloader_type must be one of \('single', 'cyclic'\)"),
    ("num_workers", -1, "data.num_workers must be >= 0"),
    ("role_map", {"human": "person"}, "role_map values must be one of"),
])
def test_invalid_values_are_refused(field, value, message):
    with pytest.raises(ValueError, match=message):
        Gemma4VLDataConfig(**{field: value})
    with pytest.raises(ValueError, match="data.processor_path is required"):
        Gemma4VLDataConfig(path="x").build_split("train")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    write_demo_dataset(out, num_train=300, num_val=40)
    return out


def test_megatron_sampler_shards_and_resumes(provider_cls, processor_dir, demo):
    from megatron.bridge.data.base import DatasetBuildContext
    from megatron.bridge.data.samplers import build_pretraining_data_loader

    cfg = provider_cls.from_config(Gemma4VLDataConfig(processor_path=str(processor_dir), path=str(demo),
                                                      validation_split="validation", seq_length=512, num_workers=0))
    train, valid, test = cfg.build_datasets(DatasetBuildContext(train_samples=100, valid_samples=12, test_samples=0))
    assert test is None and len(train) >= 100 and len(valid) >= 12
    assert len(train) % train.plan.num_bins == 0 and len(valid) % valid.plan.num_bins == 0

    def batches(rank, consumed, workers=0, n=3):
        loader = build_pretraining_data_loader(
            train, consumed, "single", 2, workers, True, collate_fn=train.collate_fn, pin_memory=False,
            persistent_workers=False, data_parallel_rank=rank, data_parallel_size=2)
        it = iter(loader)
        return [next(it) for _ in range(n)]

    def expected(first):
        return train.collate_fn([train[first], train[first + 1]])

    rank0, rank1 = batches(0, 0), batches(1, 0)
    for step in range(3):  # global batch of 4 rows: rank 0 takes rows 4k, 4k+1; rank 1 takes 4k+2, 4k+3
        for got, first in ((rank0[step], 4 * step), (rank1[step], 4 * step + 2)):
            want = expected(first)
            assert got.rows == want.rows
            for key, value in want.model_kwargs().items():
                assert torch.equal(got.model_kwargs()[key], value), (step, key)
    resumed = batches(0, 8, n=1)[0]  # after 2 global batches
    assert torch.equal(resumed.input_ids, rank0[2].input_ids)
    with_workers = batches(1, 0, workers=2)
    for a, b in zip(with_workers, rank1):
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.pixel_values, b.pixel_values)
    first = valid.collate_fn([valid[0]])
    assert first.input_ids.shape == (1, 512) and first.pixel_values.dtype == torch.float32


def _build_on_rank(processor_path: str, data_dir: str, cache_dir: str):
    """One rank of test_ranks_share_one_plan: build the training set, report its plan and whether it was read."""
    import logging

    import torch.distributed as dist

    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    log = logging.getLogger("gemma4vl.data")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    cfg = Gemma4VLDataConfig(processor_path=processor_path, path=data_dir, seq_length=512, cache_dir=cache_dir)
    ds = cfg.build_split("train", num_samples=64)
    return (dist.get_rank(), ds.plan.bin_rows.tolist(), [ds.bin_of(i) for i in range(len(ds))],
            any("cached plan" in m for m in messages))


def test_ranks_share_one_plan(processor_dir, demo, tmp_path):
    """Rank 0 computes and caches the plan while rank 1 waits at a barrier, then reads it: same rows, same order."""
    from gemma4vl.testing.distributed import run_distributed

    results = run_distributed(_build_on_rank, 2, str(processor_dir), str(demo), str(tmp_path / "cache"),
                              timeout=240)
    (r0, rows0, order0, cached0), (r1, rows1, order1, cached1) = results
    assert (r0, r1) == (0, 1) and rows0 == rows1 and order0 == order1
    assert (cached0, cached1) == (False, True)
    assert len(list((tmp_path / "cache").glob("plan-*.npz"))) == 1
