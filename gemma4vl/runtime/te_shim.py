"""Import shim for a machine without Transformer Engine.

Megatron-Bridge 0.6.x imports ``transformer_engine.pytorch`` unconditionally in two modules that every bridge
import pulls in (``peft/lora_layers.py`` and ``models/gpt_full_te_layer_autocast_spec.py``), although neither is
used on our local (non-TE) layer spec. Megatron-Core, on the other hand, *probes* for Transformer Engine in
dozens of places (``try: import transformer_engine``) and switches code paths on the result, so a stub that is
visible to Megatron-Core would make it believe TE is installed.

The shim therefore answers ``import transformer_engine...`` with a stub **only when the importing module lives
in ``megatron.bridge``**, and never registers the stub in ``sys.modules``; every other importer keeps getting
``ModuleNotFoundError``. It is installed by :func:`install` when, and only when, the real package is absent:
this is a property of the installed packages, not a run-time switch. Any attempt to *use* a stub class (create
an instance) raises a clear error naming the missing package.
"""

from __future__ import annotations

import builtins
import importlib.util
import types

_STUB_ROOT = "transformer_engine"
_installed = False
_original_import = builtins.__import__


class TransformerEngineMissing(RuntimeError):
    """Raised when code tries to use a Transformer Engine class on a machine without Transformer Engine."""


def _stub_class(qualname: str) -> type:
    def _refuse(self, *args, **kwargs):
        raise TransformerEngineMissing(
            f"{qualname} needs Transformer Engine, which is not installed here. gemma4vl builds its model with "
            "the local (non-TE) layer spec; do not select a Transformer Engine spec on this machine."
        )

    return type(qualname.rsplit(".", 1)[-1], (), {"__init__": _refuse, "__module__": qualname.rsplit(".", 1)[0]})


class _StubModule(types.ModuleType):
    """A module whose every missing attribute is a refusing class or a nested stub module."""

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        qualname = f"{self.__name__}.{name}"
        value = _StubModule(qualname) if name.islower() else _stub_class(qualname)
        setattr(self, name, value)
        return value


_STUB = _StubModule(_STUB_ROOT)


def _importer_is_megatron_bridge(globals_: dict | None) -> bool:
    name = (globals_ or {}).get("__name__", "") or ""
    return name == "megatron.bridge" or name.startswith("megatron.bridge.")


def _shim_import(name, globals=None, locals=None, fromlist=(), level=0):
    if level == 0 and (name == _STUB_ROOT or name.startswith(_STUB_ROOT + ".")) and _importer_is_megatron_bridge(
        globals
    ):
        module = _STUB
        if fromlist:
            for part in name.split(".")[1:]:
                module = getattr(module, part)
        return module
    return _original_import(name, globals, locals, fromlist, level)


def transformer_engine_installed() -> bool:
    """True when the real Transformer Engine package can be imported."""
    return importlib.util.find_spec(_STUB_ROOT) is not None


def install() -> bool:
    """Install the shim if Transformer Engine is absent. Returns True when the shim is active. Idempotent."""
    global _installed
    if _installed:
        return True
    if transformer_engine_installed():
        return False
    builtins.__import__ = _shim_import
    _installed = True
    return True


def is_installed() -> bool:
    return _installed
