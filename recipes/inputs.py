"""The demo's generated inputs: the random test checkpoint (``model.generate_fixture``) and the synthetic VQA set
(``data.demo_dir``), written before the run when the config points at them and they do not exist yet.

Rules (nothing a user named is ever written or deleted):

- the checkpoint is generated only when ``model.hf_path`` *is* ``model.fixture_dir`` and that directory does not
  exist; the dataset only when ``data.path`` *is* ``data.demo_dir`` and it does not exist;
- each is written into a fresh hidden sibling directory and renamed into place when complete, so an interrupted
  generation leaves nothing at the configured path (the next run starts over);
- concurrent processes (torchrun ranks, parallel runs) take an exclusive lock on ``.<name>.lock`` beside the
  directory: one generates, the others find it done.

Anything else (an existing directory, even an incomplete one, or another path) is left to the run's input checks,
which report what is missing.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from gemma4vl.config.schema import RunConfig

logger = logging.getLogger("gemma4vl")


def _same_path(a: str, b: str) -> bool:
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def generate_once(target: Path, write: Callable[[Path], None], what: str) -> bool:
    """Write ``target`` with ``write(tmp_dir)`` unless it exists; atomic and safe under concurrent callers.
    Returns True when this call generated it."""
    target = target.expanduser().absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.exists() or target.is_symlink():
            return False
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.generating-", dir=target.parent))
        try:
            logger.info("writing the %s to %s", what, target)
            write(tmp)
            os.rename(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return True


def prepare_demo_inputs(cfg: RunConfig) -> None:
    """Generate the demo checkpoint / dataset that ``cfg`` points at when they do not exist yet (see module doc)."""
    m, d = cfg.model, cfg.data
    if m.generate_fixture and m.fixture_dir and _same_path(m.hf_path, m.fixture_dir):
        from gemma4vl.testing.fixtures import write_checkpoint

        generate_once(Path(m.fixture_dir), lambda out: write_checkpoint(
            out, variant=m.generate_fixture, num_layers=m.fixture_num_layers, max_soft_tokens=d.max_soft_tokens,
            overwrite=True), f"{m.generate_fixture} test checkpoint")
    if d.demo_dir and _same_path(d.path, d.demo_dir):
        from gemma4vl.data.demo import write_demo_dataset

        generate_once(Path(d.demo_dir), write_demo_dataset, "demo dataset")
