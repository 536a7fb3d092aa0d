"""``hydra_main``: ``hydra.main`` with one allowlist over the whole composed config, the ``hydra`` node included.

The ``_target_`` ban of :mod:`gemma4vl.config.compose` runs inside the task function, but Hydra acts on its own
node before that: it instantiates ``hydra.callbacks`` (any ``_target_``, from an override or an experiment YAML)
in ``Hydra.run``, and hands ``hydra.job_logging`` / ``hydra.hydra_logging`` to ``logging.config.dictConfig``
(whose ``()`` factories and handler ``class`` names are arbitrary callables) while composing. So before Hydra
runs, :func:`hydra_main` composes the config exactly as ``hydra._internal.utils._run_hydra`` would (same
argument parser, search path, ``--config-dir``, run mode; no logging configured) and refuses, naming the key:

- a ``_target_`` in the task config outside :data:`gemma4vl.config.compose.ALLOWED_TARGETS`, and in the
  ``hydra`` node anything but Hydra's own basic sweeper / launcher (:data:`HYDRA_TARGETS`);
- a ``()`` key anywhere (a ``dictConfig`` factory);
- a logging handler ``class`` other than :data:`LOG_HANDLER_CLASSES`, a formatter ``class`` other than
  ``logging.Formatter``, an ``ext://`` reference other than ``sys.stdout`` / ``sys.stderr`` (it imports a
  module), a ``FileHandler`` outside the run directory or opened other than for appending (``mode: w`` on any
  path truncates that file);
- any entry in ``hydra.callbacks``;
- an interpolation where one of the values above is checked (it could resolve differently per job);
- a sweep over a ``hydra`` key or group (``hydra.x=a,b`` on the command line or in ``hydra.sweeper.params``):
  sweeps are composed per job, after this check.

A violation exits with status 2 and a message naming the key. When the composition itself fails, Hydra runs
as usual and reports the error its own way.
"""

from __future__ import annotations

import functools
import sys
from typing import Any, Callable

from omegaconf import OmegaConf

from gemma4vl.config.compose import ALLOWED_TARGETS

HYDRA_TARGETS: dict[str, str] = {
    "hydra.sweeper._target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper",
    "hydra.launcher._target_": "hydra._internal.core_plugins.basic_launcher.BasicLauncher",
}
"""The only ``_target_``s allowed in the ``hydra`` node, by key."""

LOG_HANDLER_CLASSES = frozenset({"logging.StreamHandler", "logging.FileHandler", "logging.NullHandler"})
"""Handler classes a logging config may name."""

_LOG_STREAMS = frozenset({"ext://sys.stdout", "ext://sys.stderr"})
_RUN_DIR = "${hydra.runtime.output_dir}/"
_JOB_NAME = "${hydra.job.name}"
EXIT_REFUSED = 2


class ConfigNotAllowed(ValueError):
    """The composed config (or an override) asks Hydra to run code or write outside the run directory."""


def _walk(node: Any, path: str):
    """(dotted path, key, value) of every dict entry under ``node`` (list items as ``path[i]``)."""
    if isinstance(node, dict):
        for key, value in node.items():
            child = f"{path}.{key}" if path else str(key)
            yield child, key, value
            yield from _walk(value, child)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _walk(value, f"{path}[{i}]")


def _literal(path: str, value: Any) -> str:
    if not isinstance(value, str) or "${" in value:
        raise ConfigNotAllowed(f"{path}={value!r}: must be a literal string here (no interpolation)")
    return value


def _check_logging(node: dict, path: str) -> None:
    for name, handler in (node.get("handlers") or {}).items():
        where = f"{path}.handlers.{name}"
        cls = _literal(f"{where}.class", handler.get("class"))
        if cls not in LOG_HANDLER_CLASSES:
            raise ConfigNotAllowed(f"{where}.class={cls!r}: logging handler class not allowed "
                                   f"(allowed: {', '.join(sorted(LOG_HANDLER_CLASSES))})")
        if cls == "logging.FileHandler":
            filename = handler.get("filename")
            rest = filename[len(_RUN_DIR):].replace(_JOB_NAME, "") if isinstance(filename, str) else ""
            if not filename.startswith(_RUN_DIR) or ".." in rest or "${" in rest:
                raise ConfigNotAllowed(f"{where}.filename={filename!r}: a log file must be under the run "
                                       f"directory ({_RUN_DIR}..., no '..', no interpolation but "
                                       f"{_JOB_NAME})")
            if _literal(f"{where}.mode", handler.get("mode", "a")) != "a":
                raise ConfigNotAllowed(f"{where}.mode={handler['mode']!r}: log files are opened for appending "
                                       f"only ('a')")
    for name, formatter in (node.get("formatters") or {}).items():
        if "class" in formatter:
            cls = _literal(f"{path}.formatters.{name}.class", formatter["class"])
            if cls != "logging.Formatter":
                raise ConfigNotAllowed(f"{path}.formatters.{name}.class={cls!r}: formatter class not allowed "
                                       f"(allowed: logging.Formatter)")


def check_composition(cfg) -> None:
    """Raise :class:`ConfigNotAllowed` naming the first key of the composed ``cfg`` (a ``DictConfig`` with its
    ``hydra`` node) that the allowlist refuses (see the module docstring)."""
    tree = OmegaConf.to_container(cfg, resolve=False)
    for path, key, value in _walk(tree, ""):
        if key == "()":
            raise ConfigNotAllowed(f"{path}: '()' factories are not allowed (a logging config would call "
                                   f"{value!r})")
        if key == "_target_":
            if path.startswith("hydra."):
                allowed = HYDRA_TARGETS.get(path)
                if _literal(path, value) != allowed:
                    raise ConfigNotAllowed(f"{path}={value!r}: _target_ not allowed in the hydra node (allowed: "
                                           f"{', '.join(f'{k}={v}' for k, v in HYDRA_TARGETS.items())})")
            elif value not in ALLOWED_TARGETS:
                raise ConfigNotAllowed(f"{path}={value!r}: _target_ is not allowed in gemma4vl configs "
                                       f"(allowlist: {sorted(ALLOWED_TARGETS) or 'empty'})")
        if isinstance(value, str) and value.startswith("ext://") and value not in _LOG_STREAMS:
            raise ConfigNotAllowed(f"{path}={value!r}: ext:// imports a module; allowed: "
                                   f"{', '.join(sorted(_LOG_STREAMS))}")
    hydra = tree.get("hydra") or {}
    job_name = (hydra.get("job") or {}).get("name")
    if job_name not in (None, "???") and ("/" in _literal("hydra.job.name", job_name) or ".." in job_name):
        raise ConfigNotAllowed(f"hydra.job.name={job_name!r}: the job name names the log file; no '/' or '..'")
    if hydra.get("callbacks"):
        raise ConfigNotAllowed(f"hydra.callbacks.{next(iter(hydra['callbacks']))}: Hydra callbacks are not "
                               f"allowed (hydra.callbacks must be empty)")
    for group in ("job_logging", "hydra_logging"):
        if isinstance(hydra.get(group), dict):
            _check_logging(hydra[group], f"hydra.{group}")
    params = (hydra.get("sweeper") or {}).get("params") or {}
    for key in params:
        if _is_hydra_key(str(key)):
            raise ConfigNotAllowed(f"hydra.sweeper.params.{key}: sweeping over a hydra key is not allowed")


def _is_hydra_key(key: str) -> bool:
    key = key.lstrip("+~")
    return key == "hydra" or key.startswith(("hydra.", "hydra/"))


def check_overrides(overrides: list[str]) -> None:
    """Refuse sweep overrides (``a,b``, ``range()``, ``glob()`` ...) of a ``hydra`` key or group: a sweep is
    composed per job, after :func:`check_composition`."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    for override in OverridesParser.create().parse_overrides(overrides):
        if override.is_sweep_override() and _is_hydra_key(override.key_or_group):
            raise ConfigNotAllowed(f"{override.input_line}: sweeping over a hydra key is not allowed")


def compose_like_hydra(task_function: Callable, config_path: str | None, config_name: str | None,
                       argv: list[str]):
    """(parsed command line, the config Hydra would run ``task_function`` with, overrides) or None when this is not
    a run (``--help``, ``--cfg``, ...). Mirrors ``hydra._internal.utils._run_hydra``: the same parser,
    search path (``--config-dir`` prepended), run mode (``-m`` or ``hydra.mode``), no logging configured."""
    import os

    from hydra._internal.hydra import Hydra
    from hydra._internal.utils import (
        create_automatic_config_search_path,
        detect_calling_file_or_module_from_task_function,
        detect_task_name,
        get_args_parser,
    )
    from hydra.core.config_search_path import SearchPathQuery
    from hydra.types import RunMode

    args = get_args_parser().parse_args(argv)
    if args.help or args.hydra_help or args.cfg or args.info or args.shell_completion:
        return None
    config_name = args.config_name if args.config_name is not None else config_name
    config_path = args.config_path if args.config_path is not None else config_path
    calling_file, calling_module = detect_calling_file_or_module_from_task_function(task_function)
    task_name = detect_task_name(calling_file, calling_module)
    search_path = create_automatic_config_search_path(calling_file, calling_module, config_path)
    if args.config_dir is not None:
        search_path.prepend(provider="command-line", path=f"file://{os.path.abspath(args.config_dir)}",
                            anchor=SearchPathQuery(provider="schema"))
    hydra = Hydra.create_main_hydra2(task_name=task_name, config_search_path=search_path)
    mode = hydra.get_mode(config_name=config_name, overrides=list(args.overrides))
    run_mode = RunMode.MULTIRUN if args.multirun or mode == RunMode.MULTIRUN else RunMode.RUN
    cfg = hydra.compose_config(config_name=config_name, overrides=list(args.overrides), run_mode=run_mode,
                               with_log_configuration=False)
    return args, cfg


def guard(task_function: Callable, config_path: str | None, config_name: str | None,
          argv: list[str] | None = None) -> None:
    """Check the command line and the config it composes; exit with status 2 naming the key on a violation.
    Any other error is left for Hydra to report."""
    from hydra.core.global_hydra import GlobalHydra

    argv = sys.argv[1:] if argv is None else argv
    try:
        from hydra._internal.utils import get_args_parser

        check_overrides(list(get_args_parser().parse_args(argv).overrides))
        composed = compose_like_hydra(task_function, config_path, config_name, argv)
        if composed is not None:
            check_composition(composed[1])
    except ConfigNotAllowed as e:
        print(f"Error: config refused: {e}", file=sys.stderr)
        sys.exit(EXIT_REFUSED)
    except (Exception, SystemExit):  # a malformed command line or composition: Hydra reports it its own way
        pass
    finally:
        GlobalHydra.instance().clear()


def hydra_main(config_path: str, config_name: str, version_base: str = "1.3"):
    """``@hydra.main(...)`` preceded by :func:`guard` (the whole composition checked before Hydra acts)."""
    import hydra

    def decorator(task_function: Callable) -> Callable[[], None]:
        hydra_entry = hydra.main(version_base=version_base, config_path=config_path,
                                 config_name=config_name)(task_function)

        @functools.wraps(task_function)
        def main() -> None:
            guard(task_function, config_path, config_name)
            hydra_entry()

        return main

    return decorator
