"""Gemma 4 self-attention on Megatron-Core parallel linear layers.

One module serves both layer types; the layer number picks the type and with it the head dimension, the
number of key/value heads, K=V tying, the RoPE and the window (sliding layers 256/8 heads, full layers 512/2
in 26B-A4B). Per layer:

    q = q_norm(W_q x)            k = k_norm(W_k x)            v = v_norm(W_v x)   (v = v_norm(W_k x) when K=V)
    q, k = rope(q), rope(k)      out = W_o softmax(q k^T * 1.0 + mask) v

``q_norm``/``k_norm`` are RMSNorms with a learned scale over the head dimension; ``v_norm`` has no scale; the
softmax scale is 1.0 (the q/k norms set the temperature).

Parameter names follow Megatron-Core's un-fused attention (``linear_qkv``, ``q_layernorm``, ``k_layernorm``,
``linear_proj``), so a Transformer Engine spec can share the bridge's mapping registry. ``linear_qkv`` holds
Megatron-Core's grouped layout ``[q heads of group g, k_g, v_g]`` per key/value group; on K=V layers the value
rows exist (the bridge fills them with a copy of the key rows) but are not read: values are the raw key rows'
output, exactly as the reference computes them.

The attention itself runs through one of the kernels of :mod:`gemma4vl.models.attention_kernels`, per layer type:
``dense`` (SDPA with an explicit boolean mask from :mod:`gemma4vl.models.masks`; the reference, CPU and GPU) or
``flex`` (FlexAttention with a block mask; GPUs). Both handle both head dimensions.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import build_module
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide, get_pg_size

from gemma4vl.models.arch import FULL, SLIDING, Gemma4Arch
from gemma4vl.models.attention_kernels import (
    FLEX,
    dense_attention_kernel,
    flex_attention_kernel,
    kernels_per_layer_type,
)
from gemma4vl.models.norms import rms_normalize


@dataclass
class Gemma4AttentionSubmodules:
    """Builders of the attention's parallel linears and q/k norms."""

    linear_qkv: type
    """Column-parallel linear producing the grouped q/k/v projections."""

    linear_proj: type
    """Row-parallel output projection."""

    q_layernorm: type
    """Per-head RMSNorm of queries (learned scale)."""

    k_layernorm: type
    """Per-head RMSNorm of keys (learned scale)."""


def layer_config(config: TransformerConfig, arch: Gemma4Arch, layer_type: str) -> TransformerConfig:
    """A shallow copy of ``config`` carrying the head dimension and key/value head count of ``layer_type``.

    The copy is what the layer's parallel linears keep as their ``config``; the bridge's q/k/v mapping reads
    the shapes from it, so sliding and full layers convert with their own sizes."""
    spec = arch.attention(layer_type)
    if config.kv_channels == spec.head_dim and config.num_query_groups == spec.num_kv_heads:
        return config
    per_layer = copy.copy(config)
    per_layer.kv_channels = spec.head_dim
    per_layer.num_query_groups = spec.num_kv_heads
    return per_layer


def apply_rope(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` [s, b, heads, d] by ``angles`` [s, b, 1, d] (rotate-half pairing, as the reference)."""
    cos = angles.cos().to(x.dtype)
    sin = angles.sin().to(x.dtype)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class Gemma4SelfAttention(MegatronModule):
    """Self-attention of one Gemma 4 decoder layer (sliding or full, chosen by ``layer_number``)."""

    def __init__(
        self,
        config: TransformerConfig,
        submodules: Gemma4AttentionSubmodules,
        layer_number: int,
        arch: Gemma4Arch,
        attention_kernel: str = "dense",
        pg_collection: ProcessGroupCollection | None = None,
        cp_comm_type: str | None = None,
        pp_layer_offset: int | None = None,
        name: str | None = None,
    ):
        if config.context_parallel_size != 1:
            raise ValueError(
                f"Gemma 4 attention does not support context parallelism (context_parallel_size="
                f"{config.context_parallel_size}); use 1"
            )
        self.arch = arch
        self.layer_type = arch.layer_type(layer_number)
        self.spec = arch.attention(self.layer_type)
        # "dense" or "flex": this layer's attention kernel (see gemma4vl.models.attention_kernels).
        self.kernel = kernels_per_layer_type(attention_kernel)[self.layer_type]
        if self.kernel == FLEX and config.attention_dropout > 0:
            raise ValueError(f"attention_kernel={attention_kernel!r}: FlexAttention has no attention dropout "
                             f"(attention_dropout={config.attention_dropout}); use the dense kernel or 0")
        config = layer_config(config, arch, self.layer_type)
        super().__init__(config=config)
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp", "cp"])
        self.pg_collection = pg_collection
        self.layer_number = layer_number

        tp = get_pg_size(pg_collection.tp)
        heads, groups, head_dim = config.num_attention_heads, self.spec.num_kv_heads, self.spec.head_dim
        if heads % groups:
            raise ValueError(
                f"{self.layer_type} layer {layer_number}: {heads} query heads are not a multiple of {groups} "
                "key/value heads"
            )
        if groups % tp:
            raise ValueError(
                f"{self.layer_type} layer {layer_number}: tensor parallel size {tp} must divide its {groups} "
                "key/value heads (each rank holds whole key/value groups)"
            )
        self.head_dim = head_dim
        self.heads_per_group = heads // groups
        self.groups_per_partition = divide(groups, tp)
        self.heads_per_partition = divide(heads, tp)

        self.linear_qkv = build_module(
            submodules.linear_qkv,
            config.hidden_size,
            (heads + 2 * groups) * head_dim,
            config=config,
            init_method=config.init_method,
            gather_output=False,
            bias=config.add_qkv_bias,
            skip_bias_add=False,
            is_expert=False,
            tp_comm_buffer_name="qkv",
            tp_group=pg_collection.tp,
        )
        self.q_layernorm = build_module(submodules.q_layernorm, config=config, hidden_size=head_dim,
                                        eps=config.layernorm_epsilon)
        self.k_layernorm = build_module(submodules.k_layernorm, config=config, hidden_size=head_dim,
                                        eps=config.layernorm_epsilon)
        self.linear_proj = build_module(
            submodules.linear_proj,
            heads * head_dim,
            config.hidden_size,
            config=config,
            init_method=config.output_layer_init_method,
            bias=config.add_bias_linear,
            input_is_parallel=True,
            skip_bias_add=True,
            is_expert=False,
            tp_comm_buffer_name="proj",
            tp_group=pg_collection.tp,
        )

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        """Distributed-checkpoint view of the attention weights.

        Megatron-Core stacks a parameter of every decoder layer into one checkpoint tensor along a prepended layer
        axis (``global_shape[0] == num_layers``). Sliding and full layers have different attention shapes, so each
        type gets its own stack: the storage key is suffixed with the type and the layer axis counts the layers of
        that type only (e.g. 25 sliding and 5 full layers in 26B-A4B)."""
        state = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        types = self.arch.layer_types
        total = sum(1 for t in types if t == self.layer_type)
        index = sum(1 for t in types[: self.layer_number - 1] if t == self.layer_type)
        return {name: _restack(item, self.layer_type, index, total, len(types)) for name, item in state.items()}

    def forward(
        self, hidden_states: torch.Tensor, attention_mask, rotary_angles: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``hidden_states`` [s(/tp), b, h]; ``attention_mask``: for the dense kernel [b, 1, s, s] bool, True =
        masked out, for the flex kernel the layer type's ``BlockMask``; ``rotary_angles`` [s, b, 1, head_dim]
        float32. Returns (output [s(/tp), b, h], bias or None)."""
        mixed, _ = self.linear_qkv(hidden_states)
        s, b = mixed.shape[:2]
        mixed = mixed.view(s, b, self.groups_per_partition, (self.heads_per_group + 2) * self.head_dim)
        q, k, v = torch.split(
            mixed, [self.heads_per_group * self.head_dim, self.head_dim, self.head_dim], dim=-1
        )
        q = q.reshape(s, b, self.heads_per_partition, self.head_dim)
        if self.spec.k_eq_v:
            v = k
        eps = self.config.layernorm_epsilon
        q = apply_rope(self.q_layernorm(q), rotary_angles)
        k = apply_rope(self.k_layernorm(k), rotary_angles)
        v = rms_normalize(v, eps)

        # [s, b, n, d] -> [b, n, s, d]; query head i reads key/value group i // heads_per_group.
        q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))
        if self.kernel == FLEX:
            context = flex_attention_kernel(q, k, v, attention_mask)
        else:
            dropout = self.config.attention_dropout if self.training else 0.0
            context = dense_attention_kernel(q, k, v, attention_mask, dropout)
        context = context.permute(2, 0, 1, 3).reshape(s, b, self.heads_per_partition * self.head_dim)
        return self.linear_proj(context)


def _restack(item, layer_type: str, index: int, total: int, num_layers: int):
    """Move one sharded checkpoint item from the all-layers stack to the stack of ``layer_type`` layers."""
    from dataclasses import replace

    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor

    if not isinstance(item, (ShardedTensor, ShardedObject)):
        return item
    key = f"{item.key}@{layer_type}"
    stacked = item.global_shape and item.global_shape[0] == num_layers and (
        not isinstance(item, ShardedTensor) or item.prepend_axis_num > 0)
    if not stacked:
        return replace(item, key=key)
    changes = dict(key=key, global_shape=(total, *item.global_shape[1:]),
                   global_offset=(index, *item.global_offset[1:]))
    if isinstance(item, ShardedTensor) and item.axis_fragmentations is not None:
        changes["axis_fragmentations"] = (total, *item.axis_fragmentations[1:])
    return replace(item, **changes)


__all__ = ["Gemma4SelfAttention", "Gemma4AttentionSubmodules", "apply_rope", "layer_config", "SLIDING", "FULL"]
