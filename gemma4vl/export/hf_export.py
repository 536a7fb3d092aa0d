"""Write a trained model as a Hugging Face checkpoint that ``transformers`` loads.

The weights stream out of the bridge tensor by tensor, grouped expert tensors expert by expert (every rank takes
part in the gathers; global rank 0 writes). The shards are laid out up front after the source checkpoint's
tensors and every tensor or expert slice is written straight to its place in a hidden temporary directory next
to the destination, so host memory holds nothing beyond the model and the tensor in hand. The
config.json is the source checkpoint's own file (same layout, ``dtype`` updated) and the tokenizer / processor
/ generation files are copied from the source. Only when the index, every shard and every tensor (present,
right shape, finite) have been verified is the temporary directory renamed to the destination, so an
interrupted export (the process killed or failing at any point) never leaves a directory that looks complete.
Files are not fsync'ed (as with ``save_pretrained``): surviving a power loss between the rename and the
kernel's writeback is not promised.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from gemma4vl.bridge.checkpoint import INDEX_FILE, CheckpointError, all_finite, check_tensors, scan_checkpoint

logger = logging.getLogger("gemma4vl")
from gemma4vl.bridge.gemma4vl_bridge import split_expert_slice
from gemma4vl.export.writer import BackgroundWriter, PlannedCheckpointWriter
from gemma4vl.bridge.hf_config import read_hf_config
from gemma4vl.bridge.layout import expected_hf_shapes

_WEIGHT_FILES = ("*.safetensors", "*.safetensors.index.json", "config.json", "*.bin", "*.pt")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
_INT_DTYPES = {"I64": torch.int64, "I32": torch.int32, "U8": torch.uint8, "BOOL": torch.bool}


@dataclass
class ExportReport:
    """What an export wrote."""

    path: Path
    """The finished checkpoint directory."""

    num_tensors: int
    """Tensors written."""

    num_bytes: int
    """Bytes of tensor data written."""

    shards: list[str]
    """Shard file names, in order."""

    dtype: torch.dtype
    """dtype of the floating-point tensors."""

    seconds: float
    """Wall time of the export."""


def source_dtype(source_dir: Path) -> torch.dtype:
    """The floating-point dtype of the source checkpoint's tensors (they must agree)."""
    dtypes = {info.dtype for info in scan_checkpoint(source_dir).values() if info.dtype in _SAFETENSORS_DTYPES}
    if len(dtypes) != 1:
        raise CheckpointError(f"{source_dir}: tensors have mixed floating-point dtypes {sorted(dtypes)}; "
                              "pass the export dtype explicitly")
    return _SAFETENSORS_DTYPES[dtypes.pop()]


def _is_writer() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def export_hf_checkpoint(
    auto_bridge,
    model,
    out_dir: str | Path,
    *,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = 5 * 1024**3,
    overwrite: bool = False,
    show_progress: bool = False,
    model_card: str | None = None,
) -> ExportReport | None:
    """Export ``model`` (list of model chunks) through ``auto_bridge`` to ``out_dir``.

    Collective: call on every rank. Returns the report on global rank 0, None elsewhere.
    ``dtype`` defaults to the source checkpoint's dtype. ``model_card``: the export's README.md (replacing the
    source checkpoint's, which is copied otherwise)."""
    start = time.time()
    source_dir = Path(auto_bridge.hf_pretrained.model_name_or_path)
    out_dir = Path(out_dir)
    dtype = dtype or source_dtype(source_dir)
    writer = _is_writer()
    if writer and out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} exists; pass overwrite=True to replace it")
    tmp_dir = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    if writer:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp_dir, ignore_errors=True)
        tmp_dir.mkdir()
    try:
        shards, weight_map, num_bytes = _write_shards(auto_bridge, model, tmp_dir, dtype, max_shard_bytes,
                                                      writer, show_progress)
        report = None
        if writer:
            _write_metadata(source_dir, tmp_dir, shards, weight_map, num_bytes, dtype)
            if model_card is not None:
                (tmp_dir / "README.md").write_text(model_card)
            _verify(tmp_dir, weight_map)
            replace_dir(tmp_dir, out_dir)
            report = ExportReport(out_dir, len(weight_map), num_bytes, shards, dtype, time.time() - start)
    except BaseException:
        if writer:
            shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    if dist.is_initialized():
        dist.barrier()
    return report


def _write_shards(auto_bridge, model, tmp_dir: Path, dtype, max_shard_bytes, writer, show_progress):
    """Stream the bridge's export into a :class:`PlannedCheckpointWriter` laid out after the source checkpoint's
    tensors (every rank iterates, for the collectives; global rank 0 writes)."""
    source = scan_checkpoint(Path(auto_bridge.hf_pretrained.model_name_or_path))
    planned = {name: (info.shape, dtype if _SAFETENSORS_DTYPES.get(info.dtype) else _INT_DTYPES[info.dtype])
               for name, info in source.items()}
    plan = PlannedCheckpointWriter(tmp_dir, planned, max_shard_bytes) if writer else None
    out = BackgroundWriter(plan) if plan is not None else None
    try:
        for name, tensor in auto_bridge.export_hf_weights(model, cpu=True, show_progress=show_progress):
            if out is None:
                continue
            name, index = split_expert_slice(name)
            if tensor.is_floating_point():
                tensor = tensor.to(dtype)
                if not all_finite(tensor):
                    where = name if index is None else f"{name}[{index}]"
                    raise CheckpointError(f"export: tensor '{where}' has non-finite values")
            out.write(name, tensor, index)
    except BaseException:
        if out is not None:
            out.abort()
        raise
    if out is None:
        return [], {}, 0
    weight_map = out.finish()
    return plan.shards, weight_map, plan.bytes_written


def _write_metadata(source_dir: Path, tmp_dir: Path, shards, weight_map, num_bytes, dtype) -> None:
    index = {"metadata": {"total_size": num_bytes}, "weight_map": dict(sorted(weight_map.items()))}
    (tmp_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    config = json.loads((source_dir / "config.json").read_text())
    dtype_name = next(k for k, v in _DTYPES.items() if v == dtype)
    config["dtype"] = dtype_name
    if isinstance(config.get("text_config"), dict) and "dtype" in config["text_config"]:
        config["text_config"]["dtype"] = dtype_name
    (tmp_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for path in sorted(source_dir.iterdir()):
        if path.is_file() and not any(path.match(p) for p in _WEIGHT_FILES):
            shutil.copy2(path, tmp_dir / path.name)


def _verify(tmp_dir: Path, weight_map: dict[str, str]) -> None:
    """The written checkpoint, re-read from disk: config.json and the index parse, every shard is complete,
    and every expected tensor is present exactly once with its shape. (Finiteness is checked on each tensor as
    it is written.)"""
    cfg = read_hf_config(tmp_dir)
    expected, optional = expected_hf_shapes(cfg)
    tensors = scan_checkpoint(tmp_dir)
    check_tensors(tensors, expected, optional, where=f"export {tmp_dir}")
    if set(tensors) != set(weight_map):
        raise CheckpointError(f"export {tmp_dir}: shards hold {len(tensors)} tensors, {len(weight_map)} were written")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover_interrupted_export(out_dir: Path) -> list[Path]:
    """Clean up after an export that was killed (on this machine) before it finished: its partial directory
    ``.<name>.partial-<pid>`` and an after-the-fact export's staged, not yet verified copy
    ``.<name>.unverified-<pid>`` (``python -m recipes.export``) are removed, and a complete previous export that was moved aside
    (``.<name>.old-<pid>``) is moved back when ``out_dir`` is missing, else removed. Directories of a process that
    is still alive are left alone. Returns the directories removed or restored."""
    out_dir = Path(out_dir).expanduser().absolute()
    if not out_dir.parent.is_dir():
        return []
    touched = []
    for kind in ("old", "partial", "unverified"):
        for leftover in sorted(out_dir.parent.glob(f".{out_dir.name}.{kind}-*")):
            pid = leftover.name.rsplit("-", 1)[1]
            if not pid.isdigit() or int(pid) == os.getpid() or _pid_alive(int(pid)):
                continue
            if kind == "old" and not out_dir.exists():
                leftover.rename(out_dir)
                logger.warning("restored the previous export %s (an export was interrupted while replacing it)",
                               out_dir)
            else:
                shutil.rmtree(leftover)
                logger.warning("removed %s, left by an interrupted export", leftover)
            touched.append(leftover)
    return touched


def replace_dir(tmp_dir: Path, out_dir: Path) -> None:
    """Put the complete ``tmp_dir`` at ``out_dir``: a previous ``out_dir`` is moved aside to ``.<name>.old-<pid>``
    first and removed after the rename, so a kill at any point leaves either export whole
    (:func:`recover_interrupted_export` tidies up at the next start)."""
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
        out_dir.rename(old)
        tmp_dir.rename(out_dir)
        shutil.rmtree(old)
    else:
        tmp_dir.rename(out_dir)
