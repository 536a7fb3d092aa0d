"""Per-GPU memory model of a run: parameters counted from the checkpoint's config, then bytes per GPU for
weights, gradients, optimizer state, activations, the loss peak and the optimizer step.

``python -m recipes.plan experiment=...`` prints it; :func:`gemma4vl.config.validate.validate` refuses a layout
whose estimate exceeds ``trainer.device_memory_gib``. Parameter counts are exact (tests/test_memory_plan.py
compares them with the model built on the meta device); the activation and transient terms are an inventory of
the tensors our layers keep for backward (tests/test_memory_plan.py compares one layer with the bytes autograd
saves on CPU), not a GPU measurement: ``bench/gpu_step.py`` should compare it with ``max_memory_allocated``.

Worst rank of the layout: pipeline stage 0 is assumed to hold the embedding, the vision tower and
``num_layers / PP`` decoder layers (an overestimate for later stages). Not counted: activations of a trainable
vision tower (the shipped 26B layouts freeze it or train LoRA adapters of the language model only).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from gemma4vl.bridge.hf_config import Gemma4HFConfig
from gemma4vl.config.parallel import parallel_layout
from gemma4vl.config.schema import RunConfig
from gemma4vl.models.arch import FULL, SLIDING
from gemma4vl.models.loss import LOSS_CHUNK_BYTES, loss_chunk_tokens

GIB = 1 << 30

RUNTIME_RESERVE_GIB = 3.0
"""Memory outside PyTorch tensors, reserved per GPU: CUDA context (~0.5 GiB), NCCL communicators and buffers,
cuBLAS / CUTLASS workspaces, caching-allocator fragmentation. An assumption, to be measured on the GPU."""

BACKWARD_WORKSPACE = 0.5
"""Gradients of one layer's activations alive at once during its backward, as a fraction of what the layer
saved for backward (the recompute peak is ``(1 + BACKWARD_WORKSPACE) x`` one layer's saved bytes)."""

EXPERT_IMBALANCE = 1.5
"""Tokens the busiest expert-parallel rank receives, over the balanced share (Gemma 4 trains without an
auxiliary load-balancing loss, so routing is not forced to balance)."""


@dataclass
class ParameterCounts:
    """Parameters of the whole model, by group (the unit of sharding and freezing)."""

    embedding: int
    """Token embedding (tied with the output layer when the checkpoint ties them, counted once)."""
    output: int
    """Separate output layer (0 when tied)."""
    decoder_dense: int
    """Decoder parameters outside the routed experts: attention, norms, router, dense / shared-expert MLP."""
    decoder_tp: int
    """The part of ``decoder_dense`` split over tensor-parallel ranks (attention and MLP linears)."""
    experts: int
    """Routed experts of all layers."""
    vision_tower: int
    """The Hugging Face vision tower."""
    embed_vision: int
    """The multimodal projector."""
    lora: int
    """LoRA adapters of the run's target modules (0 without LoRA)."""

    @property
    def total(self) -> int:
        """Every parameter of the model (adapters excluded)."""
        return (self.embedding + self.output + self.decoder_dense + self.experts + self.vision_tower
                + self.embed_vision)


def _linear_shapes(hf: Gemma4HFConfig, layer_type: str) -> dict[str, tuple[int, int]]:
    """(in, out) of the tensor-parallel linears of one decoder layer, as our model holds them."""
    spec = hf.arch.attention(layer_type)
    h, heads = hf.hidden_size, hf.num_attention_heads
    return {
        "linear_qkv": (h, (heads + 2 * spec.num_kv_heads) * spec.head_dim),
        "linear_proj": (heads * spec.head_dim, h),
        "linear_fc1": (h, 2 * hf.intermediate_size),
        "linear_fc2": (hf.intermediate_size, h),
    }


def _vision_parameters(hf: Gemma4HFConfig) -> int:
    """Parameters of transformers' vision tower, built on the meta device (no memory, no init)."""
    import torch

    from gemma4vl.models.vision import build_vision_tower

    if hf.arch.vision_config is None:
        return 0
    with torch.device("meta"):
        tower = build_vision_tower(hf.arch.vision_config, initialize=False)
    return sum(p.numel() for p in tower.parameters())


def count_parameters(hf: Gemma4HFConfig, lora_targets: list[str] | None = None, lora_rank: int = 0
                     ) -> ParameterCounts:
    """Parameter counts of our model for the checkpoint described by ``hf`` (and LoRA adapters of
    ``lora_rank`` on ``lora_targets``)."""
    h = hf.hidden_size
    dense = tp = experts = lora = 0
    for layer_type in hf.arch.layer_types:
        spec = hf.arch.attention(layer_type)
        shapes = _linear_shapes(hf, layer_type)
        layer_tp = sum(i * o for i, o in shapes.values())
        norms = 4 * h + 2 * spec.head_dim  # input, post-attention, pre-MLP, post-MLP; q and k norms
        if hf.arch.enable_moe_block:
            norms += 2 * h  # post-routed and post-shared norms
            experts += hf.num_experts * 3 * hf.moe_intermediate_size * h
            dense += hf.num_experts * h + hf.num_experts  # router weight, per-expert scale
        dense += layer_tp + norms
        tp += layer_tp
        for target in lora_targets or []:
            i, o = shapes[target]
            lora += lora_rank * (i + o)
    dense += h  # final norm
    embedding = hf.vocab_size * h
    vision_hidden = hf.arch.vision_config.hidden_size if hf.arch.vision_config is not None else 0
    return ParameterCounts(
        embedding=embedding, output=0 if hf.tie_word_embeddings else embedding, decoder_dense=dense, decoder_tp=tp,
        experts=experts, vision_tower=_vision_parameters(hf), embed_vision=vision_hidden * h, lora=lora)


@dataclass
class MemoryLine:
    """One line of the plan."""

    name: str
    """What the bytes are."""
    bytes: float
    """Per GPU."""
    detail: str = ""
    """How they were counted."""


@dataclass
class MemoryPlan:
    """The per-GPU estimate of a layout."""

    header: list[str]
    """Layout and parameter lines."""
    lines: list[MemoryLine] = field(default_factory=list)
    """Weights, grads, optimizer state, activations, loss peak, optimizer step, reserve."""
    peak_bytes: float = 0.0
    """Per-GPU peak: static state + reserve + the larger of the training-pass and the optimizer-step peaks."""
    device_bytes: float | None = None
    """Memory of one GPU (None: not given)."""

    def line(self, name: str) -> MemoryLine:
        return next(line for line in self.lines if line.name == name)

    def render(self) -> str:
        out = list(self.header)
        width = max(len(line.name) for line in self.lines)
        for line in self.lines:
            out.append(f"  {line.name:<{width}}  {line.bytes / GIB:8.2f} GiB   {line.detail}")
        device = f"{self.device_bytes / GIB:.1f}" if self.device_bytes is not None else "?"
        out.append(f"per-GPU peak estimate: {self.peak_bytes / GIB:.1f} GiB of {device} GiB")
        return "\n".join(out)


def layer_activation_bytes(hf: Gemma4HFConfig, layer_type: str, micro_batch: int, seq: int, act_bytes: int,
                           tp: int = 1, sequence_parallel: bool = False,
                           expert_imbalance: float = EXPERT_IMBALANCE) -> dict[str, float]:
    """Bytes one decoder layer keeps for backward without recompute (weights excluded), by part:
    ``attention`` (input norm through the post-attention norm, the dense S x S mask bias of SDPA included) and
    ``mlp`` (pre-MLP norm through the layer output: router, dispatched tokens, routed experts, shared expert,
    post-norms). An inventory of what autograd saves in our layers (tests/test_memory_plan.py measures it):

    - an RMSNorm keeps its fp32 input and normalised values (2 x 4 B per element) and the fp32 rsqrt per row;
      the scaleless v norm only the fp32 input;
    - a linear keeps its input (the previous op's output, in the activation dtype);
    - gated MLPs keep fc1's output (2I), the activation output, the ``+ offset`` result and the product (3I);
      routed experts also their probability-scaled product (I);
    - SDPA keeps q, the repeated k and v, and the float mask bias [b, 1, s, s]."""
    spec = hf.arch.attention(layer_type)
    t = micro_batch * seq
    t_sp = t / tp if sequence_parallel else t  # tokens of the H-wide tensors on this rank
    h, a, f = hf.hidden_size, act_bytes, 4
    heads, kv_heads = hf.num_attention_heads / tp, spec.num_kv_heads / tp
    qd, kd = heads * spec.head_dim, kv_heads * spec.head_dim

    def norm(width: float, rows: float) -> float:
        return 2 * f * width * rows + f * rows

    attention = (
        norm(h, t_sp) + t * h * a                        # input norm; qkv input
        + norm(qd, t) + f * t * heads                    # q norm (per head rows); its fp32 rsqrt per head
        + norm(kd, t) + f * t * kd + 2 * f * t * kv_heads  # k norm; scaleless v norm
        + 4 * t * spec.head_dim * a                      # RoPE cos / sin of q and k
        + 3 * t * qd * a + f * t * heads                 # SDPA: q, repeated k and v; log-sum-exp
        + micro_batch * seq * seq * a                    # the dense mask as a float bias
        + t * qd * a                                     # output projection input
        + norm(h, t_sp)                                  # post-attention norm
    )
    shared = t * a * 5 * hf.intermediate_size / tp      # fc1 out (2I), act, offset, product (3I)
    if hf.arch.enable_moe_block:
        k, e, i = hf.top_k_experts, hf.num_experts, hf.moe_intermediate_size
        routed = expert_imbalance * t * k * a * (h + 6 * i)  # dispatched tokens; fc1 out, act, offset, product,
        router = t * (h * a + (a + 8) * e + 8 * k)           # probability-scaled; router input, logits, probs
        mlp = norm(h, t_sp) + router + routed + shared + 2 * norm(h, t_sp) + norm(h, t_sp)
    else:
        mlp = norm(h, t_sp) + t_sp * h * a + shared + norm(h, t_sp)
    return {"attention": attention, "mlp": mlp}


def plan_memory(cfg: RunConfig, hf: Gemma4HFConfig, world_size: int, *, fused_adam: bool) -> MemoryPlan:
    """The per-GPU memory plan of ``cfg`` on ``world_size`` GPUs. ``fused_adam``: Megatron-Core will use a
    fused Adam (Transformer Engine or Apex); otherwise torch's AdamW, whose multi-tensor step allocates one
    fp32 temporary per optimizer-state element."""
    p, t, o = cfg.parallel, cfg.trainer, cfg.optim
    lora = cfg.peft.method == "lora"
    counts = count_parameters(hf, list(cfg.peft.target_modules) if lora else None, cfg.peft.rank)
    tp, pp, ep, etp = p.tensor, p.pipeline, p.expert, p.expert_tensor
    layout = parallel_layout(world_size, tensor=tp, pipeline=pp, context=p.context, expert=ep, expert_tensor=etp)
    dp, expert_dp = layout.data, layout.expert_data

    # Parameters on the worst rank: stage 0 holds embedding, vision and L/PP layers.
    layers_frac = 1 / pp
    dense_local = ((counts.decoder_dense - counts.decoder_tp) * layers_frac + counts.decoder_tp * layers_frac / tp
                   + counts.embedding / tp + counts.output / tp + counts.vision_tower + counts.embed_vision)
    expert_local = counts.experts * layers_frac / (ep * etp)
    lora_local = counts.lora * layers_frac / tp
    language = dense_local - counts.vision_tower - counts.embed_vision
    if lora:  # Megatron-Bridge's LoRA freezes every base weight
        trainable_dense, trainable_expert = lora_local, 0.0
    else:
        trainable_dense = ((0 if t.freeze_language_model else language)
                           + (0 if t.freeze_vision_tower else counts.vision_tower)
                           + (0 if t.freeze_embed_vision else counts.embed_vision))
        trainable_expert = 0.0 if t.freeze_language_model else expert_local

    bf16 = t.precision == "bf16"
    param_bytes = 2 if bf16 else 4
    grad_bytes = 2 if (bf16 and o.main_grads_dtype == "bf16") else 4
    master = 4 if bf16 else 0
    state = 8 if o.optimizer == "adam" else 4
    shard_dense = trainable_dense / dp if o.use_distributed_optimizer else trainable_dense
    shard_expert = trainable_expert / expert_dp if o.use_distributed_optimizer else trainable_expert
    shard = shard_dense + shard_expert
    dp_opt, expert_dp_opt = (dp, expert_dp) if o.use_distributed_optimizer else (1, 1)

    lines = [
        MemoryLine("weights", (dense_local + expert_local + lora_local) * param_bytes,
                   f"{param_bytes} B x ({dense_local / 1e9:.3f}B dense + {expert_local / 1e9:.3f}B expert"
                   f" + {lora_local / 1e6:.2f}M adapter) parameters"),
        MemoryLine("grads", (trainable_dense + trainable_expert) * grad_bytes,
                   f"{grad_bytes} B x {(trainable_dense + trainable_expert) / 1e9:.3f}B trainable (DDP buffer, "
                   f"{'bf16' if grad_bytes == 2 else 'fp32'})"),
        MemoryLine("optimizer state", shard * (master + state),
                   f"{master + state} B x ({shard_dense / 1e9:.3f}B dense / DP {dp_opt}"
                   f" + {shard_expert / 1e9:.3f}B expert / expert-DP {expert_dp_opt})"),
    ]

    # Activations of one micro batch on this rank.
    a = param_bytes
    mbs, seq = t.micro_batch_size, cfg.data.seq_length
    sp = p.sequence_parallel
    tokens_h = mbs * seq * hf.hidden_size * a / (tp if sp else 1)  # one [s, b, h] tensor
    local_types = list(hf.arch.layer_types)[: max(1, len(hf.arch.layer_types) // pp)]
    per_layer = [layer_activation_bytes(hf, lt, mbs, seq, a, tp, sp) for lt in local_types]
    if t.recompute == "full":
        kept = len(per_layer) * tokens_h
        working = max(sum(x.values()) for x in per_layer) * (1 + BACKWARD_WORKSPACE)
        how = f"full recompute: {len(per_layer)} layer inputs + one layer recomputed"
    elif t.recompute == "selective":
        kept = sum(x["attention"] for x in per_layer) + len(per_layer) * tokens_h
        working = max(x["mlp"] for x in per_layer) * (1 + BACKWARD_WORKSPACE)
        how = f"selective recompute of the MoE block: {len(per_layer)} attention blocks kept"
    else:
        kept = sum(sum(x.values()) for x in per_layer)
        working = max(sum(x.values()) for x in per_layer) * BACKWARD_WORKSPACE
        how = f"no recompute: {len(per_layer)} layers kept"
    masks = 2 * mbs * seq * seq  # [2, b, 1, s, s] bool, built once per micro batch
    activations = kept + masks + 2 * tokens_h  # + embeddings, final norm output
    vocab_local = hf.vocab_size // tp
    chunk = min(loss_chunk_tokens(vocab_local, LOSS_CHUNK_BYTES), mbs * seq)
    loss_peak = chunk * vocab_local * (4 + 4 * a) + mbs * seq * 12 + tokens_h
    lines.append(MemoryLine("activations", activations + working,
                            f"{how} (+{working / GIB:.2f} GiB backward working set), micro batch {mbs} x {seq}"))
    lines.append(MemoryLine("loss peak", loss_peak,
                            f"chunked soft-capped CE: {chunk} tokens x {vocab_local} vocab x {4 + 4 * a} B"))
    # The optimizer step: activations are gone; bf16 main grads are copied to fp32 for the shard; torch's
    # multi-tensor AdamW allocates one fp32 temporary per state element.
    step = shard * (4 if grad_bytes == 2 else 0) + (0 if fused_adam or o.optimizer != "adam" else shard * 4)
    lines.append(MemoryLine("optimizer step", step,
                            f"fp32 copy of bf16 grads of the shard: {grad_bytes == 2}; "
                            f"{'fused Adam' if fused_adam else 'torch AdamW multi-tensor temporaries'}"))
    lines.append(MemoryLine("runtime reserve", RUNTIME_RESERVE_GIB * GIB, "CUDA context, NCCL, workspaces"))
    static = sum(line.bytes for line in lines[:3])
    train_peak = activations + max(working, loss_peak)
    peak = static + RUNTIME_RESERVE_GIB * GIB + max(train_peak, step)
    header = [
        f"memory plan: {cfg.name}, {world_size} GPUs: TP {tp} x PP {pp} (DP {dp}); EP {ep} x ETP {etp} "
        f"(expert DP {expert_dp}); {t.precision}, recompute {t.recompute}, distributed optimizer "
        f"{o.use_distributed_optimizer}, main grads {o.main_grads_dtype}",
        f"parameters: {counts.total / 1e9:.3f}B ({counts.experts / 1e9:.3f}B routed experts, "
        f"{counts.vision_tower / 1e6:.1f}M vision tower), {counts.lora / 1e6:.2f}M adapters; per GPU "
        f"{(dense_local + expert_local) / 1e9:.3f}B, trainable {(trainable_dense + trainable_expert) / 1e9:.3f}B",
        f"peak = weights + grads + optimizer state + reserve + the larger of the training pass (activations kept "
        f"+ the larger of one layer's backward and the loss peak: {train_peak / GIB:.2f} GiB) and the optimizer "
        f"step ({step / GIB:.2f} GiB)",
    ]
    device = t.device_memory_gib * GIB if t.device_memory_gib is not None else None
    return MemoryPlan(header=header, lines=lines, peak_bytes=peak, device_bytes=device)


def fused_adam_available() -> bool:
    """Whether Megatron-Core's optimizer will be a fused Adam (Transformer Engine's or Apex's)."""
    from gemma4vl.runtime.te_shim import transformer_engine_installed

    if transformer_engine_installed():
        return True
    try:
        import apex.optimizers  # noqa: F401
    except ImportError:
        return False
    return True


SHAPES_DIR = Path(__file__).resolve().parent / "shapes"
"""Architecture-only config.json files of released checkpoints (no weights), by hub id with ``/`` as ``--``:
planning a layout needs no download. Reconstructed from the published shape (hidden 2816, 30 layers with 5 full,
128 experts top-8, vocab 262,144, 27-layer vision tower; see docs/performance.md), not copied from the hub; a
local checkpoint's own config.json always takes precedence."""


def architecture_dir(hf_path: str):
    """The directory whose config.json describes ``hf_path``: the checkpoint itself when it is a local directory
    with a config.json, else the bundled shape of a known hub id."""

    local = Path(hf_path)
    if (local / "config.json").is_file():
        return local
    bundled = SHAPES_DIR / hf_path.replace("/", "--")
    if (bundled / "config.json").is_file():
        return bundled
    known = sorted(p.name.replace("--", "/") for p in SHAPES_DIR.iterdir() if (p / "config.json").is_file())
    raise FileNotFoundError(f"model.hf_path={hf_path!r}: no config.json there, and not a hub id with a bundled "
                            f"shape ({', '.join(known)})")
