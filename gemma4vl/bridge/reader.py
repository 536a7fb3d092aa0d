"""Zero-copy reads of a safetensors checkpoint.

``safetensors``' ``get_tensor`` allocates a fresh tensor and copies the bytes into it; the importer would then copy
that tensor into the model parameter again. :class:`MmapCheckpoint` instead maps a shard privately
(``MAP_PRIVATE``: nothing can be written back to the file) and hands out tensors that are views of the mapping,
so the only copy is the one into the parameter. Once a view has been copied, :meth:`MmapCheckpoint.release`
drops its pages from this process (``MADV_DONTNEED``; they stay in the page cache), so the mapping never adds
more than the tensor being converted to the process's memory. At most ``max_open`` shards stay mapped (least
recently used first out); a mapping lives on while a view of it is referenced.
"""

from __future__ import annotations

import mmap
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from gemma4vl.bridge.checkpoint import TensorInfo, read_header, scan_checkpoint

_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


@dataclass
class _Shard:
    mapping: mmap.mmap
    data: torch.Tensor  # uint8 view of the whole file
    data_start: int  # byte offset of the tensor data (after the header)
    header: dict


class MmapCheckpoint(Mapping):
    """``name -> tensor`` over a checkpoint directory; tensors are views of memory-mapped shards."""

    def __init__(self, checkpoint_dir: str | Path, max_open: int = 1):
        self.root = Path(checkpoint_dir)
        self.tensors: dict[str, TensorInfo] = scan_checkpoint(self.root)
        self.max_open = max_open
        self._open: OrderedDict[str, _Shard] = OrderedDict()
        self._live: list[_Shard] = []  # every mapping handed out from, for release()

    def __getitem__(self, name: str) -> torch.Tensor:
        info = self.tensors[name]
        shard = self._shard(info.file)
        begin, end = shard.header[name]["data_offsets"]
        flat = shard.data[shard.data_start + begin: shard.data_start + end]
        return flat.view(_DTYPES[info.dtype]).view(info.shape)

    def __iter__(self):
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    def _shard(self, file: str) -> _Shard:
        if file in self._open:
            self._open.move_to_end(file)
            return self._open[file]
        path = self.root / file
        header = read_header(path)
        with path.open("rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        shard = _Shard(mapping, torch.frombuffer(mapping, dtype=torch.uint8), 8 + header_len, header)
        self._open[file] = shard
        self._live = [s for s in self._live if not s.mapping.closed][-8:] + [shard]
        while len(self._open) > self.max_open:
            self._open.popitem(last=False)
        return shard

    def release(self, view: torch.Tensor) -> None:
        """Drop the pages of ``view`` (a tensor handed out here, or a slice of one) from this process's memory;
        anything else is ignored. The bytes stay readable: touching them again re-reads the file."""
        start, size = view.data_ptr(), view.numel() * view.element_size()
        for shard in self._live:
            base = shard.data.data_ptr()
            if base <= start and start + size <= base + shard.data.numel():
                first = -(-(start - base) // mmap.PAGESIZE) * mmap.PAGESIZE
                last = (start - base + size) // mmap.PAGESIZE * mmap.PAGESIZE
                if last > first:
                    shard.mapping.madvise(mmap.MADV_DONTNEED, first, last - first)
                return

    def close(self) -> None:
        """Forget every mapping (views handed out keep theirs alive until released by the garbage collector)."""
        self._open.clear()
        self._live.clear()
