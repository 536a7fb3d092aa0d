"""Zero-copy reads of a safetensors checkpoint.

``safetensors``' ``get_tensor`` allocates a fresh tensor and copies the bytes into it; the importer then copies
that tensor into the model parameter again. :class:`MmapCheckpoint` instead maps a shard read-only
(``MAP_PRIVATE``: the file can never be written through it) and hands out tensors that are views of the
mapping, so the only copy is the one into the parameter. At most ``max_open`` shard mappings are held
(least recently used first out); a mapping also lives on while a view of it is referenced (e.g. a layer's
grouped expert tensor during its experts' loads). Pages of the current shard count towards RSS while mapped.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

import torch

from gemma4vl.bridge.checkpoint import TensorInfo, read_header, scan_checkpoint

_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


class MmapCheckpoint(Mapping):
    """``name -> tensor`` over a checkpoint directory; tensors are views of memory-mapped shards."""

    def __init__(self, checkpoint_dir: str | Path, max_open: int = 1):
        self.root = Path(checkpoint_dir)
        self.tensors: dict[str, TensorInfo] = scan_checkpoint(self.root)
        self.max_open = max_open
        self._open: OrderedDict[str, tuple[torch.UntypedStorage, int, dict]] = OrderedDict()

    def __getitem__(self, name: str) -> torch.Tensor:
        info = self.tensors[name]
        storage, data_start, header = self._shard(info.file)
        begin, end = header[name]["data_offsets"]
        dtype = _DTYPES[info.dtype]
        flat = torch.empty(0, dtype=torch.uint8).set_(storage, data_start + begin, (end - begin,))
        return flat.view(dtype).view(info.shape)

    def __iter__(self):
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    def _shard(self, file: str):
        if file in self._open:
            self._open.move_to_end(file)
            return self._open[file]
        path = self.root / file
        header = read_header(path)
        header_len = int.from_bytes(path.open("rb").read(8), "little")
        storage = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=path.stat().st_size)
        self._open[file] = (storage, 8 + header_len, header)
        while len(self._open) > self.max_open:
            self._open.popitem(last=False)
        return self._open[file]

    def close(self) -> None:
        """Drop every mapping held here (views handed out keep theirs alive until released)."""
        self._open.clear()
