"""Training rows and batches in the form :class:`gemma4vl.models.Gemma4VLModel` consumes.

A row holds one sample or several packed back to back. Per token:

- ``input_ids``; ``position_ids`` restarting at 0 in every sample (RoPE positions per sample);
- ``segment_ids``: the sample number from 1 (0 on padding), so attention never crosses samples;
- ``mm_token_type_ids``: 1 on image soft tokens (each image is one run of them inside one sample, so its
  bidirectional block stays inside the image);
- ``labels``, already shifted: ``labels[t]`` is the token the logits at ``t`` must predict (``input_ids[t+1]`` of
  the same sample) where that token is an assistant target, else ``IGNORE_INDEX`` (-100). The last token of a
  sample has no label, so no sample is trained to predict its neighbour's first token.

The :class:`Collator` stacks rows into a :class:`~gemma4vl.data.batch.Batch`: ``[b, s]`` tensors (int64) padded
to ``seq_length`` (or to the longest row rounded up to ``pad_to_multiple_of``), the images of the batch
concatenated in row-major placeholder order into ``pixel_values`` [n, max_patches, 3*p*p] float32 /
``image_position_ids`` [n, max_patches, 2] (both ``None`` when the batch has no image), and the rows' bad-row
report.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
import torch

from gemma4vl.data.batch import Batch, RowReport
from gemma4vl.data.encoding import Encoded
from gemma4vl.data.images import ImageSettings, to_pixel_values
from gemma4vl.labels import IGNORE_INDEX


def shifted_labels(enc: Encoded) -> np.ndarray:
    labels = np.full(len(enc), IGNORE_INDEX, dtype=np.int64)
    labels[:-1] = np.where(enc.target[1:], enc.input_ids[1:], IGNORE_INDEX)
    return labels


def assemble_row(samples: Sequence[Encoded], image_token_id: int) -> dict:
    """One training row from encoded samples (packed in the given order); unpadded."""
    if not samples:
        empty = torch.zeros(0, dtype=torch.int32)
        return {"input_ids": empty, "labels": empty.long(), "position_ids": empty, "segment_ids": empty,
                "mm_token_type_ids": empty, "images": [], "num_samples": 0}
    ids = np.concatenate([s.input_ids for s in samples]).astype(np.int32)
    labels = np.concatenate([shifted_labels(s) for s in samples])
    positions = np.concatenate([np.arange(len(s), dtype=np.int32) for s in samples])
    segments = np.concatenate([np.full(len(s), k + 1, dtype=np.int32) for k, s in enumerate(samples)])
    images = [(im.pixels, im.grid) for s in samples for im in s.images]
    return {
        "input_ids": torch.from_numpy(ids),
        "labels": torch.from_numpy(labels),
        "position_ids": torch.from_numpy(positions),
        "segment_ids": torch.from_numpy(segments),
        "mm_token_type_ids": torch.from_numpy((ids == image_token_id).astype(np.int32)),
        "images": images,
        "num_samples": len(samples),
    }


@dataclasses.dataclass
class Collator:
    """Rows -> a :class:`~gemma4vl.data.batch.Batch` (see the module docstring)."""

    settings: ImageSettings
    """Image settings (patch size, budget) that fix the pixel tensor layout."""
    pad_token_id: int
    """Token id written into padding positions."""
    seq_length: int
    """Maximum tokens per row; rows are padded to it when ``pad_to_seq_length``."""
    pad_to_seq_length: bool = True
    """Pad every batch to ``seq_length`` (fixed shapes, needed with pipeline parallelism); else to the longest row
    rounded up to ``pad_to_multiple_of``."""
    pad_to_multiple_of: int = 64
    """Rounding of the padded length when not padding to ``seq_length``."""

    def padded_length(self, longest: int) -> int:
        if longest > self.seq_length:
            raise ValueError(f"a row of {longest} tokens exceeds seq_length {self.seq_length}")
        if self.pad_to_seq_length:
            return self.seq_length
        m = max(self.pad_to_multiple_of, 1)
        return min(max(-(-longest // m) * m, m), max(self.seq_length, longest))

    def __call__(self, rows: Sequence[dict]) -> Batch:
        if not rows:
            raise ValueError("cannot collate an empty batch")
        b, s = len(rows), self.padded_length(max(int(r["input_ids"].shape[0]) for r in rows))
        out = {
            "input_ids": torch.full((b, s), self.pad_token_id, dtype=torch.long),
            "position_ids": torch.zeros((b, s), dtype=torch.long),
            "segment_ids": torch.zeros((b, s), dtype=torch.long),
            "mm_token_type_ids": torch.zeros((b, s), dtype=torch.long),
            "labels": torch.full((b, s), IGNORE_INDEX, dtype=torch.long),
        }
        images = []
        for i, row in enumerate(rows):
            n = int(row["input_ids"].shape[0])
            for key in ("input_ids", "position_ids", "segment_ids", "mm_token_type_ids", "labels"):
                out[key][i, :n] = row[key]
            images.extend(row["images"])
        pixels = positions = None
        if images:
            pixels, positions = to_pixel_values(images, self.settings)
        # Rows skipped while loading (bad_rows=skip) and the split's row counts, for the trainer's skip accounting.
        report = RowReport(bad_rows=[bad for row in rows for bad in row.get("bad_rows", ())],
                           row_stats=rows[0].get("row_stats"))
        return Batch(**out, pixel_values=pixels, image_position_ids=positions, rows=report)
