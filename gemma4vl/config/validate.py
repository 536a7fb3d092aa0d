"""Cross-field checks of a composed run config, run before any weight is loaded.

Every failure names the fields involved and spells out the arithmetic, e.g.
``parallel.tensor=4 does not divide the full-attention layers' 2 KV heads``.
"""

from __future__ import annotations

from gemma4vl.bridge.hf_config import Gemma4HFConfig
from gemma4vl.config.schema import RunConfig
from gemma4vl.models.attention_kernels import ATTENTION_KERNELS

CHOICES = {
    "trainer.device": ("cpu", "cuda"),
    "trainer.precision": ("fp32", "bf16"),
    "trainer.recompute": ("none", "full"),
    "trainer.attention_kernel": tuple(ATTENTION_KERNELS),
    "optim.optimizer": ("adam", "sgd"),
    "optim.decay_style": ("cosine", "linear", "constant"),
    "peft.method": ("none", "lora"),
    "logger.backend": ("none", "tensorboard", "wandb"),
    "logger.wandb_mode": ("auto", "online", "offline"),
    "export.dtype": ("source", "bfloat16", "float32"),
    "data.dataloader_type": ("single", "cyclic"),
    "model.vision_attn_implementation": ("sdpa", "eager"),
}


class ConfigError(ValueError):
    """The composed configuration is inconsistent."""


def _get(cfg: RunConfig, dotted: str):
    value = cfg
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def validate(cfg: RunConfig, world_size: int, hf: Gemma4HFConfig) -> int:
    """Check ``cfg`` for a run on ``world_size`` processes with the checkpoint described by ``hf``.
    Returns the data-parallel size."""
    errors: list[str] = []
    for key, allowed in CHOICES.items():
        if _get(cfg, key) not in allowed:
            errors.append(f"{key}={_get(cfg, key)!r} is not one of {list(allowed)}")

    p, t = cfg.parallel, cfg.trainer
    for key in ("tensor", "pipeline", "expert", "expert_tensor", "context"):
        if getattr(p, key) < 1:
            errors.append(f"parallel.{key}={getattr(p, key)} must be >= 1")
    if errors:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(errors))

    model_parallel = p.tensor * p.pipeline * p.context
    dp = world_size // model_parallel
    if world_size % model_parallel:
        errors.append(f"world size {world_size} is not divisible by parallel.tensor * parallel.pipeline * "
                      f"parallel.context = {p.tensor} * {p.pipeline} * {p.context} = {model_parallel}")
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
    if world_size % (p.expert * p.expert_tensor * p.pipeline):
        errors.append(f"world size {world_size} is not divisible by parallel.expert * parallel.expert_tensor * "
                      f"parallel.pipeline = {p.expert} * {p.expert_tensor} * {p.pipeline}")
    stages = p.pipeline * (p.virtual_pipeline or 1)
    if hf.num_layers % stages:
        errors.append(f"{hf.num_layers} layers do not split into parallel.pipeline * parallel.virtual_pipeline = "
                      f"{p.pipeline} * {p.virtual_pipeline or 1} = {stages} equal stages")
    if p.sequence_parallel and p.tensor == 1:
        errors.append("parallel.sequence_parallel=true needs parallel.tensor > 1")
    if p.tensor > 1 and not p.sequence_parallel:
        errors.append(f"parallel.tensor={p.tensor} with an MoE model needs parallel.sequence_parallel=true "
                      "(Megatron-Core's MoE layer requires it with tensor parallelism)")
    if dp > 0 and t.global_batch_size % (t.micro_batch_size * dp):
        errors.append(f"trainer.global_batch_size={t.global_batch_size} is not divisible by "
                      f"trainer.micro_batch_size * DP = {t.micro_batch_size} * {dp} = {t.micro_batch_size * dp} "
                      f"(DP = world {world_size} / (TP {p.tensor} * PP {p.pipeline} * CP {p.context}))")
    if t.train_iters < 1:
        errors.append(f"trainer.train_iters={t.train_iters} must be >= 1")
    if t.device == "cpu" and t.precision != "fp32":
        errors.append(f"trainer.precision={t.precision!r} on trainer.device='cpu': the CPU backend trains in fp32")
    if t.device == "cpu" and t.attention_kernel != "dense":
        errors.append(f"trainer.attention_kernel={t.attention_kernel!r} needs trainer.device='cuda': FlexAttention has "
                      "no backward on CPU (torch 2.13); use trainer.attention_kernel=dense on CPU")
    if cfg.peft.method == "lora" and t.freeze_language_model:
        errors.append("peft.method=lora already freezes the base model; drop trainer.freeze_language_model")
    if cfg.data.seq_length > hf.max_position_embeddings:
        errors.append(f"data.seq_length={cfg.data.seq_length} exceeds the model's max_position_embeddings "
                      f"{hf.max_position_embeddings}")
    if errors:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(errors))
    return dp
