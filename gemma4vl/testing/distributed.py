"""Run a function on N fresh processes that form a torch.distributed world: multi-rank tests on one machine.

``run_distributed(fn, world_size, *args)`` starts ``world_size`` new processes, gives each the caller's
environment plus the torchrun variables (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``,
``MASTER_ADDR=127.0.0.1``, ``MASTER_PORT`` = a free port), creates the default process group (gloo unless told
otherwise), calls ``fn(*args)`` and returns the per-rank return values in rank order.

The processes come from torch.multiprocessing's ``forkserver`` start method: a clean server process (started the
spawn way, so nothing of the caller's state -- CUDA, process groups, Megatron globals, patched modules -- is in
it) imports :data:`FORKSERVER_PRELOAD` once and forks every rank from there. Each rank therefore starts as fresh
as a spawned one, without paying Megatron-Core's ~10 s import per rank and per call. Ranks that use CUDA
(``uses_cuda=True``) are spawned instead: CUDA cannot be initialised in a process forked from one where torch
queried the GPU, which importing Megatron-Core does.

Failure handling, so that a broken test fails instead of hanging:

- a rank that raises is reported as :class:`RankFailedError` with the rank and the child's formatted traceback
  (chained to the original exception when it can be pickled); the other ranks are killed at once, since they
  are typically blocked in a collective that will never complete;
- a rank that dies without reporting (segfault, ``os._exit``) is reported with its exit code;
- after ``timeout`` seconds all ranks still running are killed and :class:`DistributedTimeoutError` names them.

``fn`` and ``args`` must be picklable (``fn`` a module-level function); so must the return values.
"""

from __future__ import annotations

import os
import pickle
import queue
import socket
import time
import traceback
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.multiprocessing as mp

# How long the parent waits for a killed child to disappear before giving up on it.
_KILL_GRACE_S = 5.0

# Ranks are forked from multiprocessing's fork server, which imports these modules once per test session: a fresh
# interpreter per rank would re-import Megatron-Core (about 10 s alone, 18 s for two ranks on two cores) on every
# call. The server only imports modules; it never initialises CUDA, a process group or Megatron state.
FORKSERVER_PRELOAD = (
    "gemma4vl.testing.distributed",
    "megatron.core.models.gpt",
    "megatron.core.optimizer",
    "megatron.core.distributed",
)


class RankFailedError(RuntimeError):
    """A rank of :func:`run_distributed` raised or died; ``rank`` and the child's ``remote_traceback`` are kept."""

    def __init__(self, rank: int, message: str, remote_traceback: str = ""):
        super().__init__(f"rank {rank} failed: {message}" + (f"\n\n{remote_traceback}" if remote_traceback else ""))
        self.rank = rank
        self.remote_traceback = remote_traceback


class DistributedTimeoutError(TimeoutError):
    """:func:`run_distributed` ran out of time; ``pending_ranks`` had not finished."""

    def __init__(self, timeout: float, pending_ranks: list[int]):
        super().__init__(f"ranks {pending_ranks} did not finish within {timeout:g} s; all ranks were killed")
        self.pending_ranks = pending_ranks


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _pickled_exception(exc: BaseException) -> bytes | None:
    try:
        payload = pickle.dumps(exc)
        pickle.loads(payload)
        return payload
    except Exception:  # the exception type or its arguments do not survive pickling: send the text only
        return None


def _child_main(
    rank: int,
    world_size: int,
    port: int,
    backend: str | None,
    uses_cuda: bool,
    num_threads: int,
    environment: dict[str, str],
    fn: Callable[..., Any],
    args: tuple,
    results: mp.Queue,
) -> None:
    """Entry point of one rank (runs in the new process)."""
    # The fork server was started with the caller's environment of that moment: use the caller's current one.
    os.environ.clear()
    os.environ.update(environment)
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(num_threads)
    try:
        if uses_cuda:
            torch.cuda.set_device(rank)
        if backend is not None:
            torch.distributed.init_process_group(
                backend=backend, init_method="env://", rank=rank, world_size=world_size, timeout=timedelta(minutes=5)
            )
        # Sent as plain-pickled bytes: torch's queue pickler would share tensor storage through a file descriptor
        # that the parent can only collect while this process is alive, and the rank may exit first (EOFError).
        value = pickle.dumps(fn(*args))
        results.put((rank, "ok", value, None, None))
    except BaseException as exc:  # noqa: BLE001 -- everything is reported to the parent, which re-raises it
        results.put((rank, "error", repr(exc), traceback.format_exc(), _pickled_exception(exc)))
    finally:
        if backend is not None and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _kill(processes: list) -> None:
    """Kill the started processes that are still alive and reap them."""
    started = [process for process in processes if process.pid is not None]
    for process in started:
        if process.is_alive():
            process.kill()
    deadline = time.monotonic() + _KILL_GRACE_S
    for process in started:
        process.join(max(0.0, deadline - time.monotonic()))


def _raise_rank_failure(rank: int, message: str, remote_traceback: str, pickled: bytes | None) -> None:
    original = pickle.loads(pickled) if pickled is not None else None
    raise RankFailedError(rank, message, remote_traceback) from original


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 300.0,
    backend: str | None = "gloo",
    uses_cuda: bool = False,
    num_threads: int | None = None,
) -> list[Any]:
    """Run ``fn(*args)`` on ranks ``0 .. world_size - 1`` in fresh processes; return their results by rank.

    Args:
        fn: a picklable (module-level) function; it sees the torchrun environment variables, and the default
            process group when ``backend`` is given.
        world_size: number of ranks (processes).
        *args: passed to ``fn`` on every rank (picklable).
        timeout: seconds for the whole run, process start-up included; on expiry every rank is killed.
        backend: process-group backend to initialise before calling ``fn`` (and destroy after), or ``None`` to let
            ``fn`` initialise torch.distributed itself (e.g. ``"nccl"`` through
            :func:`gemma4vl.runtime.distributed.initialize_model_parallel` with ``device="cuda"``).
        uses_cuda: the ranks use CUDA: they are spawned (not forked from the fork server) and rank ``r`` gets
            ``torch.cuda.set_device(r)`` before the process group is created.
        num_threads: torch intra-op threads per rank; default: the machine's cores shared out among the ranks.

    Raises:
        RankFailedError: a rank raised (the first failure reported) or exited without a result.
        DistributedTimeoutError: not all ranks finished within ``timeout``.
    """
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive integer, got {world_size!r}")
    try:
        pickle.dumps((fn, args))
    except Exception as exc:
        raise TypeError(f"run_distributed needs a picklable module-level fn and args: {exc}") from exc
    if num_threads is None:
        num_threads = max(1, (os.cpu_count() or 1) // world_size)

    if uses_cuda:
        context = mp.get_context("spawn")
    else:
        context = mp.get_context("forkserver")
        context.set_forkserver_preload(list(FORKSERVER_PRELOAD))  # takes effect when the server first starts
    results = context.Queue()
    port = free_port()
    processes = [
        context.Process(
            target=_child_main,
            args=(rank, world_size, port, backend, uses_cuda, num_threads, dict(os.environ), fn, args, results),
            name=f"run_distributed-rank{rank}",
            daemon=True,
        )
        for rank in range(world_size)
    ]
    try:
        for process in processes:
            process.start()
        return _collect(processes, results, timeout)
    finally:
        _kill(processes)
        results.close()


def _collect(processes: list, results: mp.Queue, timeout: float) -> list[Any]:
    """Wait for one report per rank; raise on the first failure, a silent death or the deadline."""
    deadline = time.monotonic() + timeout
    values: dict[int, Any] = {}
    while len(values) < len(processes):
        try:
            rank, status, value, remote_traceback, pickled = results.get(timeout=0.2)
        except queue.Empty:
            _check_silent_deaths(processes, values, results)
            if time.monotonic() > deadline:
                raise DistributedTimeoutError(timeout, [r for r in range(len(processes)) if r not in values]) from None
            continue
        if status == "error":
            _raise_rank_failure(rank, value, remote_traceback, pickled)
        values[rank] = pickle.loads(value)
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
    return [values[rank] for rank in range(len(processes))]


def _check_silent_deaths(processes: list, values: dict[int, Any], results: mp.Queue) -> None:
    """Raise for a rank that exited without putting a result (checked only while the queue is empty)."""
    for rank, process in enumerate(processes):
        if rank in values or process.is_alive() or process.exitcode is None:
            continue
        # The child may have put its report just before exiting: give the queue a last chance.
        try:
            late = results.get(timeout=1.0)
        except queue.Empty:
            message = f"process exited with code {process.exitcode} without reporting a result"
            raise RankFailedError(rank, message) from None
        late_rank, status, value, remote_traceback, pickled = late
        if status == "error":
            _raise_rank_failure(late_rank, value, remote_traceback, pickled)
        values[late_rank] = pickle.loads(value)
        return
