"""torch.distributed and Megatron-Core model-parallel setup and teardown, on ``cpu`` (gloo) or ``cuda`` (NCCL).

:func:`initialize_model_parallel` is the one entry point: it prepares the runtime for the device
(:func:`gemma4vl.runtime.setup_runtime`), initialises ``torch.distributed`` if nobody has yet, checks the
parallel sizes against the world size (with the arithmetic spelled out), creates Megatron-Core's process groups
and seeds Megatron's RNG tracker. :func:`destroy_model_parallel` undoes all of it, so a test can initialise again
with other sizes in the same process.

Where the world comes from:

- a process group that already exists (e.g. made by :func:`gemma4vl.testing.distributed.run_distributed`): used
  as is, provided its backend suits the device (gloo for ``cpu``, NCCL for ``cuda``);
- otherwise the torchrun variables ``RANK`` / ``WORLD_SIZE`` / ``MASTER_ADDR`` / ``MASTER_PORT`` (and
  ``LOCAL_RANK`` for the CUDA device index) when ``RANK`` and ``WORLD_SIZE`` are set;
- otherwise a single process (rank 0 of 1) on a free localhost port.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from gemma4vl.runtime import setup_runtime

_BACKEND_FOR_DEVICE = {"cpu": "gloo", "cuda": "nccl"}
_TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")

# True while this module owns the torch.distributed process group (it created it, so it destroys it).
_owns_process_group = False


class ParallelSizeError(ValueError):
    """The requested parallel sizes do not fit the world size."""


@dataclass(frozen=True)
class ParallelLayout:
    """The parallel sizes of one run, derived data-parallel sizes included."""

    world_size: int
    tensor: int
    pipeline: int
    context: int
    expert: int
    expert_tensor: int

    @property
    def data(self) -> int:
        return self.world_size // (self.tensor * self.pipeline * self.context)

    @property
    def expert_data(self) -> int:
        return self.world_size // (self.expert_tensor * self.expert * self.pipeline)


def check_parallel_sizes(
    world_size: int,
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    expert_model_parallel_size: int = 1,
    expert_tensor_parallel_size: int | None = None,
    context_parallel_size: int = 1,
) -> ParallelLayout:
    """Validate the sizes for ``world_size`` ranks and return the layout; raise :class:`ParallelSizeError` if not.

    Dense layers use ``world = TP * CP * DP * PP``; expert layers use ``world = ETP * EP * EDP * PP`` with
    ``ETP`` defaulting to ``TP`` (Megatron-Core's convention).
    """
    sizes = {
        "tensor_model_parallel_size": tensor_model_parallel_size,
        "pipeline_model_parallel_size": pipeline_model_parallel_size,
        "expert_model_parallel_size": expert_model_parallel_size,
        "context_parallel_size": context_parallel_size,
    }
    if expert_tensor_parallel_size is not None:
        sizes["expert_tensor_parallel_size"] = expert_tensor_parallel_size
    for name, size in sizes.items():
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise ParallelSizeError(f"{name} must be a positive integer, got {size!r}")

    tp, pp, cp, ep = (
        tensor_model_parallel_size,
        pipeline_model_parallel_size,
        context_parallel_size,
        expert_model_parallel_size,
    )
    etp = tp if expert_tensor_parallel_size is None else expert_tensor_parallel_size
    model_size = tp * pp * cp
    if world_size % model_size:
        raise ParallelSizeError(
            f"world size {world_size} is not divisible by TP {tp} * PP {pp} * CP {cp} = {model_size}: "
            f"DP = world {world_size} / {model_size} = {world_size / model_size:g} is not an integer"
        )
    expert_size = etp * ep * pp
    if world_size % expert_size:
        raise ParallelSizeError(
            f"world size {world_size} is not divisible by ETP {etp} * EP {ep} * PP {pp} = {expert_size}: "
            f"expert DP = world {world_size} / {expert_size} = {world_size / expert_size:g} is not an integer"
            + (" (ETP defaults to TP)" if expert_tensor_parallel_size is None else "")
        )
    return ParallelLayout(world_size, tp, pp, cp, ep, etp)


def describe_layout(layout: ParallelLayout) -> str:
    """One line with the layout and its arithmetic, e.g. for logs and error messages."""
    return (
        f"DP = world {layout.world_size} / (TP {layout.tensor} * PP {layout.pipeline} * CP {layout.context}) "
        f"= {layout.data}; expert DP = world {layout.world_size} / (ETP {layout.expert_tensor} * "
        f"EP {layout.expert} * PP {layout.pipeline}) = {layout.expert_data}"
    )


def _free_localhost_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _init_process_group(device: str) -> None:
    """Create the default process group from the torchrun variables, or as a single process."""
    global _owns_process_group
    backend = _BACKEND_FOR_DEVICE[device]
    present = [name for name in _TORCHRUN_VARIABLES if name in os.environ]
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        missing = [name for name in _TORCHRUN_VARIABLES if name not in os.environ]
        if missing:
            raise RuntimeError(f"RANK and WORLD_SIZE are set but {', '.join(missing)} is not (torchrun sets all)")
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        init_method = "env://"
    elif present:
        raise RuntimeError(f"incomplete torchrun environment: only {', '.join(present)} set")
    else:
        rank, world_size = 0, 1
        init_method = f"tcp://127.0.0.1:{_free_localhost_port()}"
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(
        backend=backend, init_method=init_method, rank=rank, world_size=world_size, timeout=timedelta(minutes=10)
    )
    _owns_process_group = True


def _check_existing_backend(device: str) -> None:
    backend = dist.get_backend()
    expected = _BACKEND_FOR_DEVICE[device]
    if expected not in str(backend):
        raise RuntimeError(
            f"torch.distributed is already initialised with backend {backend!r}, but device={device!r} needs "
            f"{expected!r}"
        )


def initialize_model_parallel(
    device: str,
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    expert_model_parallel_size: int = 1,
    expert_tensor_parallel_size: int | None = None,
    context_parallel_size: int = 1,
    seed: int = 1234,
) -> ParallelLayout:
    """Set up the runtime, ``torch.distributed`` and Megatron-Core's parallel groups and RNG; return the layout.

    Seeding is Megatron's ``model_parallel_cuda_manual_seed(seed)`` (on ``cpu`` it seeds the CPU generator
    through the CPU backend): the default generator gets ``seed``, the tensor-parallel tracker state
    ``seed + 2718 + tp_rank``, the expert tracker state ``seed + 1024 + 100 * ep_rank + etp_rank``.
    """
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    setup_runtime(device)
    if parallel_state.model_parallel_is_initialized():
        raise RuntimeError("Megatron model parallel is already initialised; call destroy_model_parallel() first")
    if dist.is_initialized():
        _check_existing_backend(device)
    else:
        _init_process_group(device)

    layout = check_parallel_sizes(
        dist.get_world_size(),
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        expert_model_parallel_size=expert_model_parallel_size,
        expert_tensor_parallel_size=expert_tensor_parallel_size,
        context_parallel_size=context_parallel_size,
    )
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tensor,
        pipeline_model_parallel_size=layout.pipeline,
        context_parallel_size=layout.context,
        expert_model_parallel_size=layout.expert,
        expert_tensor_parallel_size=layout.expert_tensor,
    )
    model_parallel_cuda_manual_seed(seed, force_reset_rng=True)
    return layout


def destroy_model_parallel() -> None:
    """Tear down Megatron's parallel groups and RNG tracker, and the process group if this module created it."""
    global _owns_process_group
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    parallel_state.destroy_model_parallel()
    get_cuda_rng_tracker().reset()
    if _owns_process_group and dist.is_initialized():
        dist.destroy_process_group()
    _owns_process_group = False
