"""Cross-field checks of a composed run config, run before any weight is loaded.

Every failure names the fields involved and spells out the arithmetic, e.g.
``parallel.tensor=4 does not divide the full-attention layers' 2 KV heads``.
"""

from __future__ import annotations

from dataclasses import dataclass

from gemma4vl.bridge.hf_config import Gemma4HFConfig
from gemma4vl.config.parallel import ParallelSizeError, parallel_layout
from gemma4vl.config.schema import RunConfig
from gemma4vl.models.attention_kernels import ATTENTION_KERNELS

CHOICES = {
    "trainer.device": ("cpu", "cuda"),
    "trainer.precision": ("fp32", "bf16"),
    "trainer.recompute": ("none", "full", "selective"),
    "trainer.attention_kernel": tuple(ATTENTION_KERNELS),
    "optim.main_grads_dtype": ("fp32", "bf16"),
    "optim.optimizer": ("adam", "sgd"),
    "optim.decay_style": ("cosine", "linear", "constant"),
    "peft.method": ("none", "lora"),
    "logger.backend": ("none", "tensorboard", "wandb"),
    "logger.wandb_mode": ("auto", "online", "offline"),
    "export.dtype": ("source", "bfloat16", "float32"),
    "export.format": ("merged", "adapter", "both"),
    "model.vision_attn_implementation": ("sdpa", "eager"),
}


class ConfigError(ValueError):
    """The composed configuration is inconsistent."""


@dataclass(frozen=True)
class ValidatedRun:
    """What :func:`validate` derived from a run config and its checkpoint's config.json: each value computed once
    here and passed down to the run (no later re-reading or re-parsing)."""

    hf: Gemma4HFConfig
    """The checkpoint's config.json, read strictly (:func:`gemma4vl.bridge.read_hf_config`)."""

    data_parallel: int
    """DP = world size / (TP * PP * CP)."""

    max_shard_bytes: int | None
    """``export.max_shard_size`` in bytes (:func:`parse_size`); None when ``export.enabled`` is false."""


_SIZE_UNITS = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
               "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "B": 1}


def parse_size(text: str | int, key: str = "size") -> int:
    """Bytes of ``text``: an integer, or a number with a unit KB / MB / GB / TB (powers of 1000) or KiB / MiB /
    GiB / TiB (powers of 1024), case-insensitive, e.g. ``5GB``, ``500MiB``, ``1.5GB``. Raises naming ``key``."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        raw = str(text).strip().replace(" ", "")
        upper = raw.upper()
        value = None
        for unit, factor in _SIZE_UNITS.items():
            if upper.endswith(unit):
                try:
                    value = int(float(raw[: -len(unit)]) * factor)
                except ValueError:
                    value = None
                break
        else:
            value = int(raw) if raw.isdigit() else None
        if value is None:
            raise ConfigError(f"{key}={text!r}: expected bytes or a size like 5GB, 500MB, 2GiB, 512MiB")
    if value < 1:
        raise ConfigError(f"{key}={text!r}: must be at least 1 byte")
    return value


def _ranges(cfg: RunConfig) -> list[str]:
    """Range checks of single values (each failure names the key, the value and what is allowed)."""
    t, o, c, lg, pf = cfg.trainer, cfg.optim, cfg.checkpoint, cfg.logger, cfg.peft
    checks = [
        ("trainer.micro_batch_size", t.micro_batch_size, t.micro_batch_size >= 1, ">= 1"),
        ("trainer.global_batch_size", t.global_batch_size, t.global_batch_size >= 1, ">= 1"),
        ("trainer.train_iters", t.train_iters, t.train_iters >= 1, ">= 1"),
        ("trainer.log_interval", t.log_interval, t.log_interval >= 1, ">= 1"),
        ("trainer.eval_interval", t.eval_interval, t.eval_interval is None or t.eval_interval >= 1,
         ">= 1, or null for no evaluation"),
        ("trainer.eval_iters", t.eval_iters, t.eval_iters >= 1, ">= 1"),
        ("optim.lr", o.lr, o.lr >= 0, ">= 0"),
        ("optim.min_lr", o.min_lr, 0 <= o.min_lr <= max(o.lr, 0), f"in [0, optim.lr={o.lr}]"),
        ("optim.weight_decay", o.weight_decay, o.weight_decay >= 0, ">= 0"),
        ("optim.adam_beta1", o.adam_beta1, 0 <= o.adam_beta1 < 1, "in [0, 1)"),
        ("optim.adam_beta2", o.adam_beta2, 0 <= o.adam_beta2 < 1, "in [0, 1)"),
        ("optim.adam_eps", o.adam_eps, o.adam_eps > 0, "> 0"),
        ("optim.clip_grad", o.clip_grad, o.clip_grad >= 0, ">= 0 (0 disables clipping)"),
        ("optim.warmup_iters", o.warmup_iters, o.warmup_iters >= 0, ">= 0"),
        ("optim.decay_iters", o.decay_iters, o.decay_iters is None or o.decay_iters >= 1,
         ">= 1, or null for the whole run"),
        ("checkpoint.save_interval", c.save_interval, c.save_interval is None or c.save_interval >= 1,
         ">= 1, or null to save only at the end and on a signal"),
        ("checkpoint.keep_last", c.keep_last, c.keep_last is None or c.keep_last >= 1, ">= 1, or null to keep all"),
        ("logger.val_image_samples", lg.val_image_samples, lg.val_image_samples >= 0, ">= 0"),
    ]
    if pf.method == "lora":
        checks += [("peft.rank", pf.rank, pf.rank >= 1, ">= 1"), ("peft.alpha", pf.alpha, pf.alpha > 0, "> 0"),
                   ("peft.dropout", pf.dropout, 0 <= pf.dropout < 1, "in [0, 1)")]
    return [f"{key}={value} must be {allowed}" for key, value, ok, allowed in checks if not ok]


def _get(cfg: RunConfig, dotted: str):
    value = cfg
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def validate(cfg: RunConfig, world_size: int, hf: Gemma4HFConfig, *,
             fused_adam: bool | None = None) -> ValidatedRun:
    """Check ``cfg`` for a run on ``world_size`` processes with the checkpoint described by ``hf``; raises
    :class:`ConfigError` listing every problem, else returns what the run derives from its config. ``fused_adam``:
    whether the memory plan may count on a fused Adam (None: whether Transformer Engine or Apex is installed here)."""
    errors: list[str] = []
    for key, allowed in CHOICES.items():
        if _get(cfg, key) not in allowed:
            errors.append(f"{key}={_get(cfg, key)!r} is not one of {list(allowed)}")

    errors += _ranges(cfg)
    max_shard_bytes = None
    if cfg.export.enabled:
        try:
            max_shard_bytes = parse_size(cfg.export.max_shard_size, "export.max_shard_size")
        except ConfigError as e:
            errors.append(str(e))
    if cfg.peft.method == "lora":
        from gemma4vl.bridge.adapters import routed_lora_problems

        errors += routed_lora_problems(cfg.peft.target_modules)
    p, t = cfg.parallel, cfg.trainer
    for key in ("tensor", "pipeline", "expert", "expert_tensor", "context"):
        if getattr(p, key) < 1:
            errors.append(f"parallel.{key}={getattr(p, key)} must be >= 1")
    if errors:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(errors))

    try:  # TP / PP / CP / EP / ETP = parallel.tensor / pipeline / context / expert / expert_tensor
        layout = parallel_layout(world_size, tensor=p.tensor, pipeline=p.pipeline, context=p.context,
                                 expert=p.expert, expert_tensor=p.expert_tensor)
    except ParallelSizeError as e:
        layout = None
        errors.append(f"parallel.* on {world_size} processes: {e}")
    dp = layout.data if layout is not None else 0
    if p.context != 1:
        errors.append(f"parallel.context={p.context}: Gemma 4's attention here supports context parallel 1 only")
    for name, spec in (("sliding", hf.arch.sliding), ("full-attention", hf.arch.full)):
        if spec.num_kv_heads % p.tensor:
            errors.append(f"parallel.tensor={p.tensor} does not divide the {name} layers' {spec.num_kv_heads} KV "
                          f"heads (each tensor-parallel rank holds whole KV heads)")
    if hf.num_attention_heads % p.tensor:
        errors.append(f"parallel.tensor={p.tensor} does not divide the {hf.num_attention_heads} attention heads")
    if hf.vocab_size % p.tensor:
        errors.append(f"parallel.tensor={p.tensor} does not divide the vocabulary of {hf.vocab_size} tokens")
    if hf.num_experts % p.expert:
        errors.append(f"parallel.expert={p.expert} does not divide the {hf.num_experts} experts")
    stages = p.pipeline * (p.virtual_pipeline or 1)
    if hf.num_layers % stages:
        errors.append(f"{hf.num_layers} layers do not split into parallel.pipeline * parallel.virtual_pipeline = "
                      f"{p.pipeline} * {p.virtual_pipeline or 1} = {stages} equal stages")
    if p.sequence_parallel and p.tensor == 1:
        errors.append("parallel.sequence_parallel=true needs parallel.tensor > 1")
    if p.tensor > 1 and not p.sequence_parallel:
        errors.append(f"parallel.tensor={p.tensor} with an MoE model needs parallel.sequence_parallel=true "
                      "(Megatron-Core's MoE layer requires it with tensor parallelism)")
    if layout is not None and t.global_batch_size % (t.micro_batch_size * dp):
        errors.append(f"trainer.global_batch_size={t.global_batch_size} is not divisible by "
                      f"trainer.micro_batch_size * DP = {t.micro_batch_size} * {dp} = {t.micro_batch_size * dp} "
                      f"(DP = world {world_size} / (TP {p.tensor} * PP {p.pipeline} * CP {p.context}))")
    if t.device == "cpu" and t.precision != "fp32":
        errors.append(f"trainer.precision={t.precision!r} on trainer.device='cpu': the CPU backend trains in fp32")
    if t.device == "cpu" and t.attention_kernel != "dense":
        errors.append(f"trainer.attention_kernel={t.attention_kernel!r} needs trainer.device='cuda': FlexAttention has "
                      "no backward on CPU (torch 2.13); use trainer.attention_kernel=dense on CPU")
    if cfg.peft.method == "lora" and t.freeze_language_model:
        errors.append("peft.method=lora already freezes the base model; drop trainer.freeze_language_model")
    if cfg.export.enabled and cfg.export.format != "merged":
        errors += _adapter_export_errors(cfg)
    if cfg.data.seq_length > hf.max_position_embeddings:
        errors.append(f"data.seq_length={cfg.data.seq_length} exceeds the model's max_position_embeddings "
                      f"{hf.max_position_embeddings}")
    if p.world_size is not None and p.world_size != world_size:
        errors.append(f"parallel.world_size={p.world_size} but the run has {world_size} processes")
    if cfg.optim.main_grads_dtype == "bf16" and t.precision != "bf16":
        errors.append("optim.main_grads_dtype='bf16' needs trainer.precision='bf16'")
    if cfg.optim.overlap_param_gather and not cfg.optim.use_distributed_optimizer:
        errors.append("optim.overlap_param_gather=true needs optim.use_distributed_optimizer=true")
    if errors:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(errors))
    if t.device_memory_gib is not None:
        from gemma4vl.config.memory import GIB, fused_adam_available, plan_memory

        plan = plan_memory(cfg, hf, world_size, fused_adam=fused_adam_available() if fused_adam is None else fused_adam)
        if plan.peak_bytes > plan.device_bytes:
            raise ConfigError(f"the layout does not fit trainer.device_memory_gib={t.device_memory_gib}: "
                              f"estimated {plan.peak_bytes / GIB:.1f} GiB per GPU\n{plan.render()}")
    return ValidatedRun(hf=hf, data_parallel=dp, max_shard_bytes=max_shard_bytes)


def _adapter_export_errors(cfg: RunConfig) -> list[str]:
    """Why ``export.format`` (adapter / both) cannot be written for this run's PEFT settings, if it cannot."""
    from gemma4vl.bridge.adapters import peft_format_problems

    if cfg.peft.method != "lora":
        return [f"export.format={cfg.export.format!r} writes a LoRA adapter: it needs peft.method=lora"]
    return [f"export.format={cfg.export.format!r}: {problem}" for problem in
            peft_format_problems(cfg.peft.target_modules)]
