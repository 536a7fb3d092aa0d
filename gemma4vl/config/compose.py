"""From Hydra's composed ``DictConfig`` to a typed :class:`~gemma4vl.config.schema.RunConfig`.

Configs are code: a ``_target_`` would let a YAML file or a command-line override instantiate arbitrary Python.
No gemma4vl config group uses one, and :func:`to_run_config` refuses any ``_target_`` that is not in
:data:`ALLOWED_TARGETS` (empty today; extend it in code, with review, if a group ever needs one).
"""

from __future__ import annotations

import dataclasses

from omegaconf import DictConfig, ListConfig, OmegaConf

from gemma4vl.config.schema import RunConfig

ALLOWED_TARGETS: frozenset[str] = frozenset()


class TargetNotAllowed(ValueError):
    """A config node names a ``_target_`` outside the allowlist."""


def check_targets(node, path: str = "") -> None:
    """Raise :class:`TargetNotAllowed` for any ``_target_`` in ``node`` not in :data:`ALLOWED_TARGETS`."""
    if isinstance(node, DictConfig):
        for key in node.keys():
            child_path = f"{path}.{key}" if path else str(key)
            if key == "_target_":
                target = node._get_node(key)._value()
                if target not in ALLOWED_TARGETS:
                    raise TargetNotAllowed(f"{child_path}={target!r}: _target_ is not allowed in gemma4vl configs "
                                           f"(allowlist: {sorted(ALLOWED_TARGETS) or 'empty'})")
            else:
                check_targets(node._get_node(key), child_path)
    elif isinstance(node, ListConfig):
        for i, item in enumerate(node._iter_ex(resolve=False)):
            check_targets(item, f"{path}[{i}]")


class UnknownConfigKey(KeyError):
    """A config node holds a key its schema does not define (e.g. added with ``+group.key=value``)."""

    def __str__(self) -> str:
        return self.args[0]


def check_known_keys(node, path: str = "") -> None:
    """Refuse keys that the node's schema dataclass does not define. Hydra's ``+key=value`` appends keys even to
    structured nodes, and such a key would otherwise be silently ignored."""
    if not isinstance(node, DictConfig):
        return
    schema = OmegaConf.get_type(node)
    known = {f.name for f in dataclasses.fields(schema)} if dataclasses.is_dataclass(schema) else None
    for key in node.keys():
        child_path = f"{path}.{key}" if path else str(key)
        if known is not None and key not in known and key != "_target_":
            raise UnknownConfigKey(f"unknown config key {child_path!r}: {schema.__name__} defines "
                                   f"{', '.join(sorted(known))}")
        check_known_keys(node._get_node(key), child_path)


def to_run_config(cfg: DictConfig) -> RunConfig:
    """The typed run config (``__post_init__`` checks of every group run here)."""
    check_known_keys(cfg)
    check_targets(cfg)
    run = OmegaConf.to_object(cfg)
    if not isinstance(run, RunConfig):
        raise TypeError(f"expected a RunConfig composition, got {type(run).__name__} (is run_schema in defaults?)")
    return run
