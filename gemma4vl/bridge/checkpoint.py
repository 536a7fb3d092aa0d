"""Validation of a Hugging Face safetensors checkpoint before any weight is loaded.

Reads only the safetensors headers (a few KB per shard), so a bad checkpoint fails in seconds with a message
that names the file and the tensor: a missing or extra tensor, a wrong shape, a truncated or corrupt file, an
index that points at a missing file or at a file that does not hold the tensor.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

INDEX_FILE = "model.safetensors.index.json"
_MAX_HEADER_BYTES = 100 * 1024 * 1024


class CheckpointError(ValueError):
    """The checkpoint on disk is incomplete, corrupt, or does not match its config."""


@dataclass(frozen=True)
class TensorInfo:
    """Where a tensor lives and what it is."""

    file: str
    """Shard file name (relative to the checkpoint directory)."""

    dtype: str
    """safetensors dtype code, e.g. ``"BF16"``, ``"F32"``."""

    shape: tuple[int, ...]
    """Tensor shape."""


def read_header(path: Path) -> dict:
    """The JSON header of one safetensors file, after checking the file is complete."""
    size = path.stat().st_size
    with path.open("rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{path}: truncated or not a safetensors file ({size} bytes, no header length)")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > _MAX_HEADER_BYTES or 8 + header_len > size:
            raise CheckpointError(f"{path}: corrupt or truncated safetensors file (header length {header_len}, "
                                  f"file size {size})")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    data_end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = info["data_offsets"]
            info["dtype"], info["shape"]
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header entry for '{name}'") from e
        if not 0 <= begin <= end:
            raise CheckpointError(f"{path}: corrupt data offsets {begin}..{end} for '{name}'")
        data_end = max(data_end, end)
    expected = 8 + header_len + data_end
    if size < expected:
        raise CheckpointError(f"{path}: truncated: the header describes {expected} bytes but the file has {size}")
    return header


def scan_checkpoint(checkpoint_dir: str | Path) -> dict[str, TensorInfo]:
    """Every tensor of the checkpoint (name -> :class:`TensorInfo`), validated against the index if any."""
    root = Path(checkpoint_dir)
    index_path = root / INDEX_FILE
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index_path}: not a valid safetensors index ({e})") from e
        files = sorted(set(weight_map.values()))
    else:
        weight_map = None
        files = sorted(p.name for p in root.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{root}: no *.safetensors files and no {INDEX_FILE}")
    tensors: dict[str, TensorInfo] = {}
    for name in files:
        path = root / name
        if not path.is_file():
            raise CheckpointError(f"{index_path}: lists shard '{name}', which does not exist")
        for key, info in read_header(path).items():
            if key == "__metadata__":
                continue
            if key in tensors:
                raise CheckpointError(f"{root}: tensor '{key}' appears in both {tensors[key].file} and {name}")
            tensors[key] = TensorInfo(file=name, dtype=info["dtype"], shape=tuple(info["shape"]))
    if weight_map is not None:
        for key, name in weight_map.items():
            if key not in tensors:
                raise CheckpointError(f"{index_path}: maps '{key}' to {name}, which does not hold it")
            if tensors[key].file != name:
                raise CheckpointError(f"{index_path}: maps '{key}' to {name} but it is in {tensors[key].file}")
        unindexed = sorted(set(tensors) - set(weight_map))
        if unindexed:
            raise CheckpointError(f"{index_path}: tensors missing from the index: {unindexed[:5]}")
    return tensors


def check_tensors(tensors: dict[str, TensorInfo], expected: dict[str, tuple[int, ...]], optional: set[str],
                  where: str) -> None:
    """Fail unless the checkpoint holds exactly the ``expected`` tensors (plus any of ``optional``), with the
    expected shapes."""
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected) - optional)
    if missing:
        raise CheckpointError(f"{where}: missing tensor(s) {missing[:8]}{' ...' if len(missing) > 8 else ''} "
                              f"({len(missing)} in all) that the config requires")
    if extra:
        raise CheckpointError(f"{where}: unexpected tensor(s) {extra[:8]}{' ...' if len(extra) > 8 else ''} "
                              f"({len(extra)} in all) that the config does not account for")
    for name, shape in expected.items():
        got = tensors[name].shape
        if got != tuple(shape):
            raise CheckpointError(f"{where}: tensor '{name}' in {tensors[name].file} has shape {list(got)}, "
                                  f"the config implies {list(shape)}")
