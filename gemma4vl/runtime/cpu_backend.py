"""The ``device: cpu`` backend: Megatron-Core 0.19.x and Megatron-Bridge 0.6.x on a CPU-only machine, over gloo.

Megatron-Core and Megatron-Bridge assume a CUDA device at a finite set of call sites. :func:`activate` redirects
exactly those to the CPU by applying two data-only tables together, all-or-nothing, through
:mod:`gemma4vl.runtime.patching`:

- :mod:`gemma4vl.runtime.patches_core` (sections A-D: Megatron-Core, every module imported and patched now);
- :mod:`gemma4vl.runtime.patches_bridge` (sections E-G: Megatron-Bridge's training loop, patched when its modules
  are first imported, so processes that only use Megatron-Core do not pay for importing Megatron-Bridge).

The code they install (torch / CUDA stand-ins, replacement functions, wrappers) is in
:mod:`gemma4vl.runtime.cpu_standins`. :func:`activate` never modifies the global ``torch.cuda`` module, never reads
an environment variable, and is only called through :func:`gemma4vl.runtime.setup_runtime` with ``device="cpu"``
(on a GPU machine with ``device="cuda"`` it stays inactive). It raises
:class:`~gemma4vl.runtime.patching.UnsupportedMegatronVersionError` for another megatron-core than 0.19.x or
megatron-bridge than 0.6.x, or when a patched attribute no longer exists, before anything is patched.
"""

from __future__ import annotations

from gemma4vl.runtime import patches_bridge, patches_core, patching

_active = False


def _check_rng_tracker_unseeded() -> None:
    """Refuse to activate after Megatron's RNG tracker was seeded: it holds CUDA generator states."""
    from megatron.core.tensor_parallel import random as mcore_random

    tracker = mcore_random._CUDA_RNG_STATE_TRACKER
    if tracker is not None and tracker.is_initialized():
        raise RuntimeError(
            "Megatron-Core's RNG tracker was seeded before the CPU backend was activated; call "
            "gemma4vl.runtime.setup_runtime('cpu') before seeding (initialize_model_parallel does it first)."
        )


def _discard_unseeded_rng_tracker() -> None:
    """Drop a tracker created (empty) before activation, so that the next one is a ``CpuRNGStatesTracker``."""
    from megatron.core.tensor_parallel import random as mcore_random

    mcore_random._CUDA_RNG_STATE_TRACKER = None
    mcore_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = False


def activate() -> None:
    """Redirect Megatron-Core's and Megatron-Bridge's CUDA call sites to the CPU (see the module docstring).

    Idempotent. Everything is checked before anything is patched, so a failure leaves both packages untouched.
    """
    global _active
    if _active:
        return
    patching.check_version(patches_core.CPU)  # before importing megatron.core for the RNG tracker check
    _check_rng_tracker_unseeded()
    patching.activate(patches_core.CPU, patches_bridge.CPU)
    _discard_unseeded_rng_tracker()
    _active = True


def is_active() -> bool:
    """True once :func:`activate` has run in this process (there is no deactivation)."""
    return _active
