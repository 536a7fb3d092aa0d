"""The batch: what the collator produces, the forward step consumes, and answers / export checks / tests build.

:class:`Batch` holds the model's inputs (the keyword arguments of :meth:`gemma4vl.models.Gemma4VLModel.forward`,
listed once, in :meth:`Batch.model_kwargs`) and, kept apart from them, the data pipeline's bookkeeping of the rows
in it (:class:`RowReport`, read by the trainer's bad-row accounting). Shapes, for ``b`` rows of ``s`` tokens and
``n`` images of at most ``p`` patches:

- ``input_ids``, ``position_ids`` (restarting at 0 in every packed sample), ``segment_ids`` (sample number from 1,
  0 on padding), ``mm_token_type_ids`` (1 on image soft tokens): [b, s] int64;
- ``pixel_values`` [n, p, 3*patch*patch] float32 and ``image_position_ids`` [n, p, 2] (patch x, y; -1 on padding
  patches), both None when the batch has no image;
- ``labels`` [b, s] int64, already shifted (``labels[t]`` is the token the logits at ``t`` must predict),
  :data:`~gemma4vl.labels.IGNORE_INDEX` where no loss is wanted; None for a prompt (the model then returns logits).

Megatron-Bridge's training loop passes the DataLoader's items to our forward step untouched, so the collator
returns a :class:`Batch` itself (``pin_memory`` is here for ``DataLoader(pin_memory=True)``). This module
imports torch only.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from gemma4vl.labels import IGNORE_INDEX


@dataclass
class RowReport:
    """What the data pipeline reports about the rows of a batch (not a model input)."""

    bad_rows: list[tuple[int, str, str]] = field(default_factory=list)
    """(row, reason, message) of each row that failed to load while this batch was built although the length pass
    accepted it (``data.bad_rows=skip``; e.g. a truncated image body): counted by the trainer's skip accounting."""

    row_stats: tuple[int, int] | None = None
    """(rows of the split, rows the length pass refused for a bad-row reason), or None (not from a split)."""


@dataclass
class Batch:
    """One micro batch (see the module docstring for shapes)."""

    input_ids: torch.Tensor
    """Token ids [b, s] (images expanded to their soft tokens; padding holds the pad id)."""

    position_ids: torch.Tensor
    """RoPE positions [b, s], restarting at 0 in every packed sample."""

    segment_ids: torch.Tensor
    """Sample number [b, s] from 1 (0 on padding): attention never crosses samples."""

    mm_token_type_ids: torch.Tensor
    """1 on image soft tokens, else 0 [b, s]."""

    pixel_values: torch.Tensor | None = None
    """Patches of the batch's images in placeholder order [n, p, 3*patch*patch], or None."""

    image_position_ids: torch.Tensor | None = None
    """Patch (x, y) positions [n, p, 2] (-1 on padding patches), or None."""

    labels: torch.Tensor | None = None
    """Shifted targets [b, s], ``IGNORE_INDEX`` without loss; None: no loss (the model returns logits)."""

    rows: RowReport = field(default_factory=RowReport)
    """The data pipeline's report on the rows of this batch (never passed to the model)."""

    def model_kwargs(self) -> dict[str, torch.Tensor | None]:
        """The keyword inputs of :meth:`gemma4vl.models.Gemma4VLModel.forward` (the one list of them)."""
        return dict(input_ids=self.input_ids, position_ids=self.position_ids, segment_ids=self.segment_ids,
                    mm_token_type_ids=self.mm_token_type_ids, pixel_values=self.pixel_values,
                    image_position_ids=self.image_position_ids, labels=self.labels)

    def loss_mask(self) -> torch.Tensor:
        """1.0 where a label carries loss, else 0.0 [b, s] (needs ``labels``)."""
        if self.labels is None:
            raise ValueError("this batch has no labels (a prompt), so it has no loss mask")
        return (self.labels != IGNORE_INDEX).float()

    def hf_kwargs(self) -> dict[str, torch.Tensor]:
        """The same inputs for transformers' ``Gemma4ForConditionalGeneration`` (an attention mask from the
        segments instead of ``segment_ids`` / ``position_ids``; one sample per row)."""
        kwargs = dict(input_ids=self.input_ids, attention_mask=(self.segment_ids > 0).long(),
                      mm_token_type_ids=self.mm_token_type_ids)
        if self.pixel_values is not None:
            kwargs.update(pixel_values=self.pixel_values, image_position_ids=self.image_position_ids)
        return kwargs

    def _map(self, fn) -> Batch:
        tensors = {f.name: fn(getattr(self, f.name)) for f in dataclasses.fields(self)
                   if f.name != "rows" and getattr(self, f.name) is not None}
        return dataclasses.replace(self, **tensors)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """A batch with every tensor on ``device`` (the row report is shared)."""
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> Batch:
        """A batch with every tensor in pinned host memory (called by ``DataLoader(pin_memory=True)``)."""
        return self._map(lambda t: t.pin_memory())

    @classmethod
    def from_prompt(cls, prompt_ids, image_token_id: int, pixel_values: torch.Tensor | None = None,
                    image_position_ids: torch.Tensor | None = None) -> Batch:
        """A one-row batch of one prompt (no padding, no labels): positions 0..s-1, one segment, image tokens
        marked where ``prompt_ids`` holds ``image_token_id``. ``prompt_ids``: a sequence / array / tensor of
        token ids; ``pixel_values`` / ``image_position_ids``: the prompt's images (:func:`to_pixel_values`).
        On the device of ``prompt_ids`` when it is a tensor."""
        ids = torch.as_tensor(prompt_ids, dtype=torch.long)
        if ids.dim() != 1:
            raise ValueError(f"prompt_ids must be one sequence of token ids, got shape {tuple(ids.shape)}")
        ids = ids[None]
        return cls(input_ids=ids, position_ids=torch.arange(ids.shape[1], device=ids.device)[None],
                   segment_ids=torch.ones_like(ids), mm_token_type_ids=(ids == image_token_id).long(),
                   pixel_values=pixel_values, image_position_ids=image_position_ids)
