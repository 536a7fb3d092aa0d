"""Checks of a run's inputs, outputs and resume state, run before any weight is read (so a 26B run fails in seconds,
not after the import or after training).

- outputs (``run_dir``, ``checkpoint.dir``, ``export.dir``'s parent) are writable, and none of them is, or lies
  inside, an input (``model.hf_path``, ``data.path``, ``data.validation_path``, ``data.image_root``); the export,
  which replaces ``export.dir`` whole, may not contain an input either;
- the training data loads and holds rows (and the validation split, when one is configured);
- resume: ``checkpoint.resume=false`` with checkpoints already in ``checkpoint.dir`` is refused (it would mix two
  runs' checkpoints and metrics); a resume whose learning-rate schedule or global batch differs from the
  checkpoint's is refused with what differs and how to proceed.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from gemma4vl.config.schema import RunConfig
from gemma4vl.config.validate import ConfigError
from gemma4vl.data.config import Gemma4VLDataConfig


def latest_checkpoint_step(ckpt_dir: str | Path) -> int | None:
    """The step of the newest *complete* checkpoint in ``ckpt_dir`` (Megatron writes the tracker file only
    after every rank finished its save), or None."""
    tracker = Path(ckpt_dir) / "latest_checkpointed_iteration.txt"
    if not tracker.is_file():
        return None
    text = tracker.read_text().strip()
    return int(text) if text.isdigit() else None


def _writable_dir(key: str, path: Path) -> None:
    """Create ``path`` (and parents) and prove a file can be written there."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".gemma4vl-write-probe-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ConfigError(f"{key}={path}: not writable ({e.strerror or e}); choose a directory this user can "
                          "write") from e


def check_outputs(cfg: RunConfig) -> None:
    """The run directory, the checkpoint directory and the export's parent exist (created) and are writable."""
    _writable_dir("run_dir", Path(cfg.run_dir))
    if cfg.checkpoint.save_interval is not None:
        _writable_dir("checkpoint.dir", Path(cfg.checkpoint.dir))
    if cfg.export.enabled:
        _writable_dir("export.dir (its parent)", Path(cfg.export.dir).expanduser().absolute().parent)
    if cfg.export.enabled and cfg.export.format != "merged":
        _writable_dir("export.adapter_dir (its parent)", Path(cfg.export.adapter_dir).expanduser().absolute().parent)


def _inputs(cfg: RunConfig, hf_dir: Path) -> dict[str, Path]:
    d = cfg.data
    found = {"model.hf_path": hf_dir, "data.processor_path": Path(d.processor_path)}
    for key, value in (("data.path", d.path), ("data.validation_path", d.validation_path),
                       ("data.image_root", d.image_root)):
        if value and Path(value).expanduser().exists():
            found[key] = Path(value)
    return {k: v.expanduser().resolve() for k, v in found.items() if v.expanduser().exists()}


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def check_outputs_apart_from_inputs(cfg: RunConfig, hf_dir: Path) -> None:
    """No output directory is, or lies inside, an input; the export (replaced whole) contains no input."""
    inputs = _inputs(cfg, hf_dir)
    outputs = {"run_dir": Path(cfg.run_dir), "checkpoint.dir": Path(cfg.checkpoint.dir)}
    if cfg.export.enabled:
        outputs["export.dir"] = Path(cfg.export.dir)
    if cfg.export.enabled and cfg.export.format != "merged":
        outputs["export.adapter_dir"] = Path(cfg.export.adapter_dir)
    for out_key, out in outputs.items():
        out = out.expanduser().resolve()
        for in_key, src in inputs.items():
            if _inside(out, src):
                raise ConfigError(f"{out_key}={out} is inside the input {in_key}={src}: gemma4vl never writes into "
                                  "an input directory; choose an output directory elsewhere")
            if out_key.startswith("export.") and _inside(src, out):
                raise ConfigError(f"{out_key}={out} contains the input {in_key}={src}, and the export replaces "
                                  f"{out_key} whole; choose another {out_key}")


def check_data(d: Gemma4VLDataConfig) -> None:
    """The training split (and the validation split, when configured) load and hold at least one row."""
    from gemma4vl.data.sources import load_source

    splits = [("data.path", d.path, d.split)]
    if d.validation_split:
        splits.append(("data.validation_path" if d.validation_path else "data.path", d.validation_path or d.path,
                       d.validation_split))
    for key, path, split in splits:
        try:
            source = load_source(path, split, image_root=d.image_root, cache_dir=d.cache_dir, bad_rows=d.bad_rows)
        except (OSError, ValueError) as e:
            raise ConfigError(f"{key}={path} (split {split!r}): {e}") from e
        if len(source) == 0:
            raise ConfigError(f"{key}={path} (split {split!r}): no rows (an empty file?)")


def _checkpoint_config(ckpt_dir: Path, step: int) -> dict | None:
    import yaml

    path = ckpt_dir / f"iter_{step:07d}" / "run_config.yaml"
    if not path.is_file():
        return None
    with path.open() as f:
        return yaml.safe_load(f)


def check_resume(cfg: RunConfig) -> int | None:
    """The checkpoint step this run resumes from, or None; raises for a resume that cannot continue the run."""
    ckpt_dir = Path(cfg.checkpoint.dir)
    step = latest_checkpoint_step(ckpt_dir)
    if step is None:
        return None
    if not cfg.checkpoint.resume:
        raise ConfigError(f"checkpoint.resume=false, but checkpoint.dir={ckpt_dir} already holds this run's "
                          f"checkpoints (up to step {step}): set checkpoint.resume=true to continue it, or start a "
                          "new run in another directory (name=... or hydra.run.dir=...), or delete the old one")
    saved = _checkpoint_config(ckpt_dir, step)
    if saved is None:
        return step
    t, o = cfg.trainer, cfg.optim
    decay = o.decay_iters if o.decay_iters is not None else t.train_iters
    how = "optim.decay_iters" if o.decay_iters is not None else "trainer.train_iters (optim.decay_iters=null)"
    diffs = []
    checks = (
        ("trainer.global_batch_size", t.global_batch_size, saved["train"]["global_batch_size"]),
        (f"learning-rate decay iterations from {how}", decay, saved["scheduler"]["lr_decay_iters"]),
        ("optim.warmup_iters", o.warmup_iters, saved["scheduler"]["lr_warmup_iters"]),
        ("optim.decay_style", o.decay_style, saved["scheduler"]["lr_decay_style"]),
        ("optim.lr", o.lr, saved["optimizer"]["lr"]),
        ("optim.min_lr", o.min_lr, saved["optimizer"]["min_lr"]),
        ("optim.weight_decay", o.weight_decay, saved["optimizer"]["weight_decay"]),
    )
    for what, now, then in checks:
        if now != then:
            diffs.append(f"{what}: {now} now, {then} in the checkpoint")
    if diffs:
        hint = (f" To train longer on the checkpoint's schedule, add optim.decay_iters="
                f"{saved['scheduler']['lr_decay_iters']} and raise trainer.train_iters." if o.decay_iters is None else "")
        raise ConfigError(f"resuming from step {step} in checkpoint.dir={ckpt_dir} with a different schedule:\n  "
                          + "\n  ".join(diffs) + "\nRestore those values, or start a new run in another directory "
                          "(name=... / hydra.run.dir=...)." + hint)
    if t.train_iters < step:
        raise ConfigError(f"trainer.train_iters={t.train_iters} is below the checkpoint's step {step} in "
                          f"checkpoint.dir={ckpt_dir}")
    return step
