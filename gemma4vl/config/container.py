"""The one place that turns a composed run config into Megatron-Bridge's ``ConfigContainer``.

:func:`build_config_container` takes the validated :class:`~gemma4vl.config.schema.RunConfig` and the bridge of
the checkpoint and fills every Megatron-Bridge section: the model provider (from our bridge, weights imported
while the model is built unless a checkpoint is resumed), parallelism and precision on it, optimizer, LR
schedule, DDP, data, logging, checkpointing, distributed init and RNG.
"""

from __future__ import annotations

from pathlib import Path

import torch

from gemma4vl.config.schema import RunConfig
from gemma4vl.runtime import import_megatron_bridge

import_megatron_bridge()

from megatron.bridge.training.config import (  # noqa: E402
    CheckpointConfig,
    ConfigContainer,
    DistributedDataParallelConfig,
    DistributedInitConfig,
    LoggerConfig,
    OptimizerConfig,
    RNGConfig,
    SchedulerConfig,
    TokenizerConfig,
    TrainingConfig,
    ValidationConfig,
)

from gemma4vl.config.data_provider import Gemma4VLDatasetProvider  # noqa: E402


def _freeze_hook(cfg: RunConfig):
    """A pre-wrap hook that fixes the weights the trainer config freezes (before DDP sees the parameters)."""
    frozen = [name for name, flag in (("vision_tower", cfg.trainer.freeze_vision_tower),
                                      ("embed_vision", cfg.trainer.freeze_embed_vision),
                                      ("language_model", cfg.trainer.freeze_language_model)) if flag]

    def hook(model_chunks):
        for chunk in model_chunks:
            for name in frozen:
                module = getattr(chunk, name, None)
                if module is not None:
                    module.requires_grad_(False)
        return model_chunks

    return hook if frozen else None


def configure_provider(provider, cfg: RunConfig) -> None:
    """Parallel layout, precision and recompute of the run on the bridge's provider."""
    p, t = cfg.parallel, cfg.trainer
    provider.tensor_model_parallel_size = p.tensor
    provider.pipeline_model_parallel_size = p.pipeline
    provider.virtual_pipeline_model_parallel_size = p.virtual_pipeline
    provider.expert_model_parallel_size = p.expert
    provider.expert_tensor_parallel_size = p.expert_tensor
    provider.context_parallel_size = p.context
    provider.sequence_parallel = p.sequence_parallel
    dtype = torch.bfloat16 if t.precision == "bf16" else torch.float32
    provider.params_dtype = provider.pipeline_dtype = provider.autocast_dtype = dtype
    provider.bf16 = t.precision == "bf16"
    provider.fp16 = False
    provider.seq_length = cfg.data.seq_length
    provider.vision_attn_implementation = cfg.model.vision_attn_implementation
    provider.attention_kernel = t.attention_kernel
    # On CPU the model is built in host memory (Megatron-Bridge's get_model would otherwise move it to CUDA).
    provider.use_cpu_initialization = t.device == "cpu"
    if t.recompute == "full":
        provider.recompute_granularity = "full"
        provider.recompute_method = "uniform"
        provider.recompute_num_layers = 1
    elif t.recompute == "selective":
        # Megatron-Core's MoELayer checkpoints its whole forward (route, dispatch, experts, combine, our
        # post-norms) and reruns it in backward; attention activations are kept.
        provider.recompute_granularity = "selective"
        provider.recompute_modules = ["moe"]
    # Fused token permutation of the MoE dispatcher: Transformer Engine's kernels, where installed (GPU).
    from gemma4vl.runtime.te_shim import transformer_engine_installed

    provider.moe_permute_fusion = t.device == "cuda" and transformer_engine_installed()
    hook = _freeze_hook(cfg)
    if hook is not None:
        provider.register_pre_wrap_hook(hook)


def _peft(cfg: RunConfig):
    if cfg.peft.method == "none":
        return None
    from megatron.bridge.peft.lora import LoRA

    # Without Transformer Engine, import_megatron_bridge (above) has set Megatron-Bridge's peft_utils.HAVE_TE to
    # False (gemma4vl/runtime/patches_bridge.py, section H).
    return LoRA(target_modules=list(cfg.peft.target_modules), dim=cfg.peft.rank, alpha=cfg.peft.alpha,
                dropout=cfg.peft.dropout)


def build_config_container(cfg: RunConfig, auto_bridge, *, resume: bool) -> ConfigContainer:
    """Megatron-Bridge's config for ``cfg``.

    Full finetuning imports the HF checkpoint through our bridge in a pre-wrap hook on the provider (the model's
    parameters are written before DDP and the optimizer see them) and gives Megatron-Bridge no
    ``pretrained_checkpoint``: its own import path recognises a checkpoint only by file name and silently skips
    one it does not recognise. LoRA keeps Megatron-Bridge's path (``pretrained_checkpoint``: the base is loaded,
    through our bridge, before the adapters are added; the file names were checked by
    :func:`~gemma4vl.bridge.precheck_hf_checkpoint`). ``resume``: the newest checkpoint in ``cfg.checkpoint.dir``
    is loaded instead, and full finetuning imports nothing (for LoRA: the base from the HF checkpoint, then the
    adapters and optimizer from the run's)."""
    run_dir = Path(cfg.run_dir)
    t, o = cfg.trainer, cfg.optim
    hf_dir = str(auto_bridge.hf_pretrained.model_name_or_path)
    lora = cfg.peft.method != "none"
    provider = auto_bridge.to_megatron_provider(load_weights=not lora and not resume)
    configure_provider(provider, cfg)
    bf16 = t.precision == "bf16"
    # Throughput (samples/s, tokens/s) goes to TensorBoard / wandb too, averaged over the last log interval
    # (Megatron-Bridge needs a window of at least 2 steps to measure one).
    logger = LoggerConfig(log_interval=t.log_interval, log_throughput=True, log_progress=False,
                          timing_log_level=0, log_throughput_to_tensorboard=True,
                          throughput_window_size=max(2, t.log_interval),
                          # Megatron's default filter drops WARNINGs of *every* logger, ours included (bad rows
                          # skipped, interrupted exports restored): keep them.
                          filter_warnings=False)
    # wandb is ours, not Megatron-Bridge's: the run's metrics log writes to it (gemma4vl.training.metrics); with
    # logger=wandb Megatron-Bridge still writes its TensorBoard events (throughput, timers, memory).
    if cfg.logger.backend in ("tensorboard", "wandb"):
        logger.tensorboard_dir = str(run_dir / "tensorboard")
    ckpt_dir = str(Path(cfg.checkpoint.dir))
    return ConfigContainer(
        rng=RNGConfig(seed=t.seed),
        train=TrainingConfig(
            train_iters=t.train_iters,
            micro_batch_size=t.micro_batch_size,
            global_batch_size=t.global_batch_size,
            exit_signal_handler=t.exit_on_signal,
            # Data-loader workers keep running on SIGTERM (torch's own worker handler exits on a SIGTERM that does
            # not come from the parent, and Slurm signals every process of a step): the trainer stops them itself.
            exit_signal_handler_for_dataloader=t.exit_on_signal,
        ),
        validation=ValidationConfig(eval_interval=t.eval_interval, eval_iters=t.eval_iters if t.eval_interval else 0),
        model=provider,
        optimizer=OptimizerConfig(
            optimizer=o.optimizer,
            lr=o.lr,
            min_lr=o.min_lr,
            weight_decay=o.weight_decay,
            adam_beta1=o.adam_beta1,
            adam_beta2=o.adam_beta2,
            adam_eps=o.adam_eps,
            clip_grad=o.clip_grad,
            bf16=bf16,
            params_dtype=torch.bfloat16 if bf16 else torch.float32,
            use_distributed_optimizer=o.use_distributed_optimizer,
        ),
        scheduler=SchedulerConfig(
            lr_decay_style=o.decay_style,
            lr_warmup_iters=o.warmup_iters,
            lr_decay_iters=o.decay_iters if o.decay_iters is not None else t.train_iters,
            start_weight_decay=o.weight_decay,
            end_weight_decay=o.weight_decay,
            weight_decay_incr_style="constant",
            # On resume the schedule comes from the checkpoint. preflight.check_resume has already refused a resume
            # whose lr / warmup / decay / weight decay / global batch differ, so this only lets train_iters grow
            # (with optim.decay_iters fixed) past Megatron's check of the unused weight-decay ramp length.
            use_checkpoint_opt_param_scheduler=True,
        ),
        ddp=DistributedDataParallelConfig(
            use_distributed_optimizer=o.use_distributed_optimizer,
            grad_reduce_in_fp32=o.main_grads_dtype == "fp32",
            overlap_grad_reduce=o.overlap_grad_reduce,
            overlap_param_gather=o.overlap_param_gather,
            check_for_nan_in_grad=True,
        ),
        dataset=Gemma4VLDatasetProvider.from_config(cfg.data),
        logger=logger,
        tokenizer=TokenizerConfig(tokenizer_type="NullTokenizer", vocab_size=provider.vocab_size),
        checkpoint=CheckpointConfig(
            save=ckpt_dir,
            load=ckpt_dir if resume else None,
            pretrained_checkpoint=hf_dir if lora else None,
            save_interval=cfg.checkpoint.save_interval,
            most_recent_k=cfg.checkpoint.keep_last if cfg.checkpoint.keep_last is not None else -1,
            ckpt_format="torch_dist",
            async_save=False,
        ),
        dist=DistributedInitConfig(distributed_backend="gloo" if t.device == "cpu" else "nccl",
                                   distributed_timeout_minutes=t.distributed_timeout_minutes),
        peft=_peft(cfg),
    )
