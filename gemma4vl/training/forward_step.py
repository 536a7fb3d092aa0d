"""The forward step Megatron-Bridge's training loop calls once per micro batch.

A batch is the data pipeline's :class:`~gemma4vl.data.batch.Batch` (the collator's output): the model's keyword
inputs with ``labels`` (already shifted, ``IGNORE_INDEX`` where no loss is wanted: everything but assistant
tokens), and the rows' bad-row report, which goes to the trainer's accounting. The model returns the per-token
loss; the loss function reduces it to (sum, token count, metrics), so Megatron averages
over the real target tokens of the whole global batch.
"""

from __future__ import annotations

from functools import partial
from typing import Iterable

import torch
from megatron.bridge.training.losses import masked_next_token_loss
from megatron.bridge.training.state import GlobalState

from gemma4vl.data.batch import Batch


def _device(model) -> torch.device:
    return next(p.device for p in model.parameters())


class TokenCounter:
    """Real tokens and samples of the training micro batches seen since the last :meth:`take` (this rank).

    A *real token* is a sequence position holding a token of a sample (``segment_ids > 0``): padding is not
    counted, prompt and image tokens are (they are processed like the answer tokens). A *sample* is one packed
    sample (segments are numbered from 1 in each row, so a row's largest segment id is its sample count)."""

    def __init__(self):
        self.real_tokens = 0
        self.samples = 0

    def record(self, batch: Batch) -> None:
        segments = batch.segment_ids
        self.real_tokens += int((segments > 0).sum())
        self.samples += int(segments.max(dim=-1).values.sum()) if segments.numel() else 0

    def take(self) -> tuple[int, int]:
        counts = (self.real_tokens, self.samples)
        self.real_tokens = self.samples = 0
        return counts


class ForwardStep:
    """:func:`forward_step` that also hands each training batch's skipped rows to a
    :class:`~gemma4vl.training.bad_rows.BadRowMonitor` and its tokens to a :class:`TokenCounter`."""

    def __init__(self, monitor, counter: TokenCounter | None = None):
        self.monitor = monitor
        self.counter = counter

    def __call__(self, state: GlobalState, data_iterator: Iterable, model) -> tuple[torch.Tensor, partial]:
        return forward_step(state, data_iterator, model, monitor=self.monitor, counter=self.counter)


def forward_step(state: GlobalState, data_iterator: Iterable, model, monitor=None,
                 counter: TokenCounter | None = None) -> tuple[torch.Tensor, partial]:
    """One micro batch: (per-token loss [b, s], loss function)."""
    timers = state.timers
    timers("batch-generator", log_level=2).start()
    batch: Batch = next(data_iterator)
    if monitor is not None and model.training:
        monitor.record(batch.rows)
    if counter is not None and model.training:
        counter.record(batch)
    batch = batch.to(_device(model), non_blocking=True)
    timers("batch-generator").stop()
    output = model(**batch.model_kwargs())
    check_nan = state.cfg.rerun_state_machine.check_for_nan_in_loss
    return output, partial(masked_next_token_loss, batch.loss_mask(), check_for_nan_in_loss=check_nan,
                           check_for_spiky_loss=False)
