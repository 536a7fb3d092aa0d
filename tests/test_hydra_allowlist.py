"""One allowlist over the whole composed config, the ``hydra`` node included (issue 14, part 3).

Before the guard, ``hydra.callbacks`` (an override or an experiment YAML) made Hydra call any ``_target_`` before
the task function ran: ``+hydra.callbacks.x._target_=builtins.open ... mode=w`` truncated a file and the run
exited 0. Each case below must exit with status 2 naming the culprit key, and leave the target file
byte-identical. The cases run in-process through the guard (the same composition Hydra does); one subprocess
runs the real recipe entry point."""

import subprocess
import sys
from pathlib import Path

import pytest

from gemma4vl.config import register_configs
from gemma4vl.config.hydra_guard import EXIT_REFUSED, guard

ROOT = Path(__file__).resolve().parents[1]
VICTIM_BYTES = b"precious user data\n" * 4


def task(cfg):  # stands in for the recipe's task function: Hydra finds ../conf relative to this file
    raise AssertionError("the guard never runs the task")


task.__module__ = "__main__"  # as for `python -m recipes.finetune`: config_path is relative to the file

EVIL_CALLBACK = """\
# @package _global_
hydra:
  callbacks:
    x:
      _target_: builtins.open
      file: {victim}
      mode: w
"""
EVIL_FACTORY = """\
# @package _global_
hydra:
  job_logging:
    handlers:
      console:
        (): builtins.open
        file: {victim}
        mode: w
"""
EVIL_FORMATTER = """\
# @package _global_
hydra:
  job_logging:
    formatters:
      simple:
        class: builtins.open
"""
EVIL_SWEEP_PARAMS = """\
# @package _global_
hydra:
  sweeper:
    params:
      hydra.callbacks.x: a,b
"""
EVIL_EXT = """\
# @package _global_
hydra:
  job_logging:
    handlers:
      console:
        stream: ext://antigravity.webbrowser
"""

# (case, experiment YAML written to <config-dir>/experiment/evil.yaml or None, argv, culprit named)
CASES = [
    ("callback-override", None,
     ["+hydra.callbacks.x._target_=builtins.open", "+hydra.callbacks.x.file={victim}", "+hydra.callbacks.x.mode=w"],
     "hydra.callbacks.x._target_='builtins.open'"),
    ("callback-experiment-yaml", EVIL_CALLBACK, ["experiment=evil"], "hydra.callbacks.x._target_"),
    ("callback-experiment-yaml-multirun", EVIL_CALLBACK, ["-m", "experiment=evil"], "hydra.callbacks.x._target_"),
    ("dictconfig-factory", EVIL_FACTORY, ["experiment=evil"], "hydra.job_logging.handlers.console.()"),
    ("handler-class", None, ["hydra.job_logging.handlers.console.class=logging.handlers.SocketHandler"],
     "hydra.job_logging.handlers.console.class='logging.handlers.SocketHandler'"),
    ("formatter-class", EVIL_FORMATTER, ["experiment=evil"], "hydra.job_logging.formatters.simple.class"),
    ("ext-import", EVIL_EXT, ["experiment=evil"], "hydra.job_logging.handlers.console.stream"),
    ("log-file-outside-run-dir", None, ["hydra.job_logging.handlers.file.filename={victim}"],
     "hydra.job_logging.handlers.file.filename"),
    ("log-file-truncating-mode", None, ["+hydra.job_logging.handlers.file.mode=w"],
     "hydra.job_logging.handlers.file.mode='w'"),
    ("job-name-escapes-run-dir", None, ["hydra.job.name=../../escape"], "hydra.job.name='../../escape'"),
    ("sweeper-target", None, ["hydra.sweeper._target_=builtins.print"], "hydra.sweeper._target_='builtins.print'"),
    ("sweep-over-hydra-key", None, ["-m", "hydra.job_logging.handlers.file.filename={victim},x.log"],
     "hydra.job_logging.handlers.file.filename="),
    ("sweeper-params-hydra-key", EVIL_SWEEP_PARAMS, ["-m", "experiment=evil"], "hydra.sweeper.params.hydra.callbacks.x"),
    ("task-config-target", None, ["+model._target_=os.system"], "model._target_='os.system'"),
]


@pytest.fixture(scope="module", autouse=True)
def _schemas():
    register_configs()


@pytest.mark.parametrize("case,yaml,argv,culprit", CASES, ids=[c[0] for c in CASES])
def test_refused_before_hydra_acts(tmp_path, capsys, case, yaml, argv, culprit):
    victim = tmp_path / "victim.txt"
    victim.write_bytes(VICTIM_BYTES)
    args = [a.format(victim=victim) for a in argv]
    if yaml is not None:
        (tmp_path / "conf" / "experiment").mkdir(parents=True)
        (tmp_path / "conf" / "experiment" / "evil.yaml").write_text(yaml.format(victim=victim))
        args = ["--config-dir", str(tmp_path / "conf"), *args]
    with pytest.raises(SystemExit) as exit_:
        guard(task, "../conf", "config", argv=args)
    assert exit_.value.code == EXIT_REFUSED
    err = capsys.readouterr().err
    assert "config refused" in err and culprit in err, err
    assert victim.read_bytes() == VICTIM_BYTES
    if yaml is not None:
        assert (tmp_path / "conf" / "experiment" / "evil.yaml").read_text() == yaml.format(victim=victim)


@pytest.mark.parametrize("argv", [[], ["-m", "trainer.train_iters=3,4"], ["experiment=tiny_tp2"],
                                  ["trainer.train_iters=3,4"],  # a sweep without -m: Hydra reports it
                                  ["nosuchgroup=x"]])  # a compose error: Hydra reports it
def test_allowed_or_left_to_hydra(capsys, argv):
    assert guard(task, "../conf", "config", argv=argv) is None
    assert "config refused" not in capsys.readouterr().err


def test_recipe_entry_point_refuses_a_callback(tmp_path):
    """The real `python -m recipes.finetune`: exit 2 naming the key, the file untouched, no run directory."""
    victim = tmp_path / "victim.txt"
    victim.write_bytes(VICTIM_BYTES)
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "recipes.finetune", f"hydra.run.dir={run_dir}",
                           "+hydra.callbacks.x._target_=builtins.open", f"+hydra.callbacks.x.file={victim}",
                           "+hydra.callbacks.x.mode=w"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == EXIT_REFUSED, proc.stderr[-3000:]
    assert "hydra.callbacks.x._target_='builtins.open'" in proc.stderr
    assert victim.read_bytes() == VICTIM_BYTES
    assert not run_dir.exists()
