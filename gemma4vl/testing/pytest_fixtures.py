"""Session-cached tiny Gemma 4 checkpoints for pytest.

Use the functions from any fixture or test (they cache per pytest session and per parameters):

    from gemma4vl.testing.pytest_fixtures import tiny_checkpoint, tiny_checkpoint_dir

    @pytest.fixture(scope="session")
    def hf_dir(tmp_path_factory):
        return tiny_checkpoint_dir(tmp_path_factory, layout="per_layer_config", dtype="bfloat16")

or import the ready-made fixtures into a test module / conftest.py (`from gemma4vl.testing.pytest_fixtures
import tiny_ckpt, tiny_ckpt_dir`). The directories are shared by every test of the session: treat them as
read-only (copy one before modifying it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from .fixtures import CheckpointInfo, write_checkpoint

_CACHE: dict[tuple, CheckpointInfo] = {}


def _key(tmp_path_factory, variant: str, layout: str, dtype: Any, kwargs: dict) -> tuple:
    return (
        str(tmp_path_factory.getbasetemp()),
        variant,
        layout,
        str(dtype).removeprefix("torch."),
        tuple(sorted((k, repr(v)) for k, v in kwargs.items())),
    )


def tiny_checkpoint(
    tmp_path_factory: pytest.TempPathFactory,
    layout: str = "released",
    dtype: Any = "float32",
    *,
    variant: str = "tiny-moe",
    **kwargs: Any,
) -> CheckpointInfo:
    """`write_checkpoint(...)` once per session and parameter set (seed, max_shard_size, ... go in kwargs)."""
    key = _key(tmp_path_factory, variant, layout, dtype, kwargs)
    if key not in _CACHE:
        name = f"gemma4-{variant}-{layout}-{key[3]}"
        out = tmp_path_factory.mktemp(name, numbered=True)
        _CACHE[key] = write_checkpoint(out, variant=variant, dtype=dtype, layout=layout, **kwargs)
    return _CACHE[key]


def tiny_checkpoint_dir(
    tmp_path_factory: pytest.TempPathFactory, layout: str = "released", dtype: Any = "float32", **kwargs: Any
) -> Path:
    """Directory of a session-cached tiny checkpoint (weights, configs, tokenizer, processor)."""
    return tiny_checkpoint(tmp_path_factory, layout, dtype, **kwargs).path


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> CheckpointInfo:
    """tiny-moe, float32, released layout, seed 0, one safetensors file, with tokenizer / processor."""
    return tiny_checkpoint(tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_ckpt_dir(tiny_ckpt) -> Path:
    return tiny_ckpt.path


def losses(run_dir: str | Path, key: str = "loss") -> dict[int, float]:
    """``{step: loss}`` of a run's ``metrics.jsonl`` (the last record of each step holding ``key``: ``"loss"``, or
    ``"val_loss"`` for the validation losses)."""
    from gemma4vl.training.metrics import read_metrics

    return {r["step"]: r[key] for r in read_metrics(run_dir) if key in r}
