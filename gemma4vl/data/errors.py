"""Bad rows: the reasons a row can be refused, the error raised under ``bad_rows="error"`` and the counter kept
under ``bad_rows="skip"``.

Every refusal names the dataset, the split, the row index and the reason (a short code from :data:`REASONS` plus a
sentence saying what was found and what was expected), so a bad row in a 10M-row dataset can be found and fixed.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter

logger = logging.getLogger("gemma4vl.data")

# Reason codes (stable: they are stored in cached packing plans as their index in this tuple).
REASONS: tuple[str, ...] = (
    "ok",
    "malformed_row",  # a column is missing or has the wrong type
    "empty_conversation",  # no messages / only empty ones
    "unknown_role",  # a role the format's role map does not know
    "no_assistant_turn",  # nothing to learn from
    "first_turn_is_assistant",  # no prompt before the first answer
    "image_count_mismatch",  # placeholders != images
    "missing_image",  # image file not found
    "corrupt_image",  # bytes that do not decode as an image
    "image_too_large",  # header claims more pixels / bytes than allowed (decompression bombs)
    "image_path_escapes_root",  # a path that resolves outside the image root
    "unsupported_image",  # a URL, or an image value of an unknown kind
    "template_error",  # the chat template rejected the conversation
    "too_long",  # longer than seq_length and the length policy could not shorten it
)
REASON_CODES: dict[str, int] = {name: i for i, name in enumerate(REASONS)}

# Reasons that are about length, governed by `overlong`, not by `bad_rows`.
LENGTH_REASONS = frozenset({"too_long"})


class BadRowError(ValueError):
    """A row the pipeline refuses (raised under ``bad_rows="error"``; counted under ``"skip"``)."""

    def __init__(self, reason: str, detail: str, *, dataset: str | None = None, row: int | None = None,
                 fatal: bool = False):
        if reason not in REASON_CODES:
            raise ValueError(f"unknown bad-row reason {reason!r}")
        self.fatal = fatal
        """Raised whatever the ``bad_rows`` policy (e.g. ``overlong="error"``)."""
        self.reason = reason
        self.detail = detail
        self.dataset = dataset
        self.row = row
        super().__init__(self._message())

    def __reduce__(self):  # picklable across length-pass processes and DataLoader workers
        return (_rebuild, (self.reason, self.detail, self.dataset, self.row, self.fatal))

    def _message(self) -> str:
        where = []
        if self.dataset is not None:
            where.append(f"dataset {self.dataset}")
        if self.row is not None:
            where.append(f"row {self.row}")
        prefix = f"{', '.join(where)}: " if where else ""
        return f"{prefix}{self.reason}: {self.detail}"

    def located(self, dataset: str, row: int) -> "BadRowError":
        """The same error with its dataset and row filled in (raised where they are known)."""
        return BadRowError(self.reason, self.detail, dataset=dataset, row=row, fatal=self.fatal)


def _rebuild(reason: str, detail: str, dataset: str | None, row: int | None, fatal: bool = False) -> BadRowError:
    return BadRowError(reason, detail, dataset=dataset, row=row, fatal=fatal)


@dataclasses.dataclass
class BadRowCounter:
    """Counts refused rows per reason and logs the first ``log_limit`` of them with their reasons."""

    dataset: str
    """Name used in messages (the source and split)."""
    log_limit: int = 10
    """How many refusals are logged one by one; later ones are only counted."""
    counts: Counter = dataclasses.field(default_factory=Counter)
    """Refusals per reason code."""
    examples: list[str] = dataclasses.field(default_factory=list)
    """The first ``log_limit`` refusal messages."""

    def add(self, error: BadRowError, *, log: bool = True) -> None:
        self.counts[error.reason] += 1
        if len(self.examples) < self.log_limit:
            self.examples.append(str(error))
            if log:
                logger.warning("skipping bad row: %s", error)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def merge(self, other: "BadRowCounter") -> None:
        self.counts.update(other.counts)
        room = self.log_limit - len(self.examples)
        self.examples.extend(other.examples[: max(room, 0)])

    def summary(self, num_rows: int) -> str:
        if not self.counts:
            return f"{self.dataset}: all {num_rows} rows usable"
        parts = ", ".join(f"{reason} {n}" for reason, n in sorted(self.counts.items(), key=lambda kv: -kv[1]))
        return f"{self.dataset}: skipped {self.total} of {num_rows} rows ({parts})"
