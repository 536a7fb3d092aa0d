"""The Gemma 4 decoder layer and the decoder block spec.

    h   = x + post_attn_norm(attention(input_norm(x)))
    y   = (h + post_mlp_norm(mlp(pre_mlp_norm(h)))) * layer_scalar

``mlp`` is :class:`~gemma4vl.models.moe.Gemma4MoELayer` (routed experts + the dense MLP as shared expert, each
with its own post-norm) on MoE models, or a plain gated MLP otherwise. ``layer_scalar`` is a per-layer constant
(a buffer, as in the reference).
"""

from __future__ import annotations

import torch
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules
from megatron.core.transformer.identity_op import IdentityFuncOp
from megatron.core.utils import make_viewless_tensor
from functools import partial

from gemma4vl.models.arch import Gemma4Arch
from gemma4vl.models.attention import Gemma4AttentionSubmodules, Gemma4SelfAttention
from gemma4vl.models.attention_kernels import FLEX, FlexBlockMasks
from gemma4vl.models.masks import FULL_INDEX, SLIDING_INDEX
from gemma4vl.models.arch import SLIDING
from gemma4vl.models.moe import gemma4_moe_builder
from gemma4vl.models.norms import Gemma4RMSNorm


SELECTIVE_RECOMPUTE = {"moe", "shared_experts"}
"""Megatron-Core ``recompute_modules`` that work with this layer (both are implemented by ``MoELayer``)."""


class Gemma4TransformerLayer(TransformerLayer):
    """One Gemma 4 decoder layer. Megatron-Core builds ``input_layernorm``, ``self_attention``,
    ``pre_mlp_layernorm`` and ``mlp`` from the spec; this class adds the two post-norms and ``layer_scalar``."""

    def __init__(self, config: TransformerConfig, submodules: TransformerLayerSubmodules, layer_number: int = 1,
                 arch: Gemma4Arch | None = None, **kwargs):
        if arch is None:
            raise ValueError("Gemma4TransformerLayer needs the Gemma4Arch (pass it through the layer spec params)")
        selective = set(config.recompute_modules or []) if config.recompute_granularity == "selective" else set()
        unsupported = {
            # Megatron-Core's MoE layer recomputes itself ("moe", "shared_experts"); the other selective
            # modules live in TransformerLayer / Attention code paths this layer replaces.
            f"selective recompute of {sorted(selective - SELECTIVE_RECOMPUTE)}": bool(selective - SELECTIVE_RECOMPUTE),
            "fp32_residual_connection": config.fp32_residual_connection,
            "hidden_dropout > 0": config.hidden_dropout > 0,
        }
        bad = [k for k, v in unsupported.items() if v]
        if bad:
            raise ValueError(f"Gemma 4 decoder layers do not support {', '.join(bad)}")
        super().__init__(config=config, submodules=submodules, layer_number=layer_number, **kwargs)
        self.arch = arch
        self.layer_type = arch.layer_type(self.layer_number)
        eps = config.layernorm_epsilon
        self.post_self_attn_layernorm = Gemma4RMSNorm(config, config.hidden_size, eps)
        self.post_mlp_layernorm = Gemma4RMSNorm(config, config.hidden_size, eps)
        self.register_buffer("layer_scalar", torch.ones(1, dtype=config.params_dtype))

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                rotary_pos_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
                packed_seq_params: FlexBlockMasks | None = None, **unused):
        """``attention_mask``: [2, b, 1, s, s] (sliding, full) from :func:`gemma4vl.models.masks.build_attention_masks`
        (dense-kernel layers); ``packed_seq_params``: the micro batch's
        :class:`~gemma4vl.models.attention_kernels.FlexBlockMasks` (flex-kernel layers; see that module for why they
        travel in this slot); ``rotary_pos_emb``: (sliding angles, full angles) from
        :func:`gemma4vl.models.masks.rotary_angles`."""
        index = SLIDING_INDEX if self.layer_type == SLIDING else FULL_INDEX
        if self.self_attention.kernel == FLEX:
            if not isinstance(packed_seq_params, FlexBlockMasks):
                raise ValueError(f"layer {self.layer_number} ({self.layer_type}) runs FlexAttention and needs the "
                                 f"micro batch's FlexBlockMasks, got {type(packed_seq_params).__name__}")
            mask = packed_seq_params.for_layer_type(self.layer_type)
        else:
            if attention_mask is None:
                raise ValueError(f"layer {self.layer_number} ({self.layer_type}) runs the dense attention kernel "
                                 "and needs the [2, b, 1, s, s] attention masks, got None")
            mask = attention_mask[index]
        residual = hidden_states
        attn_out, attn_bias = self.self_attention(
            self.input_layernorm(hidden_states), mask, rotary_pos_emb[index]
        )
        if attn_bias is not None:
            attn_out = attn_out + attn_bias
        hidden_states = residual + self.post_self_attn_layernorm(attn_out)

        residual = hidden_states
        mlp_out, mlp_bias = self.mlp(self.pre_mlp_layernorm(hidden_states))
        if mlp_bias is not None:
            mlp_out = mlp_out + mlp_bias
        hidden_states = (residual + self.post_mlp_layernorm(mlp_out)) * self.layer_scalar
        output = make_viewless_tensor(inp=hidden_states, requires_grad=hidden_states.requires_grad, keep_graph=True)
        return output, None


def gemma4_layer_spec(arch: Gemma4Arch, num_experts: int | None, attention_kernel: str = "dense") -> ModuleSpec:
    """The layer spec shared by every Gemma 4 decoder layer (the layer number selects sliding or full);
    ``attention_kernel`` is a ``trainer.attention_kernel`` value (:mod:`gemma4vl.models.attention_kernels`)."""
    if arch.enable_moe_block:
        if not num_experts:
            raise ValueError("enable_moe_block needs num_moe_experts")
        mlp = gemma4_moe_builder(num_experts)
    else:
        mlp = partial(MLP.as_mlp_submodule,
                      submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear))
    attention = ModuleSpec(
        module=Gemma4SelfAttention,
        params={"arch": arch, "attention_kernel": attention_kernel},
        submodules=Gemma4AttentionSubmodules(
            linear_qkv=ColumnParallelLinear,
            linear_proj=RowParallelLinear,
            q_layernorm=Gemma4RMSNorm,
            k_layernorm=Gemma4RMSNorm,
        ),
    )
    return ModuleSpec(
        module=Gemma4TransformerLayer,
        params={"arch": arch},
        submodules=TransformerLayerSubmodules(
            input_layernorm=Gemma4RMSNorm,
            self_attention=attention,
            self_attn_bda=IdentityFuncOp,
            pre_mlp_layernorm=Gemma4RMSNorm,
            mlp=mlp,
            mlp_bda=IdentityFuncOp,
        ),
    )


def gemma4_block_spec(arch: Gemma4Arch, num_experts: int | None, num_local_layers: int,
                      attention_kernel: str = "dense") -> TransformerBlockSubmodules:
    """Decoder block spec for the ``num_local_layers`` layers of this pipeline stage, with the final norm."""
    spec = gemma4_layer_spec(arch, num_experts, attention_kernel)
    return TransformerBlockSubmodules(layer_specs=[spec] * num_local_layers, layer_norm=Gemma4RMSNorm)
