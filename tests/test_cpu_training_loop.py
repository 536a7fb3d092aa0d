"""The production training loop on the CPU backend: ``gemma4vl.training.finetune.finetune`` in fresh processes.

Every job is the run ``python -m recipes.finetune <overrides>`` makes: the run config composed from ``conf/``
(``tests/test_config.py``'s ``compose_run``, then ``to_run_config``), the tiny random fp32 checkpoint and the demo
data (the session's ``inputs`` fixture), ``finetune(run)`` building Megatron-Bridge's ``ConfigContainer`` with
``gemma4vl.config.container.build_config_container`` and training with ``gemma4vl.training.forward_step.ForwardStep``
under the CPU backend (``gemma4vl.runtime.cpu_backend`` / ``patches_bridge``). Losses are read from the run's
``metrics.jsonl``, checkpoints and TensorBoard event files from its run directory.

In the job process, and only there, the test adds to the production path (``finetune_job``):

- the forward step is a subclass of ours that, per training micro batch, draws one number from the default
  generator and one from the tensor-parallel RNG tracker (nothing uses them: a resumed run reproduces them only if
  the RNG states were checkpointed and restored, which the losses alone would not show without dropout), and
  sends SIGTERM to its own process during a chosen iteration (as Slurm / torchrun would, mid-iteration);
- for some jobs the ConfigContainer that the production builder returns gets options the production config does
  not set: every optional metric of Megatron-Bridge's loop (timers at level 2, parameter and gradient norms,
  zeros in the gradient, memory, world size; a synchronize every step, emptying the cache, the wall-clock limit
  checked) whose CUDA calls the CPU backend's section E handles, or the distributed optimizer's fully reshardable
  checkpoint format.

Each job's ranks are forked from the module's job server: a fresh interpreter that imported what
``recipes/finetune.py`` imports before it runs (Megatron-Core, Megatron-Bridge, transformers: about 13 s per
process here, paid once per module instead of once per rank and job). The ranks are not daemonic (Megatron-Core's
``torch_dist`` checkpoint writer starts a ``multiprocessing`` manager process, which daemonic processes may not)
and get the torchrun variables: ``finetune`` creates the process group. Every job uses one intra-op thread, so the
numbers do not depend on the machine and the 2-process runs do the same arithmetic per rank as the 1-process run.
Runs that several tests inspect are module-scoped fixtures.

The losses were observed on this CPU machine (fp32) and are pinned with a tolerance (torchtune style). The default
run of this file (five jobs, two of them 2-process ones; the job server's imports; the session's checkpoint and
demo data when no earlier module made them) took 195 s on the shared 2-core machine under load (the generic-GPT
version it replaces: 180 s there); the ``slow`` test (resume with another data-parallel size) adds about 45 s.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp

from gemma4vl.testing.distributed import free_port
from gemma4vl.testing.pytest_fixtures import losses

TRAIN_ITERS, SAVE_AT, EVAL_INTERVAL = 6, 3, 2
GLOBAL_BATCH = 2  # micro batch 1 (conf/trainer/cpu.yaml): 2 micro batches per step on 1 process, 1 per rank at DP 2
PARALLEL_ITERS = 3
RUN_TIMEOUT = 300.0

# Per-step "lm loss" (token-weighted masked mean over the global batch, metrics.jsonl) of the reference run,
# observed on this machine: the tiny fp32 checkpoint, the demo data (seq 512), conf/optim/demo.yaml (Adam lr 2e-3,
# warmup 2, cosine decay over 6 steps), the distributed optimizer (DP = 1), seed 1234. Steps 1-4 are also
# tests/test_recipe.py's PINNED (to its 5 decimals): `python -m recipes.finetune` with the plain optimizer and
# another schedule length, which reaches the same learning rates by step 4.
EXPECTED_LOSSES = {1: 6.124521732330322, 2: 6.14092493057251, 3: 5.647480010986328, 4: 5.085865020751953,
                   5: 5.0432610511779785, 6: 4.663199424743652}
# Validation loss at steps 2, 4, 6 (eval_iters 1: one global batch of the validation split).
EXPECTED_VAL_LOSSES = {2: 5.475930690765381, 4: 5.130106449127197, 6: 4.644461631774902}
# Tolerance of the pinned values: two processes of the same command may differ by ~1e-7 relative, 1e-6 by step 6
# (tests/test_recipe.py, test_resume_after_sigkill_reproduces_the_uninterrupted_run); 1e-5 relative is 10x that
# and 10^4 below what one training step changes here.
PINNED_RTOL = 1e-5


# --------------------------------------------------------------------------------------------------------------
# The backend's Megatron-Bridge section itself (in this process; nothing here imports Megatron-Bridge)
# --------------------------------------------------------------------------------------------------------------


def test_every_bridge_patch_is_documented():
    from gemma4vl.runtime import cpu_backend, patches_bridge

    doc = patches_bridge.__doc__
    for patch in patches_bridge.CPU.patches + patches_bridge.WITHOUT_TE.patches:
        module_path = patch.owner.split(":")[0].removeprefix("megatron.bridge.").replace(".", "/") + ".py"
        assert f"``{module_path}``" in doc, f"{module_path} is patched but not listed in the docstring"
        assert patch.attribute == "torch" or f"``{patch.attribute}``" in doc, patch
    assert "patches_bridge" in cpu_backend.__doc__


def test_bridge_section_reads_no_environment_variable():
    import ast

    path = Path(__file__).resolve().parents[1] / "gemma4vl/runtime/patches_bridge.py"
    tree = ast.parse(path.read_text())
    names = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
    names |= {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
    assert not names & {"environ", "getenv", "environb"}


def test_unsupported_megatron_bridge_version_is_refused(monkeypatch):
    from gemma4vl.runtime import patches_bridge, patching

    assert patching.installed_version("megatron-bridge").startswith("0.6.")
    monkeypatch.setattr(patching, "installed_version", lambda distribution: "0.7.0")
    with pytest.raises(patching.UnsupportedMegatronVersionError, match=r"megatron-bridge 0\.6\.x.*0\.7\.0"):
        patching.check_version(patches_bridge.CPU)
    monkeypatch.setattr(patching, "installed_version", lambda distribution: None)  # not installed: nothing to patch
    assert patching.check_version(patches_bridge.CPU) is False


def test_get_model_keeps_the_configs_cpu_initialization_and_refuses_without_it():
    from types import SimpleNamespace

    from gemma4vl.runtime import cpu_standins

    calls = []
    get_model = cpu_standins.honour_cpu_initialization(lambda provider, **kwargs: calls.append(kwargs))
    get_model(SimpleNamespace(use_cpu_initialization=True), use_cpu_initialization=False)
    assert calls == [{"use_cpu_initialization": True}]
    with pytest.raises(ValueError, match="set use_cpu_initialization=True in the model config"):
        get_model(SimpleNamespace(use_cpu_initialization=False), use_cpu_initialization=False)


def test_modules_imported_later_are_patched_when_imported(tmp_path, monkeypatch):
    import importlib
    import sys

    from gemma4vl.runtime.patching import CallSitePatch, PatchOnImport, PatchTable

    package = tmp_path / "late_package"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "late.py").write_text("def answer():\n    return 1\n")
    (package / "user.py").write_text("from late_package.late import answer\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    replacement = lambda: 2  # noqa: E731
    patch = CallSitePatch("late_package.late", "answer", lambda _: replacement, "test")
    table = PatchTable("test", "late-package", (0, 1), "tests/test_cpu_training_loop.py", (patch,), import_now=False)
    finder = PatchOnImport({"late_package.late": [(table, patch)]})
    monkeypatch.setattr(sys, "meta_path", [finder, *sys.meta_path])
    try:
        user = importlib.import_module("late_package.user")  # imports late_package.late, which gets patched first
        late = sys.modules["late_package.late"]
        assert late.answer is replacement and user.answer is replacement
        assert "exec_module" not in vars(late.__loader__)  # the module keeps its regular loader
        assert finder not in sys.meta_path  # nothing left to patch: the finder removed itself
    finally:
        for name in ("late_package", "late_package.late", "late_package.user"):
            sys.modules.pop(name, None)


# --------------------------------------------------------------------------------------------------------------
# One job: the production finetune, in fresh processes
# --------------------------------------------------------------------------------------------------------------


def run_config(inputs, run_dir: Path, *extra: str):
    """The run config ``python -m recipes.finetune hydra.run.dir=<run_dir> <overrides> <extra>`` trains."""
    from test_config import compose_run

    from gemma4vl.config.compose import to_run_config

    ckpt, data = inputs
    overrides = [
        f"model.hf_path={ckpt}", f"data.path={data}", "data.seq_length=512", "data.num_workers=0",
        "data.persistent_workers=false", f"trainer.train_iters={TRAIN_ITERS}",
        f"trainer.global_batch_size={GLOBAL_BATCH}", "trainer.log_interval=1",
        f"trainer.eval_interval={EVAL_INTERVAL}", "trainer.eval_iters=1", f"checkpoint.save_interval={SAVE_AT}",
        "checkpoint.keep_last=null", "optim.warmup_iters=2", f"optim.decay_iters={TRAIN_ITERS}",
        "optim.use_distributed_optimizer=true", "logger=tensorboard", "logger.val_image_samples=0",
        "export.enabled=false", *extra,
    ]
    return to_run_config(compose_run(overrides, run_dir=run_dir))


@dataclass(frozen=True)
class Job:
    """One ``finetune(run)`` on ``world_size`` processes, and what the test adds to it (module docstring)."""

    run: Any  # gemma4vl.config.schema.RunConfig
    name: str  # results in <run_dir>/../<name>-rank<r>.json
    world_size: int = 1
    sigterm_at_iteration: int | None = None  # the forward step of this training iteration sends SIGTERM to itself
    all_reporting: bool = False  # every optional metric of the loop (the CPU backend's section E)
    fully_reshardable_optimizer: bool = False  # the distributed optimizer's other checkpoint format
    # Megatron-Bridge's training setup / train modules imported before the CPU backend's activation (the recipe
    # imports them after it): both orders must end with the same patches.
    import_bridge_before_runtime: bool = False

    def result_path(self, rank: int, suffix: str = ".json") -> Path:
        return Path(self.run.run_dir).parent / f"{self.name}-rank{rank}{suffix}"


def _recording_forward_step(job: Job, draws: dict):
    """Our ForwardStep, plus the RNG draws and the SIGTERM of the module docstring."""
    import gemma4vl.training.forward_step as forward_step

    class RecordingForwardStep(forward_step.ForwardStep):
        sent = False

        def __call__(self, state, data_iterator, model):
            if model.training:
                from megatron.core.tensor_parallel import get_cuda_rng_tracker

                iteration = state.train_state.step + 1
                with get_cuda_rng_tracker().fork():
                    tracker_draw = torch.rand(()).item()
                draws.setdefault(iteration, []).append([torch.rand(()).item(), tracker_draw])
                if iteration == job.sigterm_at_iteration and not RecordingForwardStep.sent:
                    RecordingForwardStep.sent = True
                    os.kill(os.getpid(), signal.SIGTERM)
            return super().__call__(state, data_iterator, model)

    return RecordingForwardStep


def _with_job_options(build, job: Job):
    """The production ``build_config_container``, then the job's extra options on the container it returns."""

    def build_config_container(cfg, auto_bridge, *, resume):
        container = build(cfg, auto_bridge, resume=resume)
        if job.all_reporting:
            for name in ("log_timers_to_tensorboard", "log_throughput", "log_throughput_to_tensorboard",
                         "log_memory_to_tensorboard", "log_runtime_to_tensorboard", "log_params_norm",
                         "log_l2_norm_grad_to_tensorboard", "log_world_size_to_tensorboard"):
                setattr(container.logger, name, True)
            container.logger.timing_log_level = 2
            container.optimizer.log_num_zeros_in_grad = True
            container.train.train_sync_interval = 1
            container.train.empty_unused_memory_level = 2
            container.train.exit_duration_in_mins = 10_000  # checked after every iteration and evaluation
        if job.fully_reshardable_optimizer:
            container.checkpoint.dist_ckpt_optim_fully_reshardable = True
        return container

    return build_config_container


def _patched_state() -> dict:
    """Which Megatron-Bridge patches are in place (they are applied on import or at activation)."""
    import megatron.bridge.training.initialize as initialize
    import megatron.bridge.training.setup as setup_module

    from gemma4vl.runtime import cpu_standins, patching

    return {
        "seed": initialize._set_random_seed is cpu_standins.set_random_seed,
        "setup_initialize": getattr(setup_module.initialize_megatron, patching.MARK, False),
    }


def finetune_job(job: Job) -> int:
    """``finetune(job.run)`` in this (fresh) process, as ``recipes.finetune`` calls it; the exit status it would
    give. What happened is written to ``job.result_path(rank)``."""
    torch.set_num_threads(1)
    if job.import_bridge_before_runtime:
        from gemma4vl.runtime import import_megatron_bridge

        import_megatron_bridge()
        import megatron.bridge.training.setup  # noqa: F401  (patched at activation, not on import)
        import megatron.bridge.training.train  # noqa: F401
    import gemma4vl.training.finetune as recipe

    draws: dict[int, list[list[float]]] = {}
    production_train = recipe._train

    def train(cfg, hf_dir, resume):
        # After finetune's setup_runtime, where the production _train imports these modules itself.
        import gemma4vl.config.container as container
        import gemma4vl.training.forward_step as forward_step

        forward_step.ForwardStep = _recording_forward_step(job, draws)
        container.build_config_container = _with_job_options(container.build_config_container, job)
        return production_train(cfg, hf_dir, resume)

    recipe._train = train
    result = recipe.finetune(job.run)
    exit_status = recipe.main_exit_code(result)
    rank = int(os.environ["RANK"])
    job.result_path(rank).write_text(json.dumps({
        "exit_status": exit_status, "steps": result.steps, "resumed_from": result.resumed_from,
        "preempted": result.preempted, "patched": _patched_state(), "rng_draws": draws,
        "usr1_ignored_after_training": signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN,
    }))
    return exit_status


def _job_process(job: Job, rank: int, port: int, environment: dict) -> None:
    """Target of one rank's process: the torchrun variables, the job, its exit status (99: it raised)."""
    os.environ.clear()
    os.environ.update(environment)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(job.world_size),
                      LOCAL_WORLD_SIZE=str(job.world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        status = finetune_job(job)
    except BaseException:  # noqa: BLE001 -- written down for the test, which reports it
        job.result_path(rank, ".traceback").write_text(traceback.format_exc())
        status = 99
    sys.exit(status)


def _run_ranks(job: Job, timeout: float, environment: dict) -> tuple[list[int | None], bool]:
    """In the job server: fork the job's ranks, wait for them; (exit statuses, timed out). A rank that fails ends
    the others at once (they would wait in a collective)."""
    context = mp.get_context("fork")
    port = free_port()
    processes = [context.Process(target=_job_process, args=(job, rank, port, environment), daemon=False)
                 for rank in range(job.world_size)]
    for process in processes:
        process.start()
    deadline = time.monotonic() + timeout
    try:
        while any(process.is_alive() for process in processes):
            if any(p.exitcode not in (None, 0, 75) for p in processes) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
    finally:
        for process in processes:
            if process.is_alive():
                process.kill()
            process.join(5)
    return [process.exitcode for process in processes], time.monotonic() > deadline


def _job_server(connection) -> None:
    """Import what ``recipes/finetune.py`` imports before it runs (Megatron-Core, Megatron-Bridge, transformers:
    ``gemma4vl.training.finetune``; about 13 s per process on the loaded 2-core machine), then run each job asked
    for with its ranks forked from here, so that no rank pays the imports again."""
    import gemma4vl.training.finetune  # noqa: F401

    while (request := connection.recv()) is not None:
        connection.send(_run_ranks(*request))
    os._exit(0)  # nothing to flush; the interpreter's own shutdown (Megatron, torch) takes ~20 s here


@pytest.fixture(scope="module")
def job_server():
    """The module's job server: a fresh (spawned) interpreter, not daemonic (its ranks start processes)."""
    context = mp.get_context("spawn")
    connection, server_end = context.Pipe()
    server = context.Process(target=_job_server, args=(server_end,), name="finetune-job-server", daemon=False)
    server.start()
    yield connection
    connection.send(None)
    server.join(30)
    if server.is_alive():
        server.kill()
        server.join(5)


def run_job(job_server, job: Job, timeout: float = RUN_TIMEOUT) -> list[dict]:
    """Run ``job`` in the job server; per rank, what ``finetune_job`` wrote. A failure fails the test with the
    rank's traceback."""
    job_server.send((job, timeout, dict(os.environ)))
    if not job_server.poll(timeout + 120):  # the server's first job waits for its imports
        raise TimeoutError(f"the job server did not answer within {timeout + 120:g} s")
    exit_statuses, timed_out = job_server.recv()
    for rank in range(job.world_size):
        if job.result_path(rank, ".traceback").exists():
            raise AssertionError(f"{job.name} rank {rank} failed:\n{job.result_path(rank, '.traceback').read_text()}")
    if timed_out:
        raise TimeoutError(f"{job.name} did not finish within {timeout:g} s")
    results = []
    for rank, exit_status in enumerate(exit_statuses):
        path = job.result_path(rank)
        assert path.exists(), f"{job.name} rank {rank} exited with status {exit_status} without a result"
        result = json.loads(path.read_text())
        assert exit_status == result["exit_status"], (exit_status, result)
        result["rng_draws"] = {int(step): draws for step, draws in result["rng_draws"].items()}
        results.append(result)
    return results


def assert_close_by_step(got: dict[int, float], expected: dict[int, float], *, rtol: float, atol: float = 0.0):
    """``got`` and ``expected`` have the same steps and equal values (within the tolerance) at each."""
    assert sorted(got) == sorted(expected), (got, expected)
    torch.testing.assert_close([got[s] for s in sorted(got)], [expected[s] for s in sorted(got)], rtol=rtol,
                               atol=atol)


def iterations(first: int, last: int) -> list[int]:
    return list(range(first, last + 1))


# --------------------------------------------------------------------------------------------------------------
# The runs (module-scoped: several tests inspect each)
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference_run(job_server, inputs, tmp_path_factory):
    """6 steps on one process: evaluation every 2, a checkpoint every 3, TensorBoard, every optional metric."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    (result,) = run_job(job_server, Job(run_config(inputs, run_dir), "reference", all_reporting=True))
    assert result["exit_status"] == 0 and result["steps"] == TRAIN_ITERS and not result["preempted"], result
    assert result["usr1_ignored_after_training"], result
    return {**result, "run_dir": run_dir, "losses": losses(run_dir, "loss"),
            "val_losses": losses(run_dir, "val_loss")}


@pytest.fixture(scope="module")
def sigterm_run(job_server, inputs, tmp_path_factory):
    """The same run (no evaluation, no interval checkpoint) receiving SIGTERM during step 3; then the same command
    again in the same run directory, which resumes from the checkpoint the signal saved (imports in the other
    order)."""
    run_dir = tmp_path_factory.mktemp("sigterm") / "run"
    run = run_config(inputs, run_dir, "trainer.eval_interval=null", "checkpoint.save_interval=null")
    (stopped,) = run_job(job_server, Job(run, "stopped", sigterm_at_iteration=SAVE_AT))
    stopped = {**stopped, "losses": losses(run_dir, "loss"),
               "checkpoints": sorted(p.name for p in (run_dir / "checkpoints").glob("iter_*"))}
    (resumed,) = run_job(job_server, Job(run, "resumed", import_bridge_before_runtime=True))
    return stopped, {**resumed, "losses": losses(run_dir, "loss")}


# --------------------------------------------------------------------------------------------------------------
# Single process
# --------------------------------------------------------------------------------------------------------------


def test_losses_are_pinned_and_fall(reference_run):
    assert reference_run["patched"] == {"seed": True, "setup_initialize": True}
    assert_close_by_step(reference_run["losses"], EXPECTED_LOSSES, rtol=PINNED_RTOL)
    assert reference_run["losses"][TRAIN_ITERS] < reference_run["losses"][1] - 1.0, reference_run["losses"]


def test_evaluation_runs_at_the_interval_and_reports_its_loss(reference_run):
    assert_close_by_step(reference_run["val_losses"], EXPECTED_VAL_LOSSES, rtol=PINNED_RTOL)
    assert sorted(reference_run["val_losses"]) == list(range(EVAL_INTERVAL, TRAIN_ITERS + 1, EVAL_INTERVAL))
    assert reference_run["val_losses"][TRAIN_ITERS] < reference_run["val_losses"][EVAL_INTERVAL]


def test_checkpoints_are_written_at_the_interval_in_torch_dist_format(reference_run):
    root = reference_run["run_dir"] / "checkpoints"
    assert (root / "latest_checkpointed_iteration.txt").read_text().strip() == str(TRAIN_ITERS)
    assert (root / "latest_train_state.pt").is_file()
    assert sorted(path.name for path in root.glob("iter_*")) == [f"iter_{SAVE_AT:07d}", f"iter_{TRAIN_ITERS:07d}"]
    iteration_dir = root / f"iter_{SAVE_AT:07d}"
    files = {path.name for path in iteration_dir.iterdir()}
    assert {"metadata.json", "run_config.yaml", "train_state.pt", ".metadata"} <= files
    assert json.loads((iteration_dir / "metadata.json").read_text())["sharded_backend"] == "torch_dist"
    assert list(iteration_dir.glob("*.distcp"))
    train_state = torch.load(iteration_dir / "train_state.pt", weights_only=False)
    assert train_state["step"] == SAVE_AT and train_state["consumed_train_samples"] == SAVE_AT * GLOBAL_BATCH


def test_tensorboard_event_files_hold_the_losses(reference_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (event_file,) = (reference_run["run_dir"] / "tensorboard").glob("events.out.tfevents.*")
    events = EventAccumulator(str(event_file))
    events.Reload()
    logged = {event.step: event.value for event in events.Scalars("lm loss")}
    assert_close_by_step(logged, reference_run["losses"], rtol=1e-6)
    validation = {event.step: event.value for event in events.Scalars("lm loss validation")}
    assert_close_by_step(validation, reference_run["val_losses"], rtol=1e-6)
    tags = set(events.Tags()["scalars"])
    # The optional metrics the job turned on, each computed by the loop on the CPU backend.
    expected = {"learning-rate", "iteration-time", "throughput/tokens_per_sec", "world-size", "params-norm",
                "grad-norm", "num-zeros", "forward-backward-time"}
    assert expected <= tags, expected - tags


# --------------------------------------------------------------------------------------------------------------
# SIGTERM and resume; the distributed optimizer's checkpoint
# --------------------------------------------------------------------------------------------------------------


def test_sigterm_saves_a_checkpoint_and_exits_with_the_requeue_status(reference_run, sigterm_run):
    # Megatron-Bridge's DistributedSignalHandler only records the signal; at the end of the iteration
    # checkpoint_and_decide_exit sees it on some rank (all-gather over gloo), saves a checkpoint and stops the loop;
    # finetune reports the run as preempted and recipes.finetune exits with 75 (EXIT_PREEMPTED).
    stopped, _ = sigterm_run
    assert stopped["exit_status"] == 75 and stopped["preempted"] and stopped["steps"] == SAVE_AT, stopped
    # A repeated SIGUSR1 while the stopped process shuts down must not turn its 75 into death by signal (138).
    assert stopped["usr1_ignored_after_training"], stopped
    assert stopped["checkpoints"] == [f"iter_{SAVE_AT:07d}"]
    # It trained as the reference did until the signal (another process: see PINNED_RTOL), with the same draws.
    assert_close_by_step(stopped["losses"], {s: reference_run["losses"][s] for s in iterations(1, SAVE_AT)},
                         rtol=PINNED_RTOL)
    assert stopped["rng_draws"] == {s: reference_run["rng_draws"][s] for s in iterations(1, SAVE_AT)}


def test_resume_after_sigterm_matches_the_uninterrupted_run(reference_run, sigterm_run):
    # A fresh process loads the step-3 checkpoint and trains to 6: equal losses show that model, optimizer (Adam
    # moments and step), scheduler, data position and RNG state were all restored. The distributed optimizer's
    # state is in its default "dp_reshardable" format: resuming it used to continue with Adam step 1 (cpu_backend,
    # section D), which the losses after the resume show.
    _, resumed = sigterm_run
    assert resumed["exit_status"] == 0 and resumed["resumed_from"] == SAVE_AT and resumed["steps"] == TRAIN_ITERS
    assert resumed["patched"] == {"seed": True, "setup_initialize": True}
    assert_close_by_step(resumed["losses"], reference_run["losses"], rtol=PINNED_RTOL)
    assert resumed["rng_draws"] == {s: reference_run["rng_draws"][s] for s in iterations(SAVE_AT + 1, TRAIN_ITERS)}


@pytest.mark.slow
def test_fully_reshardable_checkpoint_resumes_with_another_data_parallel_size(job_server, inputs, reference_run,
                                                                              tmp_path):
    # The format to resume with a different number of ranks (e.g. a Slurm requeue on fewer nodes): saved by one
    # process at step 3, resumed by two (data parallel 2). Loading it used to fail with KeyError: 'step' (section D).
    run = run_config(inputs, tmp_path / "run", "trainer.eval_interval=null", "checkpoint.save_interval=null")
    job = Job(run, "stopped", sigterm_at_iteration=SAVE_AT, fully_reshardable_optimizer=True)
    (stopped,) = run_job(job_server, job)
    assert stopped["exit_status"] == 75 and stopped["steps"] == SAVE_AT
    results = run_job(job_server, Job(run, "resumed", world_size=2, fully_reshardable_optimizer=True))
    assert [(r["resumed_from"], r["steps"]) for r in results] == [(SAVE_AT, TRAIN_ITERS)] * 2
    # Data parallel 2 against 1 process: same math, another summation order.
    assert_close_by_step(losses(tmp_path / "run", "loss"), reference_run["losses"], rtol=PINNED_RTOL,
                         atol=1e-5)


# --------------------------------------------------------------------------------------------------------------
# Two gloo processes
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", [pytest.param([], id="data-parallel-2-distributed-optimizer"),
                                    pytest.param(["experiment=tiny_tp2"], id="tensor-parallel-2-sequence-parallel")])
def test_two_processes_match_the_one_process_run(job_server, inputs, reference_run, tmp_path, layout):
    # Same global batch (2) and seed. Data parallel: DP = 2 / (TP 1 * PP 1) = 2 ranks of one micro batch each,
    # gradients averaged, Adam's state sharded by the distributed optimizer. Tensor parallel (conf/parallel/tp2):
    # DP = 2 / (TP 2 * PP 1) = 1, every layer sharded over both ranks, sequence parallel between them. The weights
    # are the checkpoint's in every layout. Every optional metric: timers, norms and flags reduced over two ranks.
    run = run_config(inputs, tmp_path / "run", *layout, f"trainer.train_iters={PARALLEL_ITERS}",
                     "trainer.eval_interval=null", "checkpoint.save_interval=null")
    results = run_job(job_server, Job(run, "parallel", world_size=2, all_reporting=True,
                          import_bridge_before_runtime=bool(layout)))
    for rank, result in enumerate(results):
        assert result["exit_status"] == 0 and result["steps"] == PARALLEL_ITERS, (rank, result)
        assert result["patched"] == {"seed": True, "setup_initialize": True}, rank
    expected = {s: reference_run["losses"][s] for s in iterations(1, PARALLEL_ITERS)}
    assert_close_by_step(losses(tmp_path / "run", "loss"), expected, rtol=PINNED_RTOL, atol=1e-5)
