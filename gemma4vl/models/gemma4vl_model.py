"""The Gemma 4 vision-language model on Megatron-Core.

``vision_tower`` and ``embed_vision`` (first pipeline stage only, replicated over tensor-parallel ranks) turn
images into soft tokens; those replace the image placeholder tokens' embeddings; ``language_model`` runs the
Gemma 4 decoder. The model takes tensors only (the data pipeline builds them):

- ``input_ids`` [b, s]; ``position_ids`` [b, s] (restart at 0 in each packed sample);
- ``segment_ids`` [b, s]: sample number per token from 1, 0 on padding (one sample per row: 1s then 0s);
- ``mm_token_type_ids`` [b, s]: 1 on image tokens (drives bidirectional attention within an image);
- ``pixel_values`` [n_images, max_patches, 3*p*p] in [0, 1] and ``image_position_ids`` [n_images, max_patches, 2];
- ``labels`` [b, s] with ``IGNORE_INDEX`` where no loss is wanted.
"""

from __future__ import annotations

import torch
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from gemma4vl.models.arch import Gemma4Arch
from gemma4vl.models.language_model import Gemma4LanguageModel
from gemma4vl.models.attention_kernels import build_dense_masks, build_flex_masks, kernels_per_layer_type
from gemma4vl.models.vision import Gemma4VisionEmbedder, build_vision_tower


class ImageTokenMismatch(ValueError):
    """The number of image placeholder tokens differs from the number of soft tokens the images produce."""


class Gemma4VLModel(MegatronModule):
    """Gemma 4 vision tower + multimodal embedder + Megatron-Core language model."""

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
        vision_attn_implementation: str = "sdpa",
        attention_kernel: str = "dense",
    ):
        super().__init__(config=config)
        self.arch = arch
        # Layer type -> "dense" | "flex": which masks the forward builds (gemma4vl.models.attention_kernels).
        self.attention_kernels = kernels_per_layer_type(attention_kernel)
        self.pre_process = pre_process
        self.post_process = post_process
        self.share_embeddings_and_output_weights = share_embeddings_and_output_weights
        self.language_model = Gemma4LanguageModel(
            config=config,
            arch=arch,
            vocab_size=vocab_size,
            max_sequence_length=max_sequence_length,
            pre_process=pre_process,
            post_process=post_process,
            parallel_output=parallel_output,
            share_embeddings_and_output_weights=share_embeddings_and_output_weights,
            pg_collection=pg_collection,
            vp_stage=vp_stage,
            attention_kernel=attention_kernel,
        )
        self.vision_tower = None
        self.embed_vision = None
        if pre_process and arch.vision_config is not None:
            vision = arch.vision_config
            self.vision_tower = build_vision_tower(
                vision, vision_attn_implementation, initialize=config.perform_initialization
            ).to(config.params_dtype)
            self.embed_vision = Gemma4VisionEmbedder(vision.hidden_size, config.hidden_size, vision.rms_norm_eps).to(
                config.params_dtype
            )

    # Pipeline parallel plumbing: the schedules hand the previous stage's output to the language model.
    def set_input_tensor(self, input_tensor) -> None:
        self.language_model.set_input_tensor(input_tensor)

    def shared_embedding_or_output_weight(self):
        return self.language_model.shared_embedding_or_output_weight()

    def image_features(self, pixel_values: torch.Tensor, image_position_ids: torch.Tensor) -> torch.Tensor:
        """Soft tokens of all images, in the language model's width: [total_soft_tokens, h]."""
        soft_tokens = self.vision_tower(pixel_values=pixel_values, pixel_position_ids=image_position_ids)
        return self.embed_vision(soft_tokens.last_hidden_state)

    def embed(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None,
        image_position_ids: torch.Tensor | None,
    ) -> torch.Tensor:
        """Decoder input [s(/tp), b, h]: scaled text embeddings with image soft tokens in the placeholder slots."""
        image_token_id = self.arch.image_token_id
        is_image = input_ids == image_token_id if image_token_id is not None else torch.zeros_like(input_ids, dtype=torch.bool)
        text_ids = input_ids.masked_fill(is_image, self.arch.pad_token_id)
        embeddings = self.language_model.embed(text_ids)  # [s, b, h]
        num_slots = int(is_image.sum())
        if pixel_values is None:
            if num_slots:
                raise ImageTokenMismatch(f"the batch has {num_slots} image tokens but no pixel_values")
        else:
            if self.vision_tower is None:
                raise ValueError("pixel_values given but this model has no vision tower")
            if image_position_ids is None:
                raise ValueError("pixel_values need image_position_ids ((x, y) per patch, (-1, -1) on padding)")
            features = self.image_features(pixel_values, image_position_ids).to(embeddings.dtype)
            if features.shape[0] != num_slots:
                raise ImageTokenMismatch(
                    f"the batch has {num_slots} image tokens but its {pixel_values.shape[0]} image(s) give "
                    f"{features.shape[0]} soft tokens"
                )
            # Fill the slots in (row, position) order, the order the images come in.
            embeddings = embeddings.transpose(0, 1).masked_scatter(is_image.unsqueeze(-1), features)
            embeddings = embeddings.transpose(0, 1).contiguous()
        return self.language_model.to_sequence_parallel(embeddings)

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        segment_ids: torch.Tensor,
        mm_token_type_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        runtime_gather_output: bool | None = None,
    ) -> torch.Tensor:
        """Per-token loss [b, s] when ``labels`` is given, logits [b, s, V] otherwise (last stage), or hidden
        states for the next pipeline stage."""
        decoder_input = self.embed(input_ids, pixel_values, image_position_ids) if self.pre_process else None
        # Built once per micro batch, shared by every layer of a type.
        dense_masks = build_dense_masks(self.arch, self.attention_kernels, segment_ids, mm_token_type_ids)
        block_masks = build_flex_masks(self.arch, self.attention_kernels, segment_ids, mm_token_type_ids)
        return self.language_model(
            input_ids=None,
            position_ids=position_ids,
            attention_mask=dense_masks,
            block_masks=block_masks,
            decoder_input=decoder_input,
            labels=labels,
            runtime_gather_output=runtime_gather_output,
        )
