"""Export any saved Megatron checkpoint of a finetuning run as a Hugging Face checkpoint or PEFT adapter, after
the fact (``python -m recipes.export <run_dir> [checkpoint=iter_N] [format=merged|adapter|both]``).

The run directory's ``config.yaml`` (written by ``recipes.finetune``) says which HF checkpoint the run started
from and whether it trained LoRA adapters. The model is built from that HF checkpoint through the bridge (as the
run's setup does), LoRA adapters are added for a LoRA run, and the checkpoint's weights are loaded over it (a
LoRA checkpoint holds the adapters only; a full one every weight). Megatron's distributed checkpoints reshard,
so the export runs on any layout: one process by default, or under torchrun with ``tensor=`` / ``pipeline=`` /
``expert=``. Then the same exporters as at the end of a run write the result atomically, and it is verified: the
files' structure, and (``verify=true``, the default) the logits of the export reloaded in transformers (with
``peft`` for an adapter) against the loaded Megatron model's on a synthetic image+text prompt.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from gemma4vl.config.schema import RunConfig

FORMATS = ("merged", "adapter", "both")


class ExportRunError(ValueError):
    """The run directory, checkpoint or export request is not usable (the message says which and why)."""


@dataclass
class ExportRunResult:
    """What :func:`export_run` wrote."""

    step: int
    """The iteration of the exported checkpoint."""

    merged_dir: Path | None
    """The HF checkpoint (``format`` merged / both), else None."""

    adapter_dir: Path | None
    """The PEFT adapter (``format`` adapter / both), else None."""

    max_logit_diff: dict[str, float]
    """``{"merged": ..., "adapter": ...}``: max |logit difference| against the loaded model (when verified)."""


def load_run_config(run_dir: Path) -> RunConfig:
    """The resolved config a run wrote to ``<run_dir>/config.yaml``."""
    from omegaconf import OmegaConf

    if not run_dir.is_dir():
        raise ExportRunError(f"run directory {run_dir} does not exist")
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise ExportRunError(f"{run_dir} is not a run directory: no config.yaml (recipes.finetune writes it)")
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(RunConfig), OmegaConf.load(path)))
    except Exception as e:  # omegaconf raises several error types for a bad file
        raise ExportRunError(f"{path}: not a gemma4vl run config ({e})") from e


def checkpoint_dir(run_dir: Path, cfg: RunConfig) -> Path:
    """The run's checkpoint directory; one under the run directory follows the run directory if it moved."""
    recorded = Path(cfg.checkpoint.dir)
    try:
        relative = recorded.relative_to(Path(cfg.run_dir))
    except ValueError:
        return recorded
    return run_dir / relative


def select_checkpoint(ckpt_dir: Path, checkpoint: str | None) -> tuple[int, Path]:
    """(step, directory) of ``checkpoint`` (``iter_0000002``, ``iter_2``, ``2``; None: the newest complete one)."""
    from gemma4vl.training.preflight import latest_checkpoint_step

    available = sorted(p.name for p in ckpt_dir.glob("iter_*") if (p / ".metadata").is_file()) \
        if ckpt_dir.is_dir() else []
    if checkpoint is None:
        step = latest_checkpoint_step(ckpt_dir)
        if step is None:
            raise ExportRunError(f"{ckpt_dir}: no complete checkpoint (latest_checkpointed_iteration.txt is missing "
                                 f"or empty); checkpoints there: {available or 'none'}")
    else:
        match = re.fullmatch(r"(?:iter_)?(\d+)", str(checkpoint))
        if match is None:
            raise ExportRunError(f"checkpoint={checkpoint!r}: expected iter_N or N (e.g. iter_0000002)")
        step = int(match.group(1))
    path = ckpt_dir / f"iter_{step:07d}"
    if not (path / ".metadata").is_file():
        state = "is incomplete (no .metadata: its save never finished)" if path.is_dir() else "does not exist"
        raise ExportRunError(f"checkpoint {path} {state}; complete checkpoints in {ckpt_dir}: {available or 'none'}")
    return step, path


def _lora(cfg: RunConfig):
    from gemma4vl.config.container import _peft

    return _peft(cfg)


def load_model(cfg: RunConfig, hf_dir: Path, iter_dir: Path, device: str):
    """(AutoBridge, model chunks): the HF checkpoint imported through the bridge, LoRA adapters added for a LoRA
    run, and the Megatron checkpoint ``iter_dir`` loaded over it (current parallel state, any layout)."""
    import gemma4vl.bridge  # noqa: F401  (registers the bridge)
    from megatron.bridge import AutoBridge
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps

    auto_bridge = AutoBridge.from_hf_pretrained(str(hf_dir))
    provider = auto_bridge.to_megatron_provider(load_weights=True)
    provider.tensor_model_parallel_size = ps.get_tensor_model_parallel_world_size()
    provider.pipeline_model_parallel_size = ps.get_pipeline_model_parallel_world_size()
    provider.expert_model_parallel_size = ps.get_expert_model_parallel_world_size()
    provider.expert_tensor_parallel_size = ps.get_expert_tensor_parallel_world_size()
    provider.sequence_parallel = provider.tensor_model_parallel_size > 1
    dtype = torch.bfloat16 if cfg.trainer.precision == "bf16" else torch.float32
    provider.params_dtype = provider.pipeline_dtype = provider.autocast_dtype = dtype
    provider.bf16 = dtype == torch.bfloat16
    provider.vision_attn_implementation = cfg.model.vision_attn_implementation
    lora = _lora(cfg)
    if lora is not None:
        provider.register_pre_wrap_hook(lambda chunks: lora(chunks, training=False))
    provider.finalize()
    model = provider.provide_distributed_model(wrap_with_ddp=False, use_cpu_initialization=device == "cpu",
                                               mixed_precision_wrapper=None)
    if len(model) != 1:
        raise ExportRunError("export of virtual-pipeline layouts is not supported; use pipeline= without virtual "
                             "stages")
    wanted = model[0].sharded_state_dict()
    if lora is not None:  # a LoRA checkpoint holds the adapters (the base is the HF checkpoint, imported above)
        wanted = {k: v for k, v in wanted.items() if ".adapter." in k and "_extra_state" not in k}
        if not wanted:
            raise ExportRunError(f"{iter_dir}: the run config asks for LoRA but the model has no adapters")
    try:
        loaded = dist_checkpointing.load({"model": wanted}, str(iter_dir))
    except Exception as e:  # Megatron raises CheckpointingException / KeyError on a mismatched checkpoint
        raise ExportRunError(f"{iter_dir}: cannot load it into the model the run config describes "
                             f"({'LoRA adapters' if lora else 'full model'}): {e}") from e
    result = model[0].load_state_dict(loaded["model"], strict=lora is None)
    if lora is not None:
        missing = [k for k in result.missing_keys if ".adapter." in k]
        if missing:
            raise ExportRunError(f"{iter_dir}: adapter weights missing from the checkpoint: {missing[:5]}")
    return auto_bridge, model, lora


def export_run(run_dir: str | Path, checkpoint: str | None = None, format: str | None = None,
               out_dir: str | Path | None = None, verify: bool = True, device: str = "cpu",
               tensor: int = 1, pipeline: int = 1, expert: int = 1) -> ExportRunResult | None:
    """Export checkpoint ``checkpoint`` of the run in ``run_dir`` (see the module docstring) into ``out_dir``
    (default ``<run_dir>/exports/iter_NNNNNNN``: ``hf_export/`` and / or ``hf_adapter/``). Collective: call on
    every rank. ``format`` defaults to the run's ``export.format``. Returns the result on rank 0."""
    import torch.distributed as dist

    from gemma4vl.bridge.adapters import peft_format_problems
    from gemma4vl.runtime.distributed import destroy_model_parallel, initialize_model_parallel
    from gemma4vl.config.validate import parse_size
    from gemma4vl.training.finetune import _export_dtype, resolve_hf_path

    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    format = format or cfg.export.format
    if format not in FORMATS:
        raise ExportRunError(f"format={format!r} is not one of {list(FORMATS)}")
    if format != "merged":
        if cfg.peft.method != "lora":
            raise ExportRunError(f"format={format!r} writes a LoRA adapter, but the run in {run_dir} trained every "
                                 "weight (peft.method=none); use format=merged")
        problems = peft_format_problems(cfg.peft.target_modules)
        if problems:
            raise ExportRunError(f"format={format!r}: " + "; ".join(problems))
    step, iter_dir = select_checkpoint(checkpoint_dir(run_dir, cfg), checkpoint)
    hf_dir = resolve_hf_path(cfg.model.hf_path)
    out_dir = Path(out_dir) if out_dir is not None else run_dir / "exports" / iter_dir.name
    # Each output is written (atomically) under a hidden staging name, verified, then renamed into place: a
    # failed verification leaves nothing that looks like an export.
    final = {kind: out_dir / name for kind, name in (("merged", "hf_export"), ("adapter", "hf_adapter"))
             if format in (kind, "both")}
    staged = {kind: path.parent / f".{path.name}.unverified-{os.getpid()}" for kind, path in final.items()}
    initialize_model_parallel(device, tensor_model_parallel_size=tensor, pipeline_model_parallel_size=pipeline,
                              expert_model_parallel_size=expert, seed=cfg.trainer.seed)
    writer = not dist.is_initialized() or dist.get_rank() == 0
    if writer:
        from gemma4vl.export.hf_export import recover_interrupted_export

        for path in final.values():  # leftovers of an earlier export into the same place that was killed
            recover_interrupted_export(path)
    try:
        auto_bridge, model, lora = load_model(cfg, hf_dir, iter_dir, device)
        if "merged" in staged:
            from gemma4vl.export import export_hf_checkpoint

            export_hf_checkpoint(auto_bridge, model, staged["merged"], dtype=_export_dtype(cfg),
                                 max_shard_bytes=parse_size(cfg.export.max_shard_size), overwrite=True)
        if "adapter" in staged:
            from gemma4vl.export import export_hf_adapter

            export_hf_adapter(auto_bridge, model, staged["adapter"], lora, overwrite=True)
        diffs = _verify(cfg, model, hf_dir, staged.get("merged"), staged.get("adapter")) if verify else {}
        if writer:
            from gemma4vl.export.hf_export import replace_dir

            for kind, path in final.items():
                replace_dir(staged[kind], path)
        if dist.is_initialized():
            dist.barrier()
    finally:
        if writer:
            for path in staged.values():
                shutil.rmtree(path, ignore_errors=True)
        destroy_model_parallel()
    if not writer:
        return None
    return ExportRunResult(step, final.get("merged"), final.get("adapter"), diffs)



def _verify(cfg: RunConfig, model, hf_dir: Path, merged_dir, adapter_dir) -> dict[str, float]:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.utils import unwrap_model

    from gemma4vl.training.export_check import hf_logits, megatron_logits, synthetic_probe

    if ps.get_pipeline_model_parallel_world_size() > 1:
        raise ExportRunError("verify=true needs pipeline=1 (or pass verify=false)")
    probe, image_token_id = synthetic_probe(hf_dir)
    ours = megatron_logits(unwrap_model(model)[0], probe, image_token_id)
    if dist.is_initialized() and dist.get_rank() != 0:
        return {}
    atol = 1e-4 if cfg.trainer.precision == "fp32" else 0.05 * ours.abs().max().item()
    diffs = {}
    for kind, base, adapter in (("merged", merged_dir, None), ("adapter", hf_dir, adapter_dir)):
        if kind == "merged" and merged_dir is None or kind == "adapter" and adapter_dir is None:
            continue
        diffs[kind] = (ours - hf_logits(base, probe, image_token_id, adapter_dir=adapter)).abs().max().item()
        where = merged_dir if adapter is None else adapter
        if diffs[kind] > atol:
            raise RuntimeError(f"the {kind} export in {where} does not reproduce the checkpoint's model: max |logit "
                               f"difference| {diffs[kind]:.3g} > {atol:g}")
    return diffs
