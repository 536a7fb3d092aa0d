"""The map-style training dataset: item ``i`` is one training row (a packed sequence when packing is on).

Items follow the packing plan's sequences; the dataset is as long as the number of samples training asks for
(whole epochs of the plan; each epoch's sequence order is a permutation seeded by ``(seed, epoch)`` when
``shuffle``), so Megatron's sequential sampler can shard it by data-parallel rank and resume it from
``consumed_samples``: item ``i`` is the same on every rank, in every run, after every resume.

Rows are read, decoded and encoded when their item is asked for (in DataLoader workers); a row that the length
pass accepted but whose image data then fails to decode is handled by the bad-row policy: ``error`` raises (dataset,
row, reason), ``skip`` leaves it out of its sequence and counts it (``verify_images=True`` moves such failures into
the length pass).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch

from gemma4vl.data.collate import Collator, assemble_row
from gemma4vl.data.encoding import ConversationEncoder, Encoded
from gemma4vl.data.errors import LENGTH_REASONS, BadRowCounter, BadRowError
from gemma4vl.data.formats import Conversation, FormatSpec, parse_row
from gemma4vl.data.images import ImageLoader
from gemma4vl.data.plan import PackingPlan
from gemma4vl.data.sources import RowReader


@dataclasses.dataclass
class RowPipeline:
    """Row index -> conversation -> encoded sample, for one source."""

    reader: RowReader
    name: str
    fmt: str
    spec: FormatSpec
    encoder: ConversationEncoder
    loader: ImageLoader
    seq_length: int
    overlong: str = "truncate_turns"
    image_placeholder: str = "<image>"
    system_prompt: str | None = None
    verify_images: bool = False

    def conversation(self, index: int) -> Conversation:
        return parse_row(self.reader[index], self.fmt, self.spec, image_placeholder=self.image_placeholder,
                         system_prompt=self.system_prompt)

    def measure(self, index: int) -> tuple[int, int]:
        """(tokens, truncation) of row ``index``; images are only opened to read their size, unless
        ``verify_images``. Raises :class:`BadRowError`."""
        conv = self.conversation(index)
        if self.verify_images:
            enc = self.encoder.encode(conv, loader=self.loader, max_length=self.seq_length, overlong=self.overlong)
        else:
            sizes = [self.loader.size(v) for v in conv.images]
            enc = self.encoder.encode(conv, sizes=sizes, max_length=self.seq_length, overlong=self.overlong)
        return len(enc), enc.truncation

    def load(self, index: int, truncation: int = -1) -> Encoded:
        """Row ``index`` with decoded images, truncated as the length pass decided."""
        conv = self.conversation(index)
        if truncation >= 0:
            return self.encoder.encode(conv, loader=self.loader, overlong=self.overlong, truncation=truncation)
        return self.encoder.encode(conv, loader=self.loader, max_length=self.seq_length, overlong=self.overlong)


class Gemma4VLSFTDataset(torch.utils.data.Dataset):
    """Training rows of one split (see the module docstring); ``collate_fn`` batches them for the model."""

    def __init__(self, rows: RowPipeline, plan: PackingPlan, collator: Collator, *, num_samples: int = 0,
                 shuffle: bool = True, seed: int = 0, bad_rows: str = "error", log_limit: int = 10):
        if bad_rows not in ("error", "skip"):
            raise ValueError(f"bad_rows must be 'error' or 'skip', got {bad_rows!r}")
        if plan.num_bins == 0:
            raise ValueError(f"{rows.name}: the packing plan has no sequences")
        self.rows = rows
        self.plan = plan
        self.collate_fn = collator
        self.shuffle = shuffle
        self.seed = seed
        self.bad_rows = bad_rows
        self.skipped = BadRowCounter(rows.name, log_limit)
        self.row_stats = (plan.num_rows, sum(n for reason, n in plan.skipped().items() if reason not in LENGTH_REASONS))
        """(rows of the split, rows the length pass refused for a reason other than length): sent with every item
        for the trainer's skip accounting; computed once (a pass over the plan's status array)."""
        bins = plan.num_bins
        self.num_epochs = max(1, -(-int(num_samples) // bins)) if num_samples else 1
        self._perm: tuple[int, np.ndarray] | None = None

    @property
    def name(self) -> str:
        return self.rows.name

    def __len__(self) -> int:
        return self.num_epochs * self.plan.num_bins

    def bin_of(self, index: int) -> int:
        """The plan sequence behind item ``index``."""
        if not 0 <= index < len(self):
            raise IndexError(f"item {index} out of range for {len(self)} items")
        epoch, k = divmod(int(index), self.plan.num_bins)
        if not self.shuffle:
            return k
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.plan.num_bins))
        return int(self._perm[1][k])

    def samples(self, index: int) -> list[tuple[int, Encoded]]:
        """(row, encoded sample) of item ``index``, bad rows handled by the policy."""
        return self._samples(index)[0]

    def _samples(self, index: int) -> tuple[list[tuple[int, Encoded]], list[tuple[int, str, str]]]:
        out, bad = [], []
        for row in self.rows_of(index):
            try:
                enc = self.rows.load(row, int(self.plan.truncation[row]))
            except BadRowError as e:
                located = e.located(self.name, row)
                if self.bad_rows == "error" or e.fatal:
                    raise located from None
                self.skipped.add(located, log=False)
                bad.append((row, e.reason, str(located)))
                continue
            if len(enc) != int(self.plan.lengths[row]):
                raise RuntimeError(f"{self.name} row {row} encodes to {len(enc)} tokens but the packing plan says "
                                   f"{int(self.plan.lengths[row])}: the data, processor or settings changed after "
                                   "the plan was cached (delete the plan file to rebuild it)")
            out.append((row, enc))
        return out, bad

    def rows_of(self, index: int) -> list[int]:
        return [int(r) for r in self.plan.rows_of(self.bin_of(index))]

    def __getitem__(self, index: int) -> dict[str, Any]:
        """The packed row of item ``index``, with ``bad_rows``: (row, reason, message) of the rows that failed to
        load now although the length pass accepted them (e.g. a truncated image body), and ``row_stats``: the
        split's (rows, rows the length pass refused), so the trainer can hold the total to
        ``max_skipped_fraction``."""
        samples, bad = self._samples(index)
        item = assemble_row([enc for _, enc in samples], self.rows.encoder.image_token_id)
        item["bad_rows"] = bad
        item["row_stats"] = self.row_stats
        return item


