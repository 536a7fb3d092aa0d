"""Gemma 4's language model on Megatron-Core's ``GPTModel`` machinery.

``GPTModel`` provides the vocab-parallel embedding, the decoder ``TransformerBlock``, the output layer, tied
embeddings across pipeline stages and distributed checkpointing. Gemma 4 adds: embeddings scaled by
``sqrt(hidden)`` (rounded to the weight dtype, as the reference), two kinds of attention layers with their own
masks and RoPE (computed once per forward and handed to every layer), and final logit soft-capping.
"""

from __future__ import annotations

import torch
from megatron.core import tensor_parallel
from megatron.core.models.gpt import GPTModel
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.enums import ModelType
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset
from megatron.core.transformer.transformer_block import get_num_layers_to_build
from megatron.core.utils import get_pg_rank

from gemma4vl.models.arch import Gemma4Arch
from gemma4vl.models.attention_kernels import FlexBlockMasks
from gemma4vl.models.layer import gemma4_block_spec
from gemma4vl.labels import IGNORE_INDEX
from gemma4vl.models.loss import softcapped_cross_entropy


class Gemma4LanguageModel(GPTModel):
    """Decoder-only Gemma 4 text model (the language half of :class:`~gemma4vl.models.Gemma4VLModel`)."""

    def __init__(
        self,
        config: TransformerConfig,
        arch: Gemma4Arch,
        vocab_size: int,
        max_sequence_length: int,
        pre_process: bool = True,
        post_process: bool = True,
        parallel_output: bool = True,
        share_embeddings_and_output_weights: bool = True,
        pg_collection: ProcessGroupCollection | None = None,
        vp_stage: int | None = None,
        attention_kernel: str = "dense",
    ):
        if len(arch.layer_types) != config.num_layers:
            raise ValueError(
                f"arch.layer_types has {len(arch.layer_types)} entries but num_layers is {config.num_layers}"
            )
        pp_rank = get_pg_rank(pg_collection.pp) if pg_collection is not None else None
        num_local_layers = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
        super().__init__(
            config=config,
            transformer_layer_spec=gemma4_block_spec(arch, config.num_moe_experts, num_local_layers,
                                                     attention_kernel),
            vocab_size=vocab_size,
            max_sequence_length=max_sequence_length,
            pre_process=pre_process,
            post_process=post_process,
            parallel_output=parallel_output,
            share_embeddings_and_output_weights=share_embeddings_and_output_weights,
            position_embedding_type="none",
            scatter_embedding_sequence_parallel=False,
            pg_collection=pg_collection,
            vp_stage=vp_stage,
        )
        self.arch = arch

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Scaled token embeddings, [b, s] -> [s, b, h] on the full sequence (not yet sequence-parallel)."""
        embeddings = self.embedding.word_embeddings(input_ids).transpose(0, 1).contiguous()
        scale = torch.tensor(self.config.hidden_size**0.5, dtype=embeddings.dtype, device=embeddings.device)
        return embeddings * scale

    def to_sequence_parallel(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Split [s, b, h] embeddings over tensor-parallel ranks along the sequence when sequence parallel."""
        if self.config.sequence_parallel:
            return tensor_parallel.scatter_to_sequence_parallel_region(embeddings, group=self.pg_collection.tp)
        return embeddings

    def forward(
        self,
        input_ids: torch.Tensor | None,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        decoder_input: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        runtime_gather_output: bool | None = None,
        block_masks: FlexBlockMasks | None = None,
        **unused,
    ) -> torch.Tensor:
        """Run the decoder.

        Args:
            input_ids: [b, s] token ids (first stage, when ``decoder_input`` is None).
            position_ids: [b, s] RoPE positions (restarting per packed sample).
            attention_mask: [2, b, 1, s, s] bool masks (sliding, full), True = masked out, for the layers that
                run the dense attention kernel (None if none does).
            block_masks: FlexAttention block masks for the layers that run the flex kernel (None if none does).
            decoder_input: [s(/tp), b, h] ready embeddings (first stage), e.g. with image features scattered in.
            labels: [b, s] targets, ``IGNORE_INDEX`` where no loss is wanted.
            runtime_gather_output: gather vocab-parallel logits over tensor-parallel ranks.

        Returns:
            Last stage: per-token loss [b, s] (0 where ignored) when ``labels`` is given, else logits [b, s, V].
            Other stages: hidden states [s(/tp), b, h].
        """
        from gemma4vl.models.masks import rotary_angles

        if self.pre_process and decoder_input is None:
            decoder_input = self.to_sequence_parallel(self.embed(input_ids))
        hidden_states = self.decoder(
            hidden_states=decoder_input,
            attention_mask=attention_mask,
            rotary_pos_emb=rotary_angles(self.arch, position_ids),
            # Block masks are not tensors: they cannot go through the recompute's save_for_backward with
            # attention_mask (see gemma4vl.models.attention_kernels).
            packed_seq_params=block_masks,
        )
        if not self.post_process:
            return hidden_states
        output_weight = self.shared_embedding_or_output_weight() if self.share_embeddings_and_output_weights else None
        cap = self.arch.final_logit_softcapping
        if labels is not None:
            # Projection, soft-cap and cross-entropy a chunk of tokens at a time (gemma4vl.models.loss).
            ignored = labels == IGNORE_INDEX
            weight = output_weight if output_weight is not None else self.output_layer.weight
            loss = softcapped_cross_entropy(hidden_states, weight, labels.masked_fill(ignored, 0), cap,
                                            tp_group=self.pg_collection.tp,
                                            sequence_parallel=self.config.sequence_parallel)
            return loss.masked_fill(ignored, 0.0)
        logits, _ = self.output_layer(hidden_states, weight=output_weight, runtime_gather_output=runtime_gather_output)
        if cap is not None:
            logits = cap * torch.tanh(logits / cap)
        return logits.transpose(0, 1).contiguous()
