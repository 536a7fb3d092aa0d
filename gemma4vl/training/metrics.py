"""A run's metrics history, ``<run_dir>/metrics.jsonl``: one JSON object per line, each with the ``step`` it
belongs to. :class:`MetricsLog` is the one reader and writer:

- training steps ``{"step", "loss", "grad_norm", "lr", "seconds", "real_tokens", "samples", "skipped"}`` and
  evaluations ``{"step", "val_loss"}`` (:class:`gemma4vl.training.callbacks.ProgressCallback`, last rank);
- validation answers ``{"step", "val_answer_accuracy", "val_answers"}``
  (:class:`gemma4vl.training.callbacks.ValidationAnswersCallback`, last rank);
- export checks ``{"step", "export_max_logit_diff", ...}`` / ``{"step", "adapter_base_tensors_identical", ...}``
  (:mod:`gemma4vl.training.export_check`, rank 0), the step being the one exported.

With ``logger=wandb`` the same records go to the run's wandb run (on the rank that holds it): its numbers, at
the record's step; Megatron-Bridge itself does not log to wandb (its TensorBoard writer still runs).

Strict JSON: a non-finite float (the loss of a step whose rows were all skipped) is written as ``null``. On a
resume the records after the checkpoint's step are dropped (:meth:`MetricsLog.truncate_after`), so each step is
recorded once.
"""

from __future__ import annotations

import json
import math
from pathlib import Path


class MetricsLog:
    """``<run_dir>/metrics.jsonl`` (see the module docstring)."""

    def __init__(self, run_dir: str | Path, wandb_run=None):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.wandb_run = wandb_run
        """The wandb run records also go to (:func:`gemma4vl.training.finetune.init_wandb`), or None."""

    def append(self, record: dict) -> None:
        """Add ``record`` (a dict with an int ``step``) as one line; non-finite floats become null."""
        if not isinstance(record.get("step"), int):
            raise ValueError(f"a metrics record needs an int 'step': {record}")
        record = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        with self.path.open("a") as f:
            f.write(json.dumps(record, allow_nan=False) + "\n")
        if self.wandb_run is not None:
            numbers = {k: v for k, v in record.items()
                       if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
            self.wandb_run.log(numbers, step=record["step"])

    def read(self) -> list[dict]:
        """The records in order (empty when the run has not logged yet)."""
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def truncate_after(self, step: int) -> None:
        """Drop the records of steps after ``step``: all of them on a fresh start (0), those after the checkpoint on
        a resume (they are recomputed)."""
        if self.path.exists():
            kept = [r for r in self.read() if r["step"] <= step]
            self.path.write_text("".join(json.dumps(r, allow_nan=False) + "\n" for r in kept))


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The records of ``<run_dir>/metrics.jsonl`` in order (:meth:`MetricsLog.read`)."""
    return MetricsLog(run_dir).read()
