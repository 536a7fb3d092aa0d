"""A safetensors checkpoint written in place as tensors stream in.

Every tensor the export will produce is known in advance (the source checkpoint's tensors, with the export
dtype), so :class:`PlannedCheckpointWriter` lays out all shards first (greedy in the source's order, at most
``max_shard_bytes`` each unless one tensor alone is larger), writes each shard's header, and then writes every
tensor, or every expert slice of a grouped ``[E, ...]`` tensor, straight to its offset. Nothing is assembled or
buffered in memory: peak memory is the tensor in hand. :meth:`finish` checks every byte was written exactly once.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch

SAFETENSORS_DTYPE = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int64: "I64",
                     torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL"}
_ALIGN = 8



@dataclass
class _Planned:
    shard: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int  # absolute byte offset in the shard file
    nbytes: int
    written: set[int] = field(default_factory=set)  # -1: whole tensor, i >= 0: slice i of dim 0


class PlannedCheckpointWriter:
    """Writes the planned tensors (name -> (shape, dtype)) into ``directory`` (see module docstring)."""

    def __init__(self, directory: Path, tensors: dict[str, tuple[tuple[int, ...], torch.dtype]],
                 max_shard_bytes: int):
        self.directory = Path(directory)
        groups: list[list[str]] = [[]]
        size = 0
        for name, (shape, dtype) in tensors.items():
            nbytes = _numel(shape) * dtype.itemsize
            if groups[-1] and size + nbytes > max_shard_bytes:
                groups.append([])
                size = 0
            groups[-1].append(name)
            size += nbytes
        count = len(groups)
        self.shards = [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        self.plan: dict[str, _Planned] = {}
        self._files = {}
        for shard, names in zip(self.shards, groups):
            header, cursor = {"__metadata__": {"format": "pt"}}, 0
            for name in names:
                shape, dtype = tensors[name]
                nbytes = _numel(shape) * dtype.itemsize
                header[name] = {"dtype": SAFETENSORS_DTYPE[dtype], "shape": list(shape),
                                "data_offsets": [cursor, cursor + nbytes]}
                self.plan[name] = _Planned(shard, tuple(shape), dtype, cursor, nbytes)
                cursor += nbytes
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % _ALIGN)
            start = 8 + len(raw)
            for name in names:
                self.plan[name].offset += start
            fd = os.open(self.directory / shard, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            os.write(fd, struct.pack("<Q", len(raw)) + raw)
            os.ftruncate(fd, start + cursor)
            self._files[shard] = fd
        self.bytes_written = 0

    def write(self, name: str, tensor: torch.Tensor, index: int | None = None, lock=None) -> None:
        """Write tensor ``name``, or with ``index``: slice ``index`` of its first dimension (synchronously;
        see :class:`BackgroundWriter` to overlap writing with producing the next tensors). ``lock`` guards the
        bookkeeping when several threads write."""
        with lock or contextlib.nullcontext():
            offset, fd = self._claim(name, tensor, index)
        data = tensor.detach().contiguous().view(torch.uint8).reshape(-1).numpy()
        view = memoryview(data)
        while view:
            done = os.pwrite(fd, view, offset)
            view, offset = view[done:], offset + done

    def _claim(self, name: str, tensor: torch.Tensor, index: int | None) -> tuple[int, int]:
        """Validate a write and record it; (byte offset, file descriptor) to write it at."""
        planned = self.plan.get(name)
        if planned is None:
            raise KeyError(f"export produced '{name}', which the source checkpoint does not have")
        expected = planned.shape if index is None else planned.shape[1:]
        if tuple(tensor.shape) != expected or tensor.dtype != planned.dtype:
            raise ValueError(f"export: '{name}'{'' if index is None else f'[{index}]'} is {tensor.dtype} "
                             f"{list(tensor.shape)}, expected {planned.dtype} {list(expected)}")
        key = -1 if index is None else index
        if key in planned.written or (index is not None and -1 in planned.written) or (
                index is None and planned.written):
            raise RuntimeError(f"export produced '{name}'{'' if index is None else f'[{index}]'} twice")
        nbytes = tensor.numel() * tensor.element_size()
        planned.written.add(key)
        self.bytes_written += nbytes
        return planned.offset + (0 if index is None else index * nbytes), self._files[planned.shard]

    def _complete(self, planned: _Planned) -> bool:
        return -1 in planned.written or len(planned.written) == (planned.shape[0] if planned.shape else 1)

    def finish(self) -> dict[str, str]:
        """Close the shards; the weight map (name -> shard). Fails if anything was not written."""
        missing = [name for name, planned in self.plan.items() if not self._complete(planned)]
        for fd in self._files.values():
            os.close(fd)
        self._files.clear()
        if missing:
            raise RuntimeError(f"export did not produce {len(missing)} planned tensor(s): {missing[:5]}")
        return {name: planned.shard for name, planned in self.plan.items()}

    def abort(self) -> None:
        for fd in self._files.values():
            os.close(fd)
        self._files.clear()


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


class BackgroundWriter:
    """Runs a :class:`PlannedCheckpointWriter`'s writes on ``threads`` threads, so disk writes (which release the
    GIL) overlap with each other and with producing the next tensors. At most ``depth`` tensors wait; an error on
    a thread is raised by the next :meth:`write` or by :meth:`finish`."""

    def __init__(self, writer: PlannedCheckpointWriter, depth: int = 4, threads: int = 2):
        import queue
        import threading

        self.writer = writer
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._lock = threading.Lock()  # guards the writer's bookkeeping; the disk writes run in parallel
        self._threads = [threading.Thread(target=self._run, name=f"export-writer-{i}", daemon=True)
                         for i in range(threads)]
        for thread in self._threads:
            thread.start()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._error is None:
                try:
                    self.writer.write(*item, lock=self._lock)
                except BaseException as e:  # handed to the producer
                    self._error = e

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def write(self, name: str, tensor: torch.Tensor, index: int | None = None) -> None:
        self._raise()
        self._queue.put((name, tensor, index))

    def _stop(self) -> None:
        for _ in self._threads:
            self._queue.put(None)
        for thread in self._threads:
            thread.join()

    def finish(self) -> dict[str, str]:
        self._stop()
        self._raise()
        return self.writer.finish()

    def abort(self) -> None:
        self._stop()
        self.writer.abort()
