"""The forward step Megatron-Bridge's training loop calls once per micro batch.

A batch is the data pipeline's collate output (:mod:`gemma4vl.data.collate`): the model's keyword inputs plus
``labels`` (already shifted, ``-100`` where no loss is wanted: everything but assistant tokens). The model
returns the per-token loss; the loss function reduces it to (sum, token count, metrics), so Megatron averages
over the real target tokens of the whole global batch.
"""

from __future__ import annotations

from functools import partial
from typing import Iterable

import torch
from megatron.bridge.training.losses import masked_next_token_loss
from megatron.bridge.training.state import GlobalState

from gemma4vl.models import IGNORE_INDEX

MODEL_INPUTS = ("input_ids", "position_ids", "segment_ids", "mm_token_type_ids", "pixel_values",
                "image_position_ids", "labels")


def _device(model) -> torch.device:
    return next(p.device for p in model.parameters())


class ForwardStep:
    """:func:`forward_step` that also hands each training batch's skipped rows to a
    :class:`~gemma4vl.training.bad_rows.BadRowMonitor`."""

    def __init__(self, monitor):
        self.monitor = monitor

    def __call__(self, state: GlobalState, data_iterator: Iterable, model) -> tuple[torch.Tensor, partial]:
        return forward_step(state, data_iterator, model, monitor=self.monitor)


def forward_step(state: GlobalState, data_iterator: Iterable, model, monitor=None) -> tuple[torch.Tensor, partial]:
    """One micro batch: (per-token loss [b, s], loss function)."""
    timers = state.timers
    timers("batch-generator", log_level=2).start()
    batch = next(data_iterator)
    if monitor is not None and model.training:
        monitor.record(batch)
    device = _device(model)
    inputs = {k: (batch[k].to(device, non_blocking=True) if batch.get(k) is not None else None)
              for k in MODEL_INPUTS}
    timers("batch-generator").stop()
    loss_mask = (inputs["labels"] != IGNORE_INDEX).float()
    output = model(**inputs)
    check_nan = state.cfg.rerun_state_machine.check_for_nan_in_loss
    return output, partial(masked_next_token_loss, loss_mask, check_for_nan_in_loss=check_nan,
                           check_for_spiky_loss=False)
