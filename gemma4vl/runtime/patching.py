"""The one way gemma4vl patches Megatron-Core / Megatron-Bridge: data-only tables, checked, then applied at once.

A :class:`PatchTable` lists :class:`CallSitePatch` records for one installed distribution and the version its
call sites were found in (the tables: :mod:`gemma4vl.runtime.patches_core`, :mod:`gemma4vl.runtime.patches_bridge`;
the code they install: :mod:`gemma4vl.runtime.cpu_standins`). :func:`activate` applies tables:

1. **version gate**: every table's distribution must be installed at the supported ``major.minor`` (read from the
   package metadata, without importing the package) or :class:`UnsupportedMegatronVersionError` is raised; a
   distribution that is not installed at all has nothing to patch;
2. **resolve all, then apply**: every patch of every table whose module is imported (tables with
   ``import_now`` import theirs) is resolved first (:func:`resolve_all`); if any target attribute is missing, the
   error names every missing one and *nothing* is patched; only then does one loop (:func:`apply`) set them all;
3. **import hook**: the patches of modules not imported yet are applied the moment the module is first imported
   (:class:`PatchOnImport`, on ``sys.meta_path``), right after the module's code has run and before any importer
   can bind its names; a missing attribute there raises from that import, leaving that module unpatched.

Every replacement installed is marked (:data:`MARK`), so that a table entry applied where a function is defined and
again where it was imported by name (which already holds the replacement) never wraps a wrapper. Nothing here
reads an environment variable or modifies the global ``torch.cuda``.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.metadata
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# Set on every replacement this module installs (see the module docstring).
MARK = "__gemma4vl_patch__"


class UnsupportedMegatronVersionError(RuntimeError):
    """The installed Megatron-Core / Megatron-Bridge is not the version a patch table was written for."""


@dataclass(frozen=True)
class CallSitePatch:
    """One patched attribute: ``owner`` is a module path, or ``module:Class`` for a class attribute."""

    owner: str
    attribute: str
    replacement: Callable[[Any], Any]  # original value -> replacement
    why: str

    @property
    def module(self) -> str:
        return self.owner.partition(":")[0]


@dataclass(frozen=True)
class PatchTable:
    """The patches of one distribution, and the version their call sites were found in."""

    name: str  # what the table is for, in messages: "the CPU backend (Megatron-Core)"
    distribution: str  # the installed package: "megatron-core"
    supported: tuple[int, int]  # major, minor
    source: str  # the file listing the call sites, named in errors: "gemma4vl/runtime/patches_core.py"
    patches: tuple[CallSitePatch, ...]
    import_now: bool  # True: import every module at activation; False: patch modules on their first import


def replace_with(value: Any) -> Callable[[Any], Any]:
    """A ``replacement`` that ignores the original and installs ``value``."""
    return lambda _original: value


def installed_version(distribution: str) -> str | None:
    """The installed version of ``distribution`` from its metadata (no import), or None when not installed."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def check_version(table: PatchTable) -> bool:
    """Raise if an unsupported version of the table's distribution is installed; return whether it is installed."""
    from packaging.version import Version

    version = installed_version(table.distribution)
    if version is None:
        return False
    if Version(version).release[:2] != table.supported:
        supported = ".".join(map(str, table.supported))
        raise UnsupportedMegatronVersionError(
            f"gemma4vl's {table.name} patches {table.distribution} {supported}.x call sites, but "
            f"{table.distribution} {version} is installed. Re-check every call site listed in {table.source} "
            "against that version before changing the pin."
        )
    return True


Entry = tuple[PatchTable, CallSitePatch]
Resolved = tuple[Any, str, Any]  # (object to patch, attribute, replacement)


def resolve_all(entries: list[Entry], modules: dict[str, Any]) -> list[Resolved]:
    """Resolve every entry against ``modules`` (name -> imported module); patch nothing.

    Raises :class:`UnsupportedMegatronVersionError` naming *every* missing target if any is missing.
    """
    resolved, missing = [], []
    for table, patch in entries:
        _, _, class_name = patch.owner.partition(":")
        target = modules[patch.module]
        if class_name:
            target = vars(target).get(class_name)
        if target is None or patch.attribute not in vars(target):
            missing.append(f"{patch.owner}.{patch.attribute} ({table.distribution}, listed in {table.source})")
            continue
        original = vars(target)[patch.attribute]
        if getattr(original, MARK, False):
            replacement = original  # already ours (patched where defined, then imported by name)
        else:
            replacement = patch.replacement(original)
            _mark(replacement)
        resolved.append((target, patch.attribute, replacement))
    if missing:
        raise UnsupportedMegatronVersionError(
            "gemma4vl cannot patch the installed Megatron packages, so nothing was patched. Missing: "
            + "; ".join(missing)
            + ". The patch table is out of date for the installed version."
        )
    return resolved


def _mark(replacement: Any) -> None:
    try:
        setattr(replacement, MARK, True)
    except (AttributeError, TypeError):  # a value that takes no attributes (a bool, a builtin): nothing to wrap
        pass


def apply(resolved: list[Resolved]) -> None:
    """Set every resolved attribute (the only loop that patches)."""
    for target, attribute, replacement in resolved:
        setattr(target, attribute, replacement)


class PatchOnImport(importlib.abc.MetaPathFinder):
    """Applies the patches of listed modules right after each module's code has run (its first import).

    It only answers for the module names in ``pending``; it lets the other finders on ``sys.meta_path`` locate the
    module, then wraps that spec's loader's ``exec_module`` for this one execution (an instance attribute, removed
    again, so the module's ``__loader__`` is the regular loader). It removes itself from ``sys.meta_path`` once
    every listed module has been patched.
    """

    def __init__(self, pending: dict[str, list[Entry]]):
        self.pending = pending

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname not in self.pending:
            return None
        spec = None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        if spec is None:
            return None
        if spec.loader is None or not hasattr(spec.loader, "exec_module"):
            raise ImportError(
                f"gemma4vl cannot patch {fullname} on import: its loader ({spec.loader!r}) has no exec_module. "
                "Import it before activating the patches to have it patched at activation."
            )
        loader = spec.loader
        exec_module = loader.exec_module

        def exec_then_patch(module: Any) -> None:
            try:
                exec_module(module)
            finally:
                vars(loader).pop("exec_module", None)
            self._patch(fullname, module)

        loader.exec_module = exec_then_patch
        return spec

    def _patch(self, fullname: str, module: Any) -> None:
        entries = self.pending.pop(fullname, None)
        if entries:
            apply(resolve_all(entries, {fullname: module}))
        if not self.pending and self in sys.meta_path:
            sys.meta_path.remove(self)


_hook: PatchOnImport | None = None
_applied: set[str] = set()


def _patch_on_import(pending: dict[str, list[Entry]]) -> None:
    """Hand ``pending`` to the one import hook (installed on ``sys.meta_path`` if it is not there)."""
    global _hook
    if _hook is None or _hook not in sys.meta_path:
        _hook = PatchOnImport({})
        sys.meta_path.insert(0, _hook)
    for name, entries in pending.items():
        _hook.pending.setdefault(name, []).extend(entries)


def activate(*tables: PatchTable) -> None:
    """Apply ``tables`` (see the module docstring): all checked first, then patched. A table applies once."""
    tables = tuple(table for table in tables if table.name not in _applied)
    installed = [table for table in tables if check_version(table)]
    now: list[Entry] = []
    pending: dict[str, list[Entry]] = {}
    modules: dict[str, Any] = {}
    for table in installed:
        for patch in table.patches:
            module = importlib.import_module(patch.module) if table.import_now else sys.modules.get(patch.module)
            if module is None:
                pending.setdefault(patch.module, []).append((table, patch))
            else:
                modules[patch.module] = module
                now.append((table, patch))
    apply(resolve_all(now, modules))
    if pending:
        _patch_on_import(pending)
    _applied.update(table.name for table in tables)
