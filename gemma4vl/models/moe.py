"""Gemma 4's MoE block on Megatron-Core's ``MoELayer``.

Reference, per token ``x`` (the residual stream):

    shared = post_norm_1( mlp(pre_norm_1(x)) )                     the dense "shared" MLP
    routed = post_norm_2( sum_k w_k * expert_k(pre_norm_2(x)) )    top-k of softmax(proj(rms(x) * scale / sqrt(H)))
    out    = post_norm( shared + routed )                          (post_norm is in the layer)

where the top-k weights are renormalised to sum to 1 and then multiplied by ``per_expert_scale[k]``.

Our layer has ONE pre-MLP norm: its output ``pre_norm_2(x) = rms(x) * w2`` feeds the router, the routed
experts and the shared expert. The bridge folds the difference into the weights on import (per input column
``j``): ``router[:, j] *= scale[j] / sqrt(H) / w2[j]`` and ``shared_fc1[:, j] *= w1[j] / w2[j]``, which is
exact algebra. It keeps the checkpoint's ``scale`` and ``w1`` as *anchors* (the buffers below, unused in the
forward pass) so that export can factor the fused weights back into the checkpoint's own parameters using the
current (trained) ``w2``.
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial

import torch
import torch.nn.functional as F
from megatron.core.models.backends import LocalSpecProvider
from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec_for_backend
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.moe.router import Router
from megatron.core.transformer.transformer_config import TransformerConfig

from gemma4vl.models.experts import Gemma4GroupedExperts
from gemma4vl.models.norms import Gemma4RMSNorm


class Gemma4Router(Router):
    """Softmax top-k router with renormalised top-k weights and a learned per-expert scale.

    Its input is the layer's pre-MLP norm output; ``weight`` [E, H] holds the fused router projection."""

    def __init__(self, config: TransformerConfig, pg_collection: ProcessGroupCollection | None = None,
                 is_mtp_layer: bool = False):
        super().__init__(config=config, pg_collection=pg_collection, is_mtp_layer=is_mtp_layer)
        self.topk = config.moe_router_topk
        self.per_expert_scale = torch.nn.Parameter(torch.ones(self.num_experts, dtype=config.params_dtype))
        setattr(self.per_expert_scale, "sequence_parallel", config.sequence_parallel)
        # Anchor of the router fusion (see module docstring); not used in forward.
        self.register_buffer("scale_anchor", torch.ones(config.hidden_size, dtype=config.params_dtype))

    def routing(self, logits: torch.Tensor):
        probs_all = torch.softmax(logits, dim=-1, dtype=torch.float32)
        top_weights, top_index = torch.topk(probs_all, k=self.topk, dim=-1)
        top_weights = top_weights / top_weights.sum(dim=-1, keepdim=True)
        top_weights = top_weights * self.per_expert_scale[top_index]
        probs = torch.zeros_like(probs_all).scatter(1, top_index, top_weights)
        routing_map = torch.zeros_like(probs_all, dtype=torch.bool).scatter(1, top_index, True)
        return probs, routing_map

    def forward(self, input: torch.Tensor, padding_mask: torch.Tensor | None = None):
        """``input`` [s, b, h] -> (probs [s*b, E] float32, routing_map [s*b, E] bool)."""
        logits = F.linear(input.reshape(-1, input.shape[-1]), self.weight.to(input.dtype))
        return self.routing(logits)


class Gemma4MoELayer(MoELayer):
    """Routed experts + the dense MLP as Megatron-Core's shared expert, each with its own post-norm."""

    def __init__(self, config: TransformerConfig, submodules=None, layer_number: int | None = None,
                 pg_collection: ProcessGroupCollection | None = None, is_mtp_layer: bool = False,
                 name: str | None = None):
        if config.moe_shared_expert_intermediate_size is None:
            raise ValueError("Gemma 4 MoE layers need moe_shared_expert_intermediate_size (the dense MLP width)")
        if config.moe_shared_expert_overlap:
            raise ValueError("Gemma 4 normalises the shared expert output separately: "
                             "moe_shared_expert_overlap must be False")
        super().__init__(config=config, submodules=submodules, layer_number=layer_number,
                         pg_collection=pg_collection, is_mtp_layer=is_mtp_layer, name=name)
        eps = config.layernorm_epsilon
        self.post_routed_experts_layernorm = Gemma4RMSNorm(config, config.hidden_size, eps)
        self.post_shared_experts_layernorm = Gemma4RMSNorm(config, config.hidden_size, eps)
        # Anchor of the shared-expert fusion (see module docstring); not used in forward.
        self.register_buffer("shared_experts_norm_anchor",
                             torch.ones(config.hidden_size, dtype=config.params_dtype))

    def postprocess(self, output: torch.Tensor, shared_expert_output: torch.Tensor | None) -> torch.Tensor:
        output = self.token_dispatcher.combine_postprocess(output)
        routed = self.post_routed_experts_layernorm(output)
        return routed + self.post_shared_experts_layernorm(shared_expert_output)


def gemma4_moe_builder(num_experts: int):
    """MLP builder for ``TransformerLayerSubmodules.mlp``: our router, grouped routed experts
    (:class:`~gemma4vl.models.experts.Gemma4GroupedExperts`) and MoE layer, and a local-spec shared expert."""
    base = get_moe_module_spec_for_backend(LocalSpecProvider(), num_experts=num_experts, moe_grouped_gemm=False)
    submodules = replace(base.keywords["submodules"], router=Gemma4Router, experts=Gemma4GroupedExperts)
    return partial(Gemma4MoELayer, submodules=submodules)
