"""Process-level runtime: making Megatron-Core / Megatron-Bridge importable and runnable on the configured device.

- :mod:`gemma4vl.runtime.te_shim`: lets ``megatron.bridge`` import on a machine without Transformer Engine (and
  :func:`import_megatron_bridge` applies the one Megatron-Bridge patch such a machine needs, ``patches_bridge``
  section H).
- :mod:`gemma4vl.runtime.cpu_backend`: the ``device: cpu`` backend (gloo, and the ``torch.cuda`` call sites of
  Megatron-Core and Megatron-Bridge redirected to CPU). Activated only through :func:`setup_runtime` with
  ``device="cpu"``. Its tables are :mod:`~gemma4vl.runtime.patches_core` and :mod:`~gemma4vl.runtime.patches_bridge`,
  the code they install :mod:`~gemma4vl.runtime.cpu_standins`, the machinery :mod:`~gemma4vl.runtime.patching`.
- :mod:`gemma4vl.runtime.distributed`: ``torch.distributed`` and Megatron-Core's process groups, set up and torn
  down in one place.
"""

from gemma4vl.runtime.te_shim import install as _install_te_shim

DEVICES = ("cpu", "cuda")


def import_megatron_bridge():
    """Import and return the ``megatron.bridge`` package, installing the Transformer Engine import shim if needed.

    Without Transformer Engine (the shim is installed) it also applies ``patches_bridge.WITHOUT_TE``, on any device.
    """
    if _install_te_shim():
        from gemma4vl.runtime import patches_bridge, patching

        patching.activate(patches_bridge.WITHOUT_TE)
    import megatron.bridge

    return megatron.bridge


def setup_runtime(device: str) -> None:
    """Prepare this process to run Megatron-Core on ``device``: ``"cpu"`` or ``"cuda"``. Idempotent.

    ``"cpu"`` activates :mod:`gemma4vl.runtime.cpu_backend`. ``"cuda"`` only checks that CUDA is usable and leaves
    the CPU backend inactive. The device is an argument (from the run's config), never read from the environment.
    A process runs on one device: asking for ``"cuda"`` after the CPU backend was activated is an error.
    """
    from gemma4vl.runtime import cpu_backend

    if device == "cpu":
        cpu_backend.activate()
    elif device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError(
                "device='cuda' was requested, but torch.cuda.is_available() is False on this machine "
                f"(torch {torch.__version__}, built for CUDA {torch.version.cuda}). Use device='cpu' here, or run "
                "on a machine with a CUDA GPU."
            )
        if cpu_backend.is_active():
            raise RuntimeError(
                "device='cuda' was requested, but this process already activated the CPU backend "
                "(setup_runtime('cpu')), which redirects Megatron-Core to the CPU; use one device per process."
            )
    else:
        raise ValueError(f"device must be one of {', '.join(repr(d) for d in DEVICES)}; got {device!r}")
