"""Rows that fail while training (``data.bad_rows=skip``): counted over all data-parallel ranks, logged, and held
to ``data.max_skipped_fraction`` together with the rows the length pass refused.

The length pass (packing plan) reads every row, but an image whose header is valid and whose body is truncated
only fails when it is decoded for training. The dataset skips such a row and reports it with the batch
(:class:`~gemma4vl.data.batch.RowReport`: ``bad_rows``: row, reason, message; ``row_stats``: rows of the split,
rows the length pass refused). The forward step hands each training batch's report to :class:`BadRowMonitor`;
after every step :class:`BadRowCallback` sums the new ones over the data-parallel group, logs this rank's (the
first ``log_limit``) and stops the run with an error naming the counts and the first rows once

    rows refused by the length pass + rows skipped while training > max_skipped_fraction * rows of the split.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
from megatron.bridge.training.callbacks import Callback, CallbackContext

from gemma4vl.data.batch import RowReport

logger = logging.getLogger("gemma4vl.data")


class TooManyBadRows(RuntimeError):
    """More than ``data.max_skipped_fraction`` of the training rows were refused."""


class BadRowMonitor:
    """Collects the bad rows of training batches on this rank (see module docstring)."""

    def __init__(self, max_skipped_fraction: float, log_limit: int):
        self.max_skipped_fraction = max_skipped_fraction
        self.log_limit = log_limit
        self.pending: list[tuple[int, str, str]] = []
        self.row_stats: tuple[int, int] | None = None
        self.total = 0
        """Rows skipped while training, summed over data-parallel ranks, up to the last finished step."""
        self.logged = 0
        self.examples: list[str] = []

    def record(self, report: RowReport) -> None:
        """Note the bad rows of one training micro batch (its :class:`~gemma4vl.data.batch.RowReport`)."""
        self.pending.extend(report.bad_rows)
        if report.row_stats is not None:
            self.row_stats = tuple(int(v) for v in report.row_stats)

    def _reduce(self, count: int) -> int:
        if not dist.is_initialized():
            return count
        from megatron.core import parallel_state

        group = parallel_state.get_data_parallel_group() if parallel_state.model_parallel_is_initialized() else None
        device = "cuda" if dist.get_backend(group) == "nccl" else "cpu"
        t = torch.tensor([count], dtype=torch.int64, device=device)
        dist.all_reduce(t, group=group)
        return int(t.item())

    def step_end(self, step: int) -> None:
        """Sum this step's bad rows over data-parallel ranks, log them, enforce the ceiling."""
        new, self.pending = self.pending, []
        for row, reason, message in new:
            if self.logged < self.log_limit:
                logger.warning("step %d: skipping bad row: %s", step, message)
                self.logged += 1
            if len(self.examples) < 3:
                self.examples.append(message)
        self.total += self._reduce(len(new))
        if self.row_stats is None or not self.total:
            return
        rows, refused = self.row_stats
        if refused + self.total > self.max_skipped_fraction * rows:
            raise TooManyBadRows(
                f"step {step}: {self.total} rows failed while training and {refused} were refused by the length "
                f"pass, {refused + self.total} of {rows} rows > data.max_skipped_fraction={self.max_skipped_fraction}"
                f" (first on this rank: {self.examples or 'none'})")


class BadRowCallback(Callback):
    """Runs :meth:`BadRowMonitor.step_end` after every training step."""

    def __init__(self, monitor: BadRowMonitor):
        self.monitor = monitor

    def on_train_step_end(self, context: CallbackContext) -> None:
        self.monitor.step_end(context.state.train_state.step + 1)
