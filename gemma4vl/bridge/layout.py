"""The Hugging Face checkpoint layout of Gemma 4 VL and its mapping onto our Megatron model.

One declarative table (:func:`mapping_registry`) pairs every Megatron parameter / buffer with its checkpoint
tensor(s); :func:`expected_hf_shapes` says which tensors, of which shapes, a checkpoint with a given config
must hold. Nothing else in gemma4vl spells HF names.

Megatron side (our model): ``language_model.embedding.word_embeddings``, ``language_model.decoder.layers.N.*``,
``language_model.decoder.final_layernorm``, ``vision_tower.*`` (transformers' own module), ``embed_vision.*``.
"""

from __future__ import annotations

import re

import torch
from megatron.bridge.models.conversion.mapping_registry import MegatronMappingRegistry
from megatron.bridge.models.conversion.param_mapping import AutoMapping

from gemma4vl.bridge.hf_config import Gemma4HFConfig
from gemma4vl.models.experts import FC1_TP_AXIS, FC2_TP_AXIS
from gemma4vl.bridge.mappings import (
    DirectGatedMLPMapping,
    DirectQKVMapping,
    GroupedExpertMapping,
    KEqualsVQKVMapping,
    ReplicatedOnDeviceMapping,
)

HF_LAYER = "model.language_model.layers.{}."
MG_LAYER = "language_model.decoder.layers.{}."
HF_LAYER_RE = re.compile(r"^model\.language_model\.layers\.(\d+)\.(.+)$")
LM_HEAD = "lm_head.weight"

# HF names (relative to a decoder layer) that take part in the MoE fusions (see gemma4vl.bridge.fusion).
ROUTER_PROJ = "router.proj.weight"
ROUTER_SCALE = "router.scale"
SHARED_GATE = "mlp.gate_proj.weight"
SHARED_UP = "mlp.up_proj.weight"
PRE_FFN_NORM = "pre_feedforward_layernorm.weight"      # w1: the dense MLP's input norm (anchor)
PRE_FFN_NORM_2 = "pre_feedforward_layernorm_2.weight"  # w2: our single pre-MLP norm

# Megatron suffix <- HF suffix, for the per-layer tensors copied as they are (replicated over TP ranks).
_REPLICATED_LAYER_TENSORS = {
    "input_layernorm.weight": "input_layernorm.weight",
    "self_attention.q_layernorm.weight": "self_attn.q_norm.weight",
    "self_attention.k_layernorm.weight": "self_attn.k_norm.weight",
    "post_self_attn_layernorm.weight": "post_attention_layernorm.weight",
    "pre_mlp_layernorm.weight": PRE_FFN_NORM_2,
    "mlp.router.weight": ROUTER_PROJ,  # fused on import (maybe_modify_loaded_hf_weight)
    "mlp.router.per_expert_scale": "router.per_expert_scale",
    "mlp.router.scale_anchor": ROUTER_SCALE,
    "mlp.shared_experts_norm_anchor": PRE_FFN_NORM,
    "mlp.post_shared_experts_layernorm.weight": "post_feedforward_layernorm_1.weight",
    "mlp.post_routed_experts_layernorm.weight": "post_feedforward_layernorm_2.weight",
    "post_mlp_layernorm.weight": "post_feedforward_layernorm.weight",
    "layer_scalar": "layer_scalar",
}


def mapping_registry(cfg: Gemma4HFConfig) -> MegatronMappingRegistry:
    """Every Megatron parameter/buffer of the model <-> its checkpoint tensor(s)."""
    mg, hf = MG_LAYER.format("*"), HF_LAYER.format("*")
    mappings = [
        AutoMapping("language_model.embedding.word_embeddings.weight", "model.language_model.embed_tokens.weight"),
        ReplicatedOnDeviceMapping("language_model.decoder.final_layernorm.weight", "model.language_model.norm.weight"),
        ReplicatedOnDeviceMapping("vision_tower.**", "model.vision_tower.**"),
        ReplicatedOnDeviceMapping("embed_vision.embedding_projection.weight",
                                  "model.embed_vision.embedding_projection.weight"),
        AutoMapping(mg + "self_attention.linear_proj.weight", hf + "self_attn.o_proj.weight"),
        DirectGatedMLPMapping(mg + "mlp.shared_experts.linear_fc1.weight", gate=hf + SHARED_GATE, up=hf + SHARED_UP),
        AutoMapping(mg + "mlp.shared_experts.linear_fc2.weight", hf + "mlp.down_proj.weight"),
        GroupedExpertMapping(mg + "mlp.experts.fc1_weight", hf + "experts.gate_up_proj", tp_axis=FC1_TP_AXIS,
                             split_pairs=True),
        GroupedExpertMapping(mg + "mlp.experts.fc2_weight", hf + "experts.down_proj", tp_axis=FC2_TP_AXIS,
                             split_pairs=False),
    ]
    mappings += [ReplicatedOnDeviceMapping(mg + ours, hf + theirs) for ours, theirs in _REPLICATED_LAYER_TENSORS.items()]
    if not cfg.tie_word_embeddings:
        mappings.append(AutoMapping("language_model.output_layer.weight", LM_HEAD))
    # q/k/v per layer: K=V layers have no v_proj (sliding and full layers differ, so no wildcard here).
    for i, layer_type in enumerate(cfg.arch.layer_types):
        qkv, attn = MG_LAYER.format(i) + "self_attention.linear_qkv.weight", HF_LAYER.format(i) + "self_attn."
        if cfg.arch.attention(layer_type).k_eq_v:
            mappings.append(KEqualsVQKVMapping(qkv, q=attn + "q_proj.weight", k=attn + "k_proj.weight"))
        else:
            mappings.append(DirectQKVMapping(qkv, q=attn + "q_proj.weight", k=attn + "k_proj.weight",
                                             v=attn + "v_proj.weight"))
    return MegatronMappingRegistry(*mappings)


def expected_hf_shapes(cfg: Gemma4HFConfig) -> tuple[dict[str, tuple[int, ...]], set[str]]:
    """(required tensor -> shape, optional tensor names) of a checkpoint with config ``cfg``."""
    H, V, nh, I = cfg.hidden_size, cfg.vocab_size, cfg.num_attention_heads, cfg.intermediate_size
    E, Im = cfg.num_experts, cfg.moe_intermediate_size
    shapes: dict[str, tuple[int, ...]] = {
        "model.language_model.embed_tokens.weight": (V, H),
        "model.language_model.norm.weight": (H,),
    }
    for i, layer_type in enumerate(cfg.arch.layer_types):
        spec, p = cfg.arch.attention(layer_type), HF_LAYER.format(i)
        hd, kv = spec.head_dim, spec.num_kv_heads
        shapes.update({
            p + "self_attn.q_proj.weight": (nh * hd, H),
            p + "self_attn.k_proj.weight": (kv * hd, H),
            p + "self_attn.q_norm.weight": (hd,),
            p + "self_attn.k_norm.weight": (hd,),
            p + "self_attn.o_proj.weight": (H, nh * hd),
            p + SHARED_GATE: (I, H),
            p + SHARED_UP: (I, H),
            p + "mlp.down_proj.weight": (H, I),
            p + ROUTER_PROJ: (E, H),
            p + ROUTER_SCALE: (H,),
            p + "router.per_expert_scale": (E,),
            p + "experts.gate_up_proj": (E, 2 * Im, H),
            p + "experts.down_proj": (E, H, Im),
            p + "layer_scalar": (1,),
        })
        if not spec.k_eq_v:
            shapes[p + "self_attn.v_proj.weight"] = (kv * hd, H)
        for norm in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                     "post_feedforward_layernorm", "post_feedforward_layernorm_1", "post_feedforward_layernorm_2",
                     "pre_feedforward_layernorm_2"):
            shapes[p + norm + ".weight"] = (H,)
    vision = cfg.arch.vision_config
    shapes["model.embed_vision.embedding_projection.weight"] = (H, vision.hidden_size)
    for name, shape in _vision_tower_shapes(vision).items():
        shapes["model.vision_tower." + name] = shape
    optional = {LM_HEAD} if cfg.tie_word_embeddings else set()
    if not cfg.tie_word_embeddings:
        shapes[LM_HEAD] = (V, H)
    return shapes, optional


def _vision_tower_shapes(vision_config) -> dict[str, tuple[int, ...]]:
    from gemma4vl.models.vision import build_vision_tower

    with torch.device("meta"):
        tower = build_vision_tower(vision_config)
    return {k: tuple(v.shape) for k, v in tower.state_dict().items()}


def layer_and_name(hf_name: str) -> tuple[int, str] | None:
    """(layer index, name within the layer) of a decoder-layer HF tensor name, else None."""
    m = HF_LAYER_RE.match(hf_name)
    return (int(m.group(1)), m.group(2)) if m else None
