"""The parallel-size arithmetic, once: which layouts fit a world size, and the data-parallel sizes they imply.

Pure (no ``torch.distributed``): :func:`gemma4vl.config.validate.validate` calls it before any weight is loaded,
:func:`gemma4vl.runtime.distributed.initialize_model_parallel` before creating Megatron-Core's groups. Megatron-Core's
convention: dense layers use ``world = TP * CP * DP * PP``; expert layers use ``world = ETP * EP * EDP * PP``, with
``ETP`` defaulting to ``TP``. For example, 8 ranks with TP 2, EP 4, ETP 1: ``DP = 8 / (TP 2 * PP 1 * CP 1) = 4``,
``expert DP = 8 / (ETP 1 * EP 4 * PP 1) = 2``.
"""

from __future__ import annotations

from dataclasses import dataclass


class ParallelSizeError(ValueError):
    """The requested parallel sizes do not fit the world size."""


@dataclass(frozen=True)
class ParallelLayout:
    """The parallel sizes of one run, derived data-parallel sizes included."""

    world_size: int
    """Number of ranks (processes, one per device)."""

    tensor: int
    """Tensor parallel size (TP)."""

    pipeline: int
    """Pipeline parallel size (PP)."""

    context: int
    """Context parallel size (CP)."""

    expert: int
    """Expert parallel size (EP)."""

    expert_tensor: int
    """Expert tensor parallel size (ETP) of the routed experts."""

    @property
    def data(self) -> int:
        """Data parallel size of the dense layers: ``world / (TP * PP * CP)``."""
        return self.world_size // (self.tensor * self.pipeline * self.context)

    @property
    def expert_data(self) -> int:
        """Data parallel size of the expert layers: ``world / (ETP * EP * PP)``."""
        return self.world_size // (self.expert_tensor * self.expert * self.pipeline)

    def describe(self) -> str:
        """One line with the layout and its arithmetic, for logs and error messages."""
        return (
            f"DP = world {self.world_size} / (TP {self.tensor} * PP {self.pipeline} * CP {self.context}) "
            f"= {self.data}; expert DP = world {self.world_size} / (ETP {self.expert_tensor} * "
            f"EP {self.expert} * PP {self.pipeline}) = {self.expert_data}"
        )


def parallel_layout(
    world_size: int,
    *,
    tensor: int = 1,
    pipeline: int = 1,
    context: int = 1,
    expert: int = 1,
    expert_tensor: int | None = None,
) -> ParallelLayout:
    """The layout of these sizes on ``world_size`` ranks; :class:`ParallelSizeError` with the arithmetic if none.

    ``expert_tensor=None`` means ETP = TP (Megatron-Core's default).
    """
    sizes = {"world size": world_size, "TP": tensor, "PP": pipeline, "CP": context, "EP": expert}
    if expert_tensor is not None:
        sizes["ETP"] = expert_tensor
    for name, size in sizes.items():
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise ParallelSizeError(f"{name} must be a positive integer, got {size!r}")
    etp = tensor if expert_tensor is None else expert_tensor
    model_size = tensor * pipeline * context
    if world_size % model_size:
        raise ParallelSizeError(
            f"world size {world_size} is not divisible by TP {tensor} * PP {pipeline} * CP {context} = {model_size}: "
            f"DP = world {world_size} / {model_size} = {world_size / model_size:g} is not an integer"
        )
    expert_size = etp * expert * pipeline
    if world_size % expert_size:
        raise ParallelSizeError(
            f"world size {world_size} is not divisible by ETP {etp} * EP {expert} * PP {pipeline} = {expert_size}: "
            f"expert DP = world {world_size} / {expert_size} = {world_size / expert_size:g} is not an integer"
            + (" (ETP defaults to TP)" if expert_tensor is None else "")
        )
    return ParallelLayout(world_size, tensor, pipeline, context, expert, etp)
