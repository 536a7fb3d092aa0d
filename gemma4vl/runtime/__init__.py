"""Process-level runtime: making Megatron-Core / Megatron-Bridge importable and runnable on the configured device.

- :mod:`gemma4vl.runtime.te_shim`: lets ``megatron.bridge`` import on a machine without Transformer Engine.
- :mod:`gemma4vl.runtime.cpu_backend`: the ``device: cpu`` backend (gloo, and the ``torch.cuda`` call sites of
  Megatron-Core redirected to CPU). Activated only through :func:`setup_runtime` with ``device="cpu"``.
"""

from gemma4vl.runtime.te_shim import install as _install_te_shim


def import_megatron_bridge():
    """Import and return the ``megatron.bridge`` package, installing the Transformer Engine import shim if needed."""
    _install_te_shim()
    import megatron.bridge

    return megatron.bridge
