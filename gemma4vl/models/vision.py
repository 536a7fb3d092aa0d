"""The vision front end: Hugging Face's own Gemma 4 vision tower and our multimodal embedder.

The tower is replicated on every tensor-parallel rank (it is small next to the language model) and lives on the
first pipeline stage. It maps patchified pixels ``[num_images, max_patches, 3*p*p]`` with their patch positions
``[num_images, max_patches, 2]`` ((-1, -1) on padding) to soft tokens ``[total_soft_tokens, vision_hidden]``
(padding stripped). The embedder projects them to the language model's width:
``embedding_projection(rms(x))`` (scaleless RMSNorm, no bias), exactly as the reference.
"""

from __future__ import annotations

import torch

from gemma4vl.models.norms import rms_normalize


def build_vision_tower(vision_config, attn_implementation: str = "sdpa", initialize: bool = True) -> torch.nn.Module:
    """Instantiate transformers' ``Gemma4VisionModel`` from its config. ``initialize=False`` skips the random
    weight init (the weights are about to be loaded); buffers computed at construction are still computed."""
    from transformers.initialization import no_init_weights
    from transformers.models.gemma4.modeling_gemma4 import Gemma4VisionModel

    vision_config = vision_config.__class__.from_dict(vision_config.to_dict())
    vision_config._attn_implementation = attn_implementation
    if initialize:
        return Gemma4VisionModel(vision_config)
    with no_init_weights():
        return Gemma4VisionModel(vision_config)


class Gemma4VisionEmbedder(torch.nn.Module):
    """Projects vision soft tokens into the language model's embedding space."""

    def __init__(self, vision_hidden_size: int, text_hidden_size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.embedding_projection = torch.nn.Linear(vision_hidden_size, text_hidden_size, bias=False)

    def forward(self, soft_tokens: torch.Tensor) -> torch.Tensor:
        return self.embedding_projection(rms_normalize(soft_tokens, self.eps))
