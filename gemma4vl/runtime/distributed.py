"""torch.distributed and Megatron-Core model-parallel setup and teardown, on ``cpu`` (gloo) or ``cuda`` (NCCL).

The one owner of the default process group: :func:`init_process_group` / :func:`destroy_process_group` (used by the
training recipe through :func:`gemma4vl.training.finetune.finetune`), and :func:`initialize_model_parallel` /
:func:`destroy_model_parallel`, which also prepare the runtime for the device
(:func:`gemma4vl.runtime.setup_runtime`), check the parallel sizes against the world size
(:func:`gemma4vl.config.parallel.parallel_layout`, the arithmetic spelled out), create Megatron-Core's process
groups and seed Megatron's RNG tracker, and undo all of it, so a test can initialise again with other sizes.

Where the world comes from (one set of rules):

- a process group that already exists (e.g. made by :func:`gemma4vl.testing.distributed.run_distributed`): used
  as is, provided its backend suits the device (gloo for ``cpu``, NCCL for ``cuda``); it is not destroyed here;
- otherwise the torchrun variables ``RANK`` / ``WORLD_SIZE`` / ``MASTER_ADDR`` / ``MASTER_PORT`` when ``RANK`` and
  ``WORLD_SIZE`` are set (torchrun, and ``launch/finetune.sh`` under srun, set all four), with ``LOCAL_RANK``
  selecting the CUDA device; some but not all of them set is an error;
- otherwise a single process (rank 0 of 1) over an in-memory store: no TCP port, so concurrent single-process runs
  on one machine cannot collide.

Collectives wait ``timeout_minutes`` for the other ranks (the recipe passes ``trainer.distributed_timeout_minutes``).
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

from gemma4vl.config.parallel import ParallelLayout, parallel_layout
from gemma4vl.runtime import setup_runtime

_BACKEND_FOR_DEVICE = {"cpu": "gloo", "cuda": "nccl"}
_TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")

# True while this module owns the torch.distributed process group (it created it, so it destroys it).
_owns_process_group = False


def _check_existing_backend(device: str) -> None:
    backend = dist.get_backend()
    expected = _BACKEND_FOR_DEVICE[device]
    if expected not in str(backend):
        raise RuntimeError(
            f"torch.distributed is already initialised with backend {backend!r}, but device={device!r} needs "
            f"{expected!r}"
        )


def init_process_group(device: str, timeout_minutes: int = 10) -> None:
    """Create the default process group for ``device`` by the rules of the module docstring (or check the existing
    one's backend). ``timeout_minutes``: how long collectives wait for the other ranks."""
    global _owns_process_group
    if timeout_minutes < 1:
        raise ValueError(f"trainer.distributed_timeout_minutes={timeout_minutes} must be >= 1")
    if device not in _BACKEND_FOR_DEVICE:
        raise ValueError(f"device must be one of {', '.join(map(repr, _BACKEND_FOR_DEVICE))}; got {device!r}")
    if dist.is_initialized():
        _check_existing_backend(device)
        return
    present = [name for name in _TORCHRUN_VARIABLES if name in os.environ]
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        missing = [name for name in _TORCHRUN_VARIABLES if name not in os.environ]
        if missing:
            raise RuntimeError(f"RANK and WORLD_SIZE are set but {', '.join(missing)} is not (torchrun sets all)")
        world = {"init_method": "env://", "rank": int(os.environ["RANK"]), "world_size": int(os.environ["WORLD_SIZE"])}
    elif present:
        raise RuntimeError(f"incomplete torchrun environment: only {', '.join(present)} set")
    else:
        world = {"store": dist.HashStore(), "rank": 0, "world_size": 1}
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=_BACKEND_FOR_DEVICE[device], timeout=timedelta(minutes=timeout_minutes), **world)
    _owns_process_group = True


def destroy_process_group() -> None:
    """Destroy the default process group if :func:`init_process_group` created it (no barrier: a caller on its
    success path that needs every rank to get here first calls ``dist.barrier()`` before)."""
    global _owns_process_group
    if _owns_process_group and dist.is_initialized():
        dist.destroy_process_group()
    _owns_process_group = False


def initialize_model_parallel(
    device: str,
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    expert_model_parallel_size: int = 1,
    expert_tensor_parallel_size: int | None = None,
    context_parallel_size: int = 1,
    seed: int = 1234,
    timeout_minutes: int = 10,
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
    init_process_group(device, timeout_minutes)

    layout = parallel_layout(
        dist.get_world_size(),
        tensor=tensor_model_parallel_size,
        pipeline=pipeline_model_parallel_size,
        context=context_parallel_size,
        expert=expert_model_parallel_size,
        expert_tensor=expert_tensor_parallel_size,
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
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    parallel_state.destroy_model_parallel()
    get_cuda_rng_tracker().reset()
    destroy_process_group()
