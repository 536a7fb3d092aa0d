"""Write a model's LoRA adapters as a Hugging Face PEFT adapter (``adapter_config.json`` +
``adapter_model.safetensors``) that ``peft.PeftModel.from_pretrained(base, adapter_dir)`` loads onto the source
checkpoint.

The tensors come from the bridge (:mod:`gemma4vl.bridge.adapters`: q/k/v and gate/up splits, the shared-expert
un-fusion of A, no ``v_proj`` on K=V layers); Megatron-Bridge's ``convert_adapter_weights_to_peft_state`` and
``build_adapter_config_dict`` give PEFT's on-disk layout and config. ``target_modules`` lists the adapted HF
modules by full name (PEFT matches names by suffix: a bare ``q_proj`` would also wrap the vision tower's
projections). An adapter says nothing about the base weights, so only a model whose base weights did not train
can be exported this way (:class:`AdapterFormatError` otherwise).

Like the merged export, the files are written into a hidden temporary directory next to the destination,
re-read and checked (every tensor names an ``nn.Linear`` weight of the source checkpoint, has the rank and that
weight's shape, is finite, comes as an A/B pair) and only then renamed into place.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from gemma4vl.bridge.adapters import AdapterFormatError
from gemma4vl.bridge.checkpoint import CheckpointError, scan_checkpoint
from gemma4vl.export.hf_export import replace_dir

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_SUFFIXES = (".lora_A.weight", ".lora_B.weight")


@dataclass
class AdapterReport:
    """What an adapter export wrote."""

    path: Path
    """The finished adapter directory."""

    num_tensors: int
    """LoRA tensors written (an A and a B per adapted HF module)."""

    num_parameters: int
    """Adapter parameters written."""

    target_modules: list[str]
    """The adapted HF modules (full names)."""

    seconds: float
    """Wall time of the export."""


def _is_writer() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def trained_base_parameters(model) -> list[str]:
    """Names of trainable parameters of ``model`` (chunks) that are not adapter weights."""
    from megatron.core.utils import unwrap_model

    return [name for chunk in unwrap_model(model) for name, p in chunk.named_parameters()
            if p.requires_grad and ".adapter." not in name]


def export_hf_adapter(auto_bridge, model, out_dir: str | Path, lora, *, overwrite: bool = False,
                      show_progress: bool = False) -> AdapterReport | None:
    """Export the LoRA adapters of ``model`` (list of chunks) to ``out_dir`` in HF PEFT format.

    ``lora`` is the Megatron-Bridge ``LoRA`` the adapters were made with (rank ``dim``, ``alpha``, ``dropout``).
    Collective: call on every rank. Returns the report on global rank 0, None elsewhere."""
    from megatron.bridge.models.conversion.peft_bridge import (
        build_adapter_config_dict,
        convert_adapter_weights_to_peft_state,
    )
    from megatron.bridge.models.conversion.model_bridge import HFWeightTuple

    from gemma4vl.bridge import Gemma4VLBridge

    start = time.time()
    source_dir = Path(auto_bridge.hf_pretrained.model_name_or_path).resolve()
    out_dir = Path(out_dir)
    trained = trained_base_parameters(model)
    if trained:
        raise AdapterFormatError(f"the model's base weights were trained too ({len(trained)} trainable non-adapter "
                                 f"parameters, e.g. {trained[:3]}): an adapter on the source checkpoint would not "
                                 "reproduce it; export it merged (export.format=merged)")
    writer = _is_writer()
    if writer and out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} exists; pass overwrite=True to replace it")
    bridge = Gemma4VLBridge()
    bridge.hf_pretrained = auto_bridge.hf_pretrained
    weights = [HFWeightTuple(name, tensor.detach().to("cpu").clone()) for name, tensor in
               bridge.stream_adapter_weights_megatron_to_hf(model, cpu=True, show_progress=show_progress)]
    if not weights:
        raise AdapterFormatError("the model has no LoRA adapters to export (peft.method=none?)")
    report = None
    if writer:
        state, module_weights, target_parameters = convert_adapter_weights_to_peft_state(weights)
        assert not target_parameters, target_parameters  # 2-D adapters only (see gemma4vl.bridge.adapters)
        modules = sorted({name.rsplit(".lora_", 1)[0] for name in module_weights})
        config = build_adapter_config_dict(lora, target_modules=modules, base_model_name_or_path=str(source_dir))
        tmp_dir = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp_dir, ignore_errors=True)
        tmp_dir.mkdir()
        try:
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_dir / WEIGHTS_FILE),
                      metadata={"format": "pt"})
            (tmp_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
            num_parameters = verify_adapter(tmp_dir, source_dir)
            replace_dir(tmp_dir, out_dir)
        except BaseException:
            shutil.rmtree(tmp_dir, ignore_errors=True)
            raise
        report = AdapterReport(out_dir, len(state), num_parameters, modules, time.time() - start)
    if dist.is_initialized():
        dist.barrier()
    return report


def base_differences(auto_bridge, model) -> tuple[int, list[str]]:
    """(HF tensors compared, names that differ): the model's base weights (adapters not merged, fusions inverted)
    against the source checkpoint, bit for bit. An adapter reproduces the model only on an unchanged base.
    Streams the whole model once (collective: call on every rank); for small models, tests and demos."""
    from gemma4vl.bridge.gemma4vl_bridge import split_expert_slice
    from gemma4vl.bridge.reader import MmapCheckpoint

    source = MmapCheckpoint(Path(auto_bridge.hf_pretrained.model_name_or_path))
    compared: set[str] = set()
    differing: list[str] = []
    try:
        for name, tensor in auto_bridge.export_hf_weights(model, cpu=True, show_progress=False,
                                                          merge_adapter_weights=False):
            # Unmerged, Megatron-Bridge names an adapted module's weight as PEFT does: <module>.base_layer.weight.
            base, index = split_expert_slice(name.replace(".base_layer.weight", ".weight"))
            reference = source[base] if index is None else source[base][index]
            compared.add(base)
            if tensor.shape != reference.shape or not torch.equal(tensor.to(reference.dtype), reference):
                differing.append(name)
    finally:
        source.close()
    return len(compared), differing


def verify_adapter(adapter_dir: str | Path, source_dir: str | Path) -> int:
    """Check an adapter directory against its base checkpoint (see the module docstring); the number of adapter
    parameters. Raises :class:`CheckpointError` naming the tensor and what was expected."""
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    config = json.loads((adapter_dir / CONFIG_FILE).read_text())
    rank, modules = config["r"], set(config["target_modules"])
    base = scan_checkpoint(Path(source_dir))
    tensors = load_file(str(adapter_dir / WEIGHTS_FILE))
    seen: dict[str, set[str]] = {}
    for key, tensor in tensors.items():
        suffix = next((s for s in _SUFFIXES if key.endswith(s)), None)
        if not key.startswith(_PREFIX) or suffix is None:
            raise CheckpointError(f"{adapter_dir / WEIGHTS_FILE}: '{key}' is not a PEFT LoRA tensor name")
        module = key[len(_PREFIX):-len(suffix)]
        info = base.get(module + ".weight")
        if module not in modules or info is None or len(info.shape) != 2:
            raise CheckpointError(f"{adapter_dir}: '{key}' adapts '{module}', which is not a listed target module "
                                  f"with a 2-D weight in {source_dir}")
        out_features, in_features = info.shape
        expected = (rank, in_features) if suffix == _SUFFIXES[0] else (out_features, rank)
        if tuple(tensor.shape) != expected:
            raise CheckpointError(f"{adapter_dir}: '{key}' has shape {list(tensor.shape)}, expected {list(expected)} "
                                  f"(rank {rank}, {module}.weight {list(info.shape)})")
        if not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"{adapter_dir}: '{key}' has non-finite values")
        seen.setdefault(module, set()).add(suffix)
    incomplete = sorted(m for m in modules if seen.get(m) != set(_SUFFIXES))
    if incomplete:
        raise CheckpointError(f"{adapter_dir}: target module(s) without both LoRA matrices: {incomplete[:5]}")
    return sum(t.numel() for t in tensors.values())

