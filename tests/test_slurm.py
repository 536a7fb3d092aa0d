"""launch/finetune.sh under a real Slurm: a throwaway single-node instance (munged, slurmctld, slurmd from Debian's
slurm-wlm, installed when missing and started by launch/slurm_local/slurm_local.sh in a temporary directory, on free
ports) runs 2-task CPU jobs (gloo, DP = 2) of the tiny model:

- `sbatch --wait` runs to completion and writes the HF export (exit status 0);
- a job signalled mid-training, by `scancel --signal=USR1 --full` and by the time-limit warning
  (`--signal=B:USR1@lead`), saves a checkpoint, requeues itself, resumes (SLURM_RESTART_COUNT=1), and its per-step
  losses equal the uninterrupted run's (1e-5 relative, the resume guarantee of docs/training.md);
- a failing run exits non-zero with the trainer's error in the job output and is not requeued; inconsistent
  counts and a missing Slurm are refused before anything starts;
- every daemon and job process the instance started is gone after it is stopped.

The instance is installed when missing (apt-get; CI runs as root on a fresh Debian machine): where that is
impossible the module's fixture fails, it never skips.
"""

import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from gemma4vl.testing.distributed import free_port
from gemma4vl.testing.pytest_fixtures import losses

ROOT = Path(__file__).resolve().parents[1]
SLURM_LOCAL = ROOT / "launch" / "slurm_local" / "slurm_local.sh"
LAUNCHER = "launch/finetune.sh"
EXIT_PREEMPTED = 75
STEPS = 12
# Two gloo ranks, one per core of the CI machine, overriding the script's GPU defaults (8 GPUs, 8 tasks per node).
# The time limit stays above the script's time-limit warning lead (900 s) plus slurmctld's 30 s check period.
CPU_JOB = ("--gpus-per-node=0", "--ntasks-per-node=2", "--time=30")
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
# Losses of the first steps of the 1-process run in tests/test_recipe.py (same inputs, same global batch): the
# 2-rank job must compute the same ones. Steps 1-3 only: from step 4 on the LR depends on train_iters (8 there).
PINNED = {1: 6.12452, 2: 6.14092, 3: 5.64748}


def _alive(pid: int) -> bool:
    """Running (a zombie, state Z, has exited)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


class LocalSlurm:
    """Clients of one local instance: its SLURM_CONF (and this environment's python for the launcher) go into
    each command's environment only, never into this process's."""

    def __init__(self, root: Path):
        self.root = root
        self.conf = root / "slurm.conf"

    def env(self, **extra: str) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf), "PYTHON": sys.executable, **extra}

    def cmd(self, *args: str, timeout: float = 60) -> str:
        proc = subprocess.run(args, env=self.env(), cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        assert proc.returncode == 0, f"{' '.join(args)}: {proc.stdout}{proc.stderr}"
        return proc.stdout

    def sbatch(self, out: Path, *options: str, overrides=(), wait=False, timeout=600):
        """Submit launch/finetune.sh from the checkout (its submit directory), output to ``out``."""
        args = ["sbatch", *(["--wait"] if wait else ["--parsable"]), f"--output={out}", *options, LAUNCHER, *overrides]
        return subprocess.run(args, env=self.env(MASTER_PORT=str(free_port())), cwd=ROOT, capture_output=True,
                              text=True, timeout=timeout)

    def submit(self, out: Path, *options: str, overrides=()) -> int:
        proc = self.sbatch(out, *options, overrides=overrides)
        assert proc.returncode == 0, proc.stderr
        return int(proc.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        return dict(re.findall(r"(\w+)=(\S*)", self.cmd("scontrol", "show", "job", "-o", str(job_id))))

    def wait_final(self, job_id: int, timeout: float = 600) -> dict[str, str]:
        """The job's record once it has ended for good (the same final state and restart count 1 s apart: a
        requeue passes through transient states)."""
        deadline = time.time() + timeout
        last = None
        while time.time() < deadline:
            info = self.job(job_id)
            key = (info["JobState"], info["Restarts"])
            if info["JobState"] in FINAL_STATES and key == last:
                return info
            last = key if info["JobState"] in FINAL_STATES else None
            time.sleep(1)
        raise AssertionError(f"job {job_id} still {self.job(job_id)['JobState']} after {timeout} s")

    def ranks(self, job_id: int) -> list[int]:
        """PIDs of the job's trainer processes (with their data-loader workers)."""
        pids = []
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            env = _environ(int(proc.name))
            if env.get("SLURM_CONF") != str(self.conf) or env.get("SLURM_JOB_ID") != str(job_id):
                continue
            try:
                cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"recipes.finetune" in cmdline:
                pids.append(int(proc.name))
        return pids


def _start(root: Path, gpus: int = 0) -> LocalSlurm:
    proc = subprocess.run([str(SLURM_LOCAL), "start", str(root), "--gpus", str(gpus)], capture_output=True,
                          text=True, timeout=900)
    if proc.returncode != 0:
        pytest.fail(f"could not start a local Slurm (slurm_local.sh start, status {proc.returncode}):\n"
                    f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return LocalSlurm(root)


def _daemon_pids(root: Path) -> dict[str, int]:
    return {name: int((root / "run" / f"{name}.pid").read_text()) for name in ("munged", "slurmctld", "slurmd")}


def _stop(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(SLURM_LOCAL), "stop", str(root)], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def slurm():
    """One local Slurm for the module (2 fake GPUs declared, so GPU requests can be scheduled); stopped at the end,
    pass or fail, and checked to be gone."""
    root = Path(tempfile.mkdtemp(prefix="g4vl-slurm-"))  # short: munge's and slurmd's unix socket paths
    try:
        instance = _start(root, gpus=2)
        daemons = _daemon_pids(root)
        yield instance
    finally:
        stopped = _stop(root) if (root / "slurm.conf").exists() else None
        left = [pid for pid in locals().get("daemons", {}).values() if _alive(pid)]
        shutil.rmtree(root, ignore_errors=True)
        assert stopped is None or stopped.returncode == 0, stopped.stderr
        assert not left, f"daemons still running after stop: {left}"


def overrides(inputs, run_dir, *extra):
    ckpt, data = inputs
    return [f"hydra.run.dir={run_dir}", f"model.hf_path={ckpt}", f"data.path={data}",
            "data.seq_length=512", "data.num_workers=0", "data.persistent_workers=false",
            f"trainer.train_iters={STEPS}", "trainer.global_batch_size=2", "trainer.log_interval=1",
            "trainer.eval_interval=null", "checkpoint.save_interval=100", "checkpoint.keep_last=null",
            "optim.warmup_iters=2", *extra]


@pytest.fixture(scope="module")
def uninterrupted(slurm, inputs, tmp_path_factory):
    """`sbatch --wait launch/finetune.sh ...`: the uninterrupted run (with the HF export) the others compare with."""
    tmp = tmp_path_factory.mktemp("slurm-uninterrupted")
    run_dir, out = tmp / "run", tmp / "job.out"
    proc = slurm.sbatch(out, *CPU_JOB, overrides=overrides(inputs, run_dir), wait=True)
    job_id = int(re.search(r"Submitted batch job (\d+)", proc.stdout).group(1))
    return proc, slurm.job(job_id), run_dir, out.read_text() if out.exists() else ""


def test_sbatch_wait_runs_to_completion_and_exports(uninterrupted):
    proc, job, run_dir, out = uninterrupted
    assert proc.returncode == 0, f"sbatch --wait exited {proc.returncode}:\n{proc.stderr}\n{out[-4000:]}"
    assert (job["JobState"], job["Restarts"], job["ExitCode"]) == ("COMPLETED", "0", "0:0")
    assert "1 node(s) x 2 task(s), CPU (gloo" in out and "restart 0" in out and "gemma4vl: done" in out
    got = losses(run_dir)
    assert sorted(got) == list(range(1, STEPS + 1)) and got[STEPS] < got[1] - 1.0
    for step, expected in PINNED.items():  # DP = 2 over two Slurm tasks computes what one process does
        assert got[step] == pytest.approx(expected, abs=1e-4), (step, got[step], expected)
    import json

    index = json.loads((run_dir / "hf_export" / "model.safetensors.index.json").read_text())
    assert len(index["weight_map"]) == 119 and (run_dir / "hf_export" / "config.json").is_file()


def _wait_for(predicate, what, timeout=300, job=None, slurm=None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if job is not None and slurm.job(job)["JobState"] in FINAL_STATES:
            raise AssertionError(f"job {job} ended while waiting for {what}")
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _pause_mid_training(slurm, job_id, run_dir, out):
    """Once step 3 is logged, stop the job's trainer processes (SIGSTOP): the run stands still mid-training, as a
    long one would, while the signal under test travels (signals to a stopped process stay pending)."""
    _wait_for(lambda: max(losses(run_dir), default=0) >= 3, "step 3", job=job_id, slurm=slurm)
    ranks = slurm.ranks(job_id)
    assert len(ranks) >= 2, ranks
    for pid in ranks:
        os.kill(pid, signal.SIGSTOP)
    return ranks


def _resume(ranks):
    for pid in ranks:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass


def _assert_requeued_and_resumed(slurm, job_id, run_dir, out, reference):
    job = slurm.wait_final(job_id)
    text = out.read_text()
    assert (job["JobState"], job["Restarts"], job["ExitCode"]) == ("COMPLETED", "1", "0:0"), text[-4000:]
    stopped = re.findall(r"stopped by a signal after step (\d+); checkpoint saved", text)
    assert stopped, text[-4000:]
    saved = int(stopped[0])
    assert 3 <= saved < STEPS
    assert f"Exited with exit code {EXIT_PREEMPTED}" in text
    assert f"gemma4vl: checkpoint saved; requeueing job {job_id}" in text
    # The second run: SLURM_RESTART_COUNT=1, resumed from the signal's checkpoint, finished.
    assert re.search(rf"gemma4vl: job {job_id} restart 1 ", text) and "gemma4vl: done" in text
    assert f"resuming from the checkpoint of step {saved}" in text
    got = losses(run_dir)
    assert sorted(got) == list(range(1, STEPS + 1))
    # docs/training.md: a resumed run's losses equal the uninterrupted run's to 1e-5 relative (CPU, fp32).
    for step in range(1, STEPS + 1):
        assert got[step] == pytest.approx(reference[step], rel=1e-5), (step, got, reference)
    return saved


def test_scancel_usr1_saves_requeues_and_resumes_exactly(slurm, inputs, uninterrupted, tmp_path):
    """`scancel --signal=USR1 --full` (what an operator or a preemption script sends): every rank and the batch
    shell get SIGUSR1. With a data-loader worker per rank (Slurm signals the workers too)."""
    reference = losses(uninterrupted[2])
    run_dir, out = tmp_path / "run", tmp_path / "job.out"
    job_id = slurm.submit(out, *CPU_JOB, overrides=overrides(inputs, run_dir, "export.enabled=false",
                                                            "data.num_workers=1"))
    ranks = _pause_mid_training(slurm, job_id, run_dir, out)
    try:
        slurm.cmd("scancel", "--signal=USR1", "--full", str(job_id))
        _wait_for(lambda: "caught SIGUSR1" in out.read_text(), "the batch shell's trap", timeout=60)
    finally:
        _resume(ranks)
    _assert_requeued_and_resumed(slurm, job_id, run_dir, out, reference)


def test_time_limit_signal_saves_requeues_and_resumes_exactly(slurm, inputs, uninterrupted, tmp_path):
    """The time-limit warning: Slurm sends `--signal=B:USR1@lead` to the batch shell alone when the time left falls
    under the lead (checked every 30 s by slurmctld); the shell passes it on to the ranks."""
    reference = losses(uninterrupted[2])
    run_dir, out = tmp_path / "run", tmp_path / "job.out"
    lead = 200  # measured: slurmctld checks every 30 s and signals once the time left is under about lead + 30 s
    job_id = slurm.submit(out, "--gpus-per-node=0", "--ntasks-per-node=2", "--time=10", f"--signal=B:USR1@{lead}",
                          overrides=overrides(inputs, run_dir, "export.enabled=false"))
    ranks = _pause_mid_training(slurm, job_id, run_dir, out)
    try:
        # Shorten the limit mid-run so that 180-240 s remain: a check within 40 s sends the warning, leaving the
        # ranks 2.5 minutes or more to save before the limit.
        hours, minutes, seconds = (int(x) for x in slurm.job(job_id)["RunTime"].split(":")[-3:])
        elapsed = 3600 * hours + 60 * minutes + seconds
        slurm.cmd("scontrol", "update", f"JobId={job_id}", f"TimeLimit={math.ceil((elapsed + 180) / 60)}")
        _wait_for(lambda: "caught SIGUSR1" in out.read_text(), "the time-limit signal", timeout=90)
    finally:
        _resume(ranks)
    # The requeued job keeps its time limit: give the second run room (as its next allocation would have).
    _wait_for(lambda: "requeueing job" in out.read_text(), "the requeue", timeout=120)
    slurm.cmd("scontrol", "update", f"JobId={job_id}", "TimeLimit=10")
    _assert_requeued_and_resumed(slurm, job_id, run_dir, out, reference)


@pytest.mark.slow
def test_usr1_during_startup_is_not_lost(slurm, inputs, uninterrupted, tmp_path):
    """A SIGUSR1 that reaches the ranks while they are still importing (no handler yet) neither ends them nor is
    forgotten: the batch shell repeats it every 30 s while they run, and the run saves, requeues and resumes."""
    reference = losses(uninterrupted[2])
    run_dir, out = tmp_path / "run", tmp_path / "job.out"
    job_id = slurm.submit(out, *CPU_JOB, overrides=overrides(inputs, run_dir, "export.enabled=false"))
    _wait_for(lambda: len(slurm.ranks(job_id)) >= 2, "the ranks' processes", job=job_id, slurm=slurm)
    slurm.cmd("scancel", "--signal=USR1", "--full", str(job_id))
    ranks = _pause_mid_training(slurm, job_id, run_dir, out)  # the first signal did not stop them
    try:
        _wait_for(lambda: "passing SIGUSR1 on again" in out.read_text(), "the repeated signal", timeout=60)
    finally:
        _resume(ranks)
    _assert_requeued_and_resumed(slurm, job_id, run_dir, out, reference)


@pytest.mark.slow
def test_scancel_saves_and_is_not_requeued(slurm, inputs, tmp_path):
    """A plain `scancel` (SIGTERM to every process): the ranks save and stop, and the cancelled job stays cancelled."""
    run_dir, out = tmp_path / "run", tmp_path / "job.out"
    job_id = slurm.submit(out, *CPU_JOB, overrides=overrides(inputs, run_dir, "export.enabled=false"))
    ranks = _pause_mid_training(slurm, job_id, run_dir, out)
    try:
        slurm.cmd("scancel", str(job_id))
        _wait_for(lambda: "caught SIGTERM" in out.read_text(), "the batch shell's trap", timeout=60)
    finally:
        _resume(ranks)
    _wait_for(lambda: "not requeueing it" in out.read_text(), "the batch shell's end", timeout=120)
    job = slurm.wait_final(job_id)
    assert (job["JobState"], job["Restarts"]) == ("CANCELLED", "0")
    text = out.read_text()
    saved = int(re.search(r"stopped by a signal after step (\d+); checkpoint saved", text).group(1))
    assert 3 <= saved < STEPS and max(losses(run_dir)) == saved
    assert (run_dir / "checkpoints" / "latest_checkpointed_iteration.txt").read_text().strip() == str(saved)


def test_failing_run_exits_nonzero_with_the_error_and_is_not_requeued(slurm, inputs, tmp_path):
    run_dir, out = tmp_path / "run", tmp_path / "job.out"
    proc = slurm.sbatch(out, *CPU_JOB, overrides=overrides(inputs, run_dir, "trainer.train_iters=0"), wait=True)
    text = out.read_text()
    assert proc.returncode == 1, (proc.returncode, text[-3000:])
    job = slurm.job(int(re.search(r"Submitted batch job (\d+)", proc.stdout).group(1)))
    assert (job["JobState"], job["Restarts"], job["ExitCode"]) == ("FAILED", "0", "1:0")
    assert "trainer.train_iters=0 must be >= 1" in text  # the trainer's own message
    assert "the run failed with status 1; not requeued" in text and "requeueing" not in text


def test_a_rank_that_dies_ends_the_job_after_the_shutdown_window(slurm, inputs, tmp_path):
    """Rank 0 killed (as by a crash or an OOM kill) while rank 1 stands still in the middle of training (SIGSTOP:
    it would wait for rank 0 until the process-group timeout): srun stops rank 1 once the launcher's shutdown
    window (5 s here) has passed since rank 0 ended, and the job fails without a requeue."""
    run_dir, out = tmp_path / "run", tmp_path / "job.out"
    # Launcher options come first, before the Hydra overrides.
    job_id = slurm.submit(out, *CPU_JOB, overrides=["--shutdown-window", "5",
                                                    *overrides(inputs, run_dir, "export.enabled=false")])
    ranks = _pause_mid_training(slurm, job_id, run_dir, out)
    first = min(ranks, key=lambda pid: int(_environ(pid).get("SLURM_PROCID", "9")))
    killed = time.time()
    os.kill(first, signal.SIGKILL)
    job = slurm.wait_final(job_id, timeout=120)
    ended = time.time()
    text = out.read_text()
    assert (job["JobState"], job["Restarts"]) == ("FAILED", "0"), text[-3000:]
    assert "srun: First task exited 5s ago" in text and "not requeued" in text and "requeueing" not in text
    # 5 s window, plus Slurm's reaction and this test's 1 s polls; without the window it would never end.
    assert 5 <= ended - killed < 40, ended - killed
    assert not any(_alive(pid) for pid in ranks)


def test_inconsistent_counts_are_refused(slurm, tmp_path):
    """One task per GPU: 2 GPUs with 1 task per node is refused before any process starts (status 2)."""
    out = tmp_path / "job.out"
    proc = slurm.sbatch(out, "--gpus-per-node=2", "--ntasks-per-node=1", "--time=30", overrides=["name=x"],
                        wait=True)
    text = out.read_text()
    assert proc.returncode == 2, text
    assert "1 task(s) per node but 2 GPU(s) per node: one task per GPU" in text
    assert "gemma4vl: job" not in text  # nothing started


def test_python_that_cannot_import_gemma4vl_is_refused(slurm, tmp_path):
    out = tmp_path / "job.out"
    args = ["sbatch", "--wait", f"--output={out}", *CPU_JOB, LAUNCHER, "name=x"]
    proc = subprocess.run(args, env=slurm.env(PYTHON="/bin/true"), cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    text = out.read_text()
    assert proc.returncode == 2, text
    assert "/bin/true cannot import gemma4vl and recipes.finetune" in text


def test_outside_slurm_and_a_bad_window_are_refused():
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    proc = subprocess.run(["bash", LAUNCHER, "name=x"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "not inside a Slurm job" in proc.stderr, proc.stderr
    proc = subprocess.run(["bash", LAUNCHER, "--shutdown-window", "0", "name=x"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "--shutdown-window must be a positive number of seconds, got '0'" in proc.stderr


def test_stop_ends_every_daemon_and_job_process(slurm, tmp_path):
    """A second instance beside the module's (own directory, own ports): with a job running, `stop` leaves none of
    its daemons, step daemons or job processes behind."""
    root = Path(tempfile.mkdtemp(prefix="g4vl-slurm-"))
    try:
        other = _start(root)
        daemons = _daemon_pids(root)
        script = tmp_path / "sleep.sh"
        script.write_text("#!/bin/bash\nsrun sleep 300\n")
        job_id = int(other.cmd("sbatch", "--parsable", f"--output={tmp_path / 'sleep.out'}", str(script)).strip())
        job_processes = []

        def sleeping():
            job_processes[:] = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()
                                and _environ(int(p.name)).get("SLURM_JOB_ID") == str(job_id)
                                and _environ(int(p.name)).get("SLURM_CONF") == str(other.conf)]
            return any(Path(f"/proc/{pid}/comm").read_text().strip() == "sleep" for pid in job_processes
                       if Path(f"/proc/{pid}").exists())

        _wait_for(sleeping, "the job's sleep", timeout=60)
        steps = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()
                 and (p / "comm").exists() and (p / "comm").read_text().strip() == "slurmstepd"
                 and _environ(int(p.name)).get("SLURM_CONF") == str(other.conf)]
        assert len(job_processes) >= 3 and steps, (job_processes, steps)  # batch shell, srun, sleep; slurmstepd
        assert all(_alive(pid) for pid in daemons.values())
        proc = _stop(root)
        assert proc.returncode == 0, proc.stderr
        left = [pid for pid in [*daemons.values(), *job_processes, *steps] if _alive(pid)]
        assert not left, left
    finally:
        _stop(root)
        shutil.rmtree(root, ignore_errors=True)


def test_process_group_timeout_is_the_configured_one(tmp_path):
    """trainer.distributed_timeout_minutes reaches the default process group (and Megatron's groups through the
    ConfigContainer, see tests/test_config.py)."""
    code = ("import torch, torch.distributed as dist\n"
            "from gemma4vl.runtime.distributed import init_process_group\n"
            "init_process_group('cpu', 7)\n"
            "print(dist.group.WORLD._get_backend(torch.device('cpu')).options._timeout.total_seconds())\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert float(proc.stdout.strip().splitlines()[-1]) == 7 * 60
    bad = subprocess.run([sys.executable, "-c", code.replace("'cpu', 7", "'cpu', 0")], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "trainer.distributed_timeout_minutes=0 must be >= 1" in bad.stderr
