"""Schemas of the Hydra config groups (``conf/<group>/*.yaml``), one dataclass per group, one docstring per field.

Hydra composes ``conf/config.yaml`` onto :class:`RunConfig` (registered in Hydra's ConfigStore as ``run_schema``),
so an unknown key or a value of the wrong type fails at composition with the key's full name. Cross-field rules
(parallel arithmetic, batch sizes, choices) are checked by :func:`gemma4vl.config.validate.validate` before any
weight is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gemma4vl.data.config import Gemma4VLDataConfig

MISSING = "???"


@dataclass
class ModelConfig:
    """Which checkpoint to finetune (the architecture comes from its config.json through the bridge)."""

    name: str = MISSING
    """Short model name, used in run names and logs (e.g. ``gemma4_26b_a4b``)."""

    hf_path: str = MISSING
    """Hugging Face checkpoint directory (config.json, safetensors, processor files) imported at startup."""

    generate_fixture: str | None = None
    """A random test checkpoint variant (``tiny-moe`` or ``real-width``, see :mod:`gemma4vl.testing.fixtures`)
    that the recipe writes into ``fixture_dir`` when ``hf_path`` is ``fixture_dir`` and that directory does not
    exist yet. Only for demos and benchmarks; never written into any other directory."""

    fixture_dir: str | None = None
    """Where the recipe generates the ``generate_fixture`` checkpoint (a fresh directory, written whole or not at
    all). The fixture groups set ``hf_path: ${model.fixture_dir}``; pointing ``hf_path`` elsewhere uses that
    checkpoint as it is (an error when it is missing or incomplete)."""

    fixture_num_layers: int | None = None
    """Decoder layers of a generated fixture (None: the variant's default)."""

    vision_attn_implementation: str = "sdpa"
    """transformers attention implementation of the vision tower: ``sdpa`` or ``eager``."""


@dataclass
class ParallelConfig:
    """Parallel layout. Data parallel size is implied: DP = world size / (TP * PP * CP)."""

    tensor: int = 1
    """Tensor parallel size (TP); must divide the KV heads of both attention layer types and the vocabulary."""

    pipeline: int = 1
    """Pipeline parallel size (PP); must divide the number of layers (times ``virtual_pipeline``)."""

    virtual_pipeline: int | None = None
    """Virtual pipeline stages per pipeline rank (interleaved schedule), or None."""

    expert: int = 1
    """Expert parallel size (EP); must divide the number of experts."""

    expert_tensor: int = 1
    """Expert tensor parallel size (ETP) of the routed experts."""

    context: int = 1
    """Context parallel size; Gemma 4's attention here supports 1 only."""

    sequence_parallel: bool = False
    """Split activations along the sequence over TP ranks outside attention / MLP (required for MoE with TP > 1)."""

    world_size: int | None = None
    """Processes (GPUs) this layout is written for, or None (any). Set: the run refuses another world size, and
    ``python -m recipes.plan`` plans for it."""


@dataclass
class OptimConfig:
    """Optimizer, gradient clipping and learning-rate schedule."""

    optimizer: str = "adam"
    """``adam`` (AdamW: decoupled weight decay) or ``sgd``."""

    lr: float = 1e-4
    """Peak learning rate."""

    min_lr: float = 0.0
    """Learning rate at the end of the decay."""

    weight_decay: float = 0.0
    """Decoupled weight decay."""

    adam_beta1: float = 0.9
    """Adam beta1."""

    adam_beta2: float = 0.999
    """Adam beta2."""

    adam_eps: float = 1e-8
    """Adam epsilon."""

    clip_grad: float = 1.0
    """Clip the global gradient L2 norm to this value (0 disables clipping)."""

    use_distributed_optimizer: bool = False
    """Shard optimizer state over data-parallel ranks (ZeRO-1)."""

    main_grads_dtype: str = "fp32"
    """Gradient buffer of Megatron's DDP (accumulation over micro batches and the data-parallel reduction):
    ``fp32``, or ``bf16`` (half the bytes; with ``trainer.precision=bf16`` only). The optimizer's master
    weights and Adam moments stay fp32 either way."""

    overlap_grad_reduce: bool = False
    """Overlap the data-parallel gradient reduction with the backward pass (bucketed, no extra memory)."""

    overlap_param_gather: bool = False
    """Overlap the distributed optimizer's parameter all-gather with the next forward pass (needs
    ``use_distributed_optimizer``)."""

    warmup_iters: int = 0
    """Linear warmup iterations."""

    decay_style: str = "cosine"
    """``cosine``, ``linear`` or ``constant`` after warmup."""

    decay_iters: int | None = None
    """Iterations over which the LR decays to ``min_lr`` (None: the whole run)."""


@dataclass
class PeftConfig:
    """Parameter-efficient finetuning."""

    method: str = "none"
    """``none`` (full finetuning) or ``lora``."""

    rank: int = 16
    """LoRA rank."""

    alpha: float = 32.0
    """LoRA scaling numerator (scale = alpha / rank)."""

    dropout: float = 0.0
    """Dropout on the LoRA input."""

    target_modules: list[str] = field(default_factory=lambda: ["linear_qkv", "linear_proj"])
    """Megatron modules to adapt: a module name (``linear_qkv``, ``linear_proj``; ``linear_fc1`` / ``linear_fc2``
    match the shared and the routed experts) or a wildcard pattern on the full name (``*.shared_experts.linear_fc1``,
    ``*.local_experts.*.linear_fc2``). See docs/lora.md for which targets the PEFT adapter export supports."""


@dataclass
class TrainerConfig:
    """The training loop."""

    device: str = "cpu"
    """``cpu`` (gloo, the CPU backend) or ``cuda`` (NCCL)."""

    train_iters: int = 100
    """Optimizer steps."""

    micro_batch_size: int = 1
    """Rows (packed sequences) per micro batch per data-parallel rank."""

    global_batch_size: int = 8
    """Rows per optimizer step over all data-parallel ranks; a multiple of micro_batch_size * DP."""

    precision: str = "fp32"
    """``fp32``, or ``bf16`` (bf16 parameters and activations, fp32 main weights in the optimizer)."""

    recompute: str = "none"
    """Activation recomputation: ``none``, ``full`` (recompute every layer in the backward pass) or
    ``selective`` (recompute each layer's MoE block: router, token dispatch, experts, shared expert, post-norms;
    keep attention)."""

    device_memory_gib: float | None = None
    """Memory of one accelerator in GiB (e.g. 79.1 for an H100 80GB as torch reports it). Set: the run is
    refused when the memory plan (:mod:`gemma4vl.config.memory`) exceeds it. None: not checked."""

    attention_kernel: str = "dense"
    """Attention kernel of the decoder layers (:mod:`gemma4vl.models.attention_kernels`): ``dense`` (SDPA with
    explicit [s, s] masks; the reference, and the only choice on CPU), ``flex`` (FlexAttention with block masks that
    skip what the samples, the window and causality exclude; ``device: cuda`` only) or ``flex_sliding`` (flex on
    sliding-window layers, dense on full-attention layers)."""

    freeze_vision_tower: bool = False
    """Keep the vision tower's weights fixed."""

    freeze_embed_vision: bool = False
    """Keep the multimodal projector's weights fixed."""

    freeze_language_model: bool = False
    """Keep the language model's weights fixed (train only the unfrozen vision parts / adapters)."""

    eval_interval: int | None = 50
    """Evaluate on the validation split every this many steps (None: never during training)."""

    eval_iters: int = 4
    """Validation batches per evaluation."""

    log_interval: int = 10
    """Print a progress line (and log metrics) every this many steps; throughput is averaged over this many steps
    (at least 2)."""

    seed: int = 1234
    """Seed of model-parallel RNG streams and the data order."""

    exit_on_signal: bool = True
    """On SIGTERM / SIGUSR1: save a checkpoint and exit with status 75 (``EXIT_PREEMPTED``, see docs/training.md),
    so Slurm can requeue."""

    distributed_timeout_minutes: int = 90
    """How long a collective waits for the other ranks before it fails, in minutes (the default process group and
    Megatron's parallel groups). It must exceed the longest time ranks spend apart: saving a checkpoint of
    gemma-4-26B-A4B with its optimizer state can take over 10 minutes (Megatron-Bridge's own 26B recipe uses 90).
    Under launch/finetune.sh a rank that crashed does not leave the others waiting this long: srun stops them
    after the launcher's shutdown window (docs/slurm.md)."""


@dataclass
class LoggerConfig:
    """Metrics logging."""

    backend: str = "none"
    """``none``, ``tensorboard`` or ``wandb``."""

    project: str = "gemma4vl"
    """wandb project."""

    entity: str | None = None
    """wandb entity (team or user), or None for the default."""

    wandb_mode: str = "auto"
    """``online``, ``offline``, or ``auto``: online when an API key is configured, offline otherwise."""

    val_image_samples: int = 4
    """Validation images logged with the model's answers (wandb table) at each evaluation."""

    megatron_details: bool = False
    """Show Megatron-Bridge's own per-iteration line (otherwise at DEBUG level of its logger), the DDP bucket
    parameter listing and its optional-import tracebacks (see :mod:`gemma4vl.runtime.log_noise`)."""


@dataclass
class CheckpointConfig:
    """Distributed (Megatron) checkpoints of the training state, for resume."""

    save_interval: int | None = 50
    """Save every this many steps (None: only at the end and on a signal)."""

    dir: str = "${run_dir}/checkpoints"
    """Where checkpoints go."""

    keep_last: int | None = 2
    """Keep only the newest this many checkpoints (None: keep all)."""

    resume: bool = True
    """Resume from the newest complete checkpoint in ``dir`` when there is one."""


@dataclass
class ExportConfig:
    """The Hugging Face export at the end of training."""

    enabled: bool = True
    """Export (and verify) an HF checkpoint when training finishes."""

    dir: str = "${run_dir}/hf_export"
    """Destination directory (written atomically)."""

    dtype: str = "source"
    """``source`` (the imported checkpoint's dtype), ``bfloat16`` or ``float32``."""

    max_shard_size: str = "5GB"
    """Largest safetensors shard (e.g. ``5GB``, ``500MB``)."""

    verify_logits: bool = False
    """After exporting, reload the export in transformers on the host (float32) and check its logits on a
    validation prompt equal the trained model's (1e-4 after fp32 training, 5% of the logit range after bf16);
    an adapter export is loaded with ``peft`` onto the source checkpoint. Needs the whole model in host memory:
    for small models, tests and demos."""

    format: str = "merged"
    """``merged`` (an HF checkpoint, LoRA adapters merged into the weights, in ``dir``), ``adapter`` (LoRA runs: an
    HF PEFT adapter for the source checkpoint, in ``adapter_dir``) or ``both``."""

    adapter_dir: str = "${run_dir}/hf_adapter"
    """Destination of the PEFT adapter (``adapter_config.json`` + ``adapter_model.safetensors``, written
    atomically)."""


@dataclass
class RunConfig:
    """A finetuning run: the composition of every group."""

    name: str = "demo"
    """Run name (logs, wandb run name); the default run directory derives from it."""

    run_dir: str = "outputs/${name}"
    """Everything the run writes: resolved config, checkpoints, logs, hf_export. Rerunning with the same run
    directory resumes."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """See :class:`ModelConfig`."""

    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """See :class:`ParallelConfig`."""

    data: Gemma4VLDataConfig = field(default_factory=Gemma4VLDataConfig)
    """See :class:`gemma4vl.data.config.Gemma4VLDataConfig` (the data group's schema lives with the pipeline)."""

    optim: OptimConfig = field(default_factory=OptimConfig)
    """See :class:`OptimConfig`."""

    peft: PeftConfig = field(default_factory=PeftConfig)
    """See :class:`PeftConfig`."""

    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    """See :class:`TrainerConfig`."""

    logger: LoggerConfig = field(default_factory=LoggerConfig)
    """See :class:`LoggerConfig`."""

    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """See :class:`CheckpointConfig`."""

    export: ExportConfig = field(default_factory=ExportConfig)
    """See :class:`ExportConfig`."""


def register_configs() -> None:
    """Register :class:`RunConfig` in Hydra's ConfigStore as ``run_schema`` (conf/config.yaml builds on it)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="run_schema", node=RunConfig)
