"""Megatron-Bridge model provider of the Gemma 4 VL model.

A provider is Megatron-Bridge's model configuration: a ``TransformerConfig`` (here ``GPTModelProvider``) that
also builds the model (``provide``) and, through ``provide_distributed_model``, wraps it for training. The
bridge fills it from the checkpoint's config.json (:func:`provider_from_hf_config`); recipes then override the
parallel layout and precision.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.bridge.models.gpt_provider import GPTModelProvider
from megatron.core.pipeline_parallel.utils import is_pp_first_stage, is_pp_last_stage, is_vp_first_stage, is_vp_last_stage

from gemma4vl.bridge.hf_config import Gemma4HFConfig
from gemma4vl.models import Gemma4Arch, Gemma4VLModel


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """Gemma 4's MLP activation (``gelu_pytorch_tanh``)."""
    return F.gelu(x, approximate="tanh")


@dataclass
class Gemma4VLModelProvider(GPTModelProvider):
    """Builds :class:`~gemma4vl.models.Gemma4VLModel` from a Gemma 4 architecture description."""

    gemma4: Gemma4Arch | None = None
    """Gemma 4 specifics (layer types, per-type attention shapes, vision config); set by the bridge."""

    vision_attn_implementation: str = "sdpa"
    """transformers attention implementation of the vision tower (``"sdpa"`` or ``"eager"``)."""

    attention_kernel: str = "dense"
    """Attention kernel of the decoder layers: ``dense``, ``flex`` or ``flex_sliding`` (see
    :mod:`gemma4vl.models.attention_kernels`; set from ``trainer.attention_kernel``)."""

    def provide(self, pre_process=None, post_process=None, vp_stage=None) -> Gemma4VLModel:
        if self.gemma4 is None:
            raise ValueError("Gemma4VLModelProvider.gemma4 is not set; build the provider with the bridge")
        vp_size = self.virtual_pipeline_model_parallel_size
        pp_group = self._pg_collection.pp
        if pre_process is None:
            pre_process = is_vp_first_stage(vp_stage=vp_stage, vp_size=vp_size) and is_pp_first_stage(pp_group)
        if post_process is None:
            post_process = is_vp_last_stage(vp_stage=vp_stage, vp_size=vp_size) and is_pp_last_stage(pp_group)
        if self.vocab_size % self.tensor_model_parallel_size:
            raise ValueError(
                f"vocab_size {self.vocab_size} is not divisible by tensor_model_parallel_size "
                f"{self.tensor_model_parallel_size} (the vocabulary is split evenly over tensor-parallel ranks)"
            )
        self._vp_stage = vp_stage
        return Gemma4VLModel(
            config=self,
            arch=self.gemma4,
            vocab_size=self.vocab_size,
            max_sequence_length=self.seq_length,
            pre_process=pre_process,
            post_process=post_process,
            parallel_output=self.parallel_output,
            share_embeddings_and_output_weights=self.share_embeddings_and_output_weights,
            pg_collection=self._pg_collection,
            vp_stage=vp_stage,
            vision_attn_implementation=self.vision_attn_implementation,
            attention_kernel=self.attention_kernel,
        )


def provider_from_hf_config(cfg: Gemma4HFConfig, params_dtype: torch.dtype = torch.float32) -> Gemma4VLModelProvider:
    """A provider for the checkpoint described by ``cfg`` (single-device layout; recipes set parallelism)."""
    arch = cfg.arch
    bf16 = params_dtype == torch.bfloat16
    return Gemma4VLModelProvider(
        gemma4=arch,
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        # Megatron-Core's global attention shape is the sliding layers'; full layers override it per layer.
        num_query_groups=arch.sliding.num_kv_heads,
        kv_channels=arch.sliding.head_dim,
        ffn_hidden_size=cfg.intermediate_size,
        vocab_size=cfg.vocab_size,
        should_pad_vocab=False,
        make_vocab_size_divisible_by=1,
        seq_length=cfg.max_position_embeddings,
        share_embeddings_and_output_weights=cfg.tie_word_embeddings,
        normalization="RMSNorm",
        layernorm_epsilon=cfg.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=gelu_tanh,
        add_bias_linear=False,
        add_qkv_bias=False,
        qk_layernorm=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        position_embedding_type="none",
        num_moe_experts=cfg.num_experts,
        moe_router_topk=cfg.top_k_experts,
        moe_ffn_hidden_size=cfg.moe_intermediate_size,
        moe_shared_expert_intermediate_size=cfg.intermediate_size,
        moe_shared_expert_overlap=False,
        moe_router_load_balancing_type="none",
        moe_aux_loss_coeff=0.0,
        moe_grouped_gemm=False,
        moe_token_dispatcher_type="alltoall",
        moe_permute_fusion=False,
        moe_router_fusion=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        cross_entropy_loss_fusion=False,
        # Every weight comes from the checkpoint (the bridge refuses to leave one unloaded), so random
        # initialisation would only cost time (minutes at 26B scale on CPU).
        perform_initialization=False,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=bf16,
        autocast_dtype=params_dtype,
    )
