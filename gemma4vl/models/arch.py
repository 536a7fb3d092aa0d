"""Gemma 4 architecture description: everything our Megatron-Core model needs beyond a standard
``TransformerConfig``.

The bridge (:mod:`gemma4vl.bridge`) fills it from a Hugging Face config; the model only reads it. It holds no
Hugging Face names or layouts: those belong to the bridge.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

SLIDING = "sliding_attention"
FULL = "full_attention"
LAYER_TYPES = (SLIDING, FULL)


@dataclass
class RopeSpec:
    """Rotary embedding of one attention layer type."""

    theta: float
    """Base wavelength (``rope_theta``)."""

    rotary_fraction: float = 1.0
    """Fraction of the head dimension that rotates. Gemma 4's "proportional" RoPE keeps the full head and gives
    the non-rotating pairs zero frequency: pair ``i`` has frequency ``theta**(-2i/head_dim)`` for
    ``i < int(rotary_fraction * head_dim // 2)`` and 0 otherwise. ``1.0`` is plain RoPE."""

    def inv_freq(self, head_dim: int):
        import torch

        rotating = int(self.rotary_fraction * head_dim // 2)
        exponents = torch.arange(0, 2 * rotating, 2, dtype=torch.int64).to(torch.float32) / head_dim
        rotated = 1.0 / (self.theta**exponents)
        return torch.cat([rotated, torch.zeros(head_dim // 2 - rotating, dtype=torch.float32)])


@dataclass
class AttentionSpec:
    """Shape of one attention layer type (sliding and full layers differ)."""

    head_dim: int
    """Per-head dimension (``kv_channels``)."""

    num_kv_heads: int
    """Number of key/value heads (query groups)."""

    k_eq_v: bool
    """True when the layer has no value projection: values are the raw key projection (before ``k_norm``)."""

    rope: RopeSpec
    """Rotary embedding of this layer type."""

    window: int | None
    """Sliding-window size (a query sees keys at distance ``< window``), or None for full attention."""


@dataclass
class Gemma4Arch:
    """Gemma 4 specifics of the language model and its vision front end."""

    layer_types: tuple[str, ...]
    """Attention type of every decoder layer, ``"sliding_attention"`` or ``"full_attention"``, in order."""

    sliding: AttentionSpec
    """Attention shape of sliding-window layers."""

    full: AttentionSpec
    """Attention shape of full (global) attention layers."""

    final_logit_softcapping: float | None
    """Logits become ``cap * tanh(logits / cap)``; None disables it."""

    enable_moe_block: bool
    """True: every layer has routed experts plus the dense MLP (run as the MoE layer's shared expert).
    False: a dense MLP only."""

    bidirectional_image_attention: bool
    """True (Gemma 4 ``use_bidirectional_attention="vision"``): tokens of one image attend to each other in both
    directions, on sliding layers only and within the window; full layers stay causal."""

    image_token_id: int | None
    """Token id of image soft-token placeholders, replaced by vision features; None for a text-only model."""

    pad_token_id: int
    """Token id embedded in place of image placeholders before the image features are scattered in."""

    vision_config: Any = field(default=None, compare=False, hash=False)
    """The vision tower's Hugging Face ``Gemma4VisionConfig`` (the tower is Hugging Face's own module), or None."""

    def __post_init__(self):
        unknown = sorted(set(self.layer_types) - set(LAYER_TYPES))
        if unknown:
            raise ValueError(f"layer_types has unknown entries {unknown}; expected only {list(LAYER_TYPES)}")
        if self.sliding.window is None or self.sliding.window < 1:
            raise ValueError(f"sliding layers need a positive window, got {self.sliding.window}")
        if self.full.window is not None:
            raise ValueError(f"full-attention layers have no window, got {self.full.window}")

    def attention(self, layer_type: str) -> AttentionSpec:
        """The attention shape of ``layer_type``."""
        return self.sliding if layer_type == SLIDING else self.full

    def layer_type(self, layer_number: int) -> str:
        """Type of the 1-based global ``layer_number`` (Megatron-Core's numbering)."""
        return self.layer_types[layer_number - 1]
