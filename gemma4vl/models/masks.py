"""Attention masks and rotary angles of a (possibly packed) Gemma 4 batch.

A batch row may hold several samples back to back ("packing"). The model is told where they are by
``segment_ids`` [b, s]: the sample number of each token, counting from 1, and 0 for padding. Positions
(``position_ids``) restart at 0 in every sample.

The masks reproduce the reference (transformers >= 5.13, as Google's reference and vLLM) per layer type:

- full attention:    same sample AND key <= query (causal);
- sliding attention: same sample AND key > query - window AND (key <= query OR query and key are tokens of
  the same image), where an image is a maximal run of image tokens (``mm_token_type_ids`` 1 or 2) inside one
  sample. Bidirectional image attention therefore stays inside the window, and full layers are causal only.

Padding keys are never seen by real tokens. Every token, padding included, sees itself, so no softmax row is
empty (a padding query's output is never used).

The same rules exist twice, on purpose: :func:`build_attention_masks` materialises them as dense [s, s] masks
(the reference, used by the ``dense`` attention kernel), :func:`attention_mask_mods` states them per (query, key)
pair as FlexAttention ``mask_mod`` predicates, from which :mod:`gemma4vl.models.attention_kernels` builds block
masks. Tests compare the two element for element.
"""

from __future__ import annotations

import torch

from gemma4vl.models.arch import Gemma4Arch

SLIDING_INDEX, FULL_INDEX = 0, 1


def image_block_ids(mm_token_type_ids: torch.Tensor, segment_ids: torch.Tensor) -> torch.Tensor:
    """[b, s] id of the image each token belongs to (unique within a row), -1 for non-image tokens."""
    is_image = (mm_token_type_ids == 1) | (mm_token_type_ids == 2)
    prev_is_image = torch.zeros_like(is_image)
    prev_is_image[:, 1:] = is_image[:, :-1]
    prev_segment = torch.full_like(segment_ids, -1)
    prev_segment[:, 1:] = segment_ids[:, :-1]
    starts = is_image & (~prev_is_image | (segment_ids != prev_segment))
    ids = torch.cumsum(starts.to(torch.int64), dim=1) - 1
    return torch.where(is_image, ids, torch.full_like(ids, -1))


def build_attention_masks(
    arch: Gemma4Arch, segment_ids: torch.Tensor, mm_token_type_ids: torch.Tensor | None
) -> torch.Tensor:
    """Masks of both layer types, stacked: [2, b, 1, s, s] bool, True = masked out.

    Index 0 (:data:`SLIDING_INDEX`) is for sliding layers, 1 (:data:`FULL_INDEX`) for full layers."""
    b, s = segment_ids.shape
    device = segment_ids.device
    q = torch.arange(s, device=device).view(1, s, 1)
    kv = torch.arange(s, device=device).view(1, 1, s)
    same_sample = (segment_ids[:, :, None] == segment_ids[:, None, :]) & (segment_ids[:, None, :] > 0)
    causal = kv <= q
    diagonal = q == kv

    full = (same_sample & causal) | diagonal

    window = arch.sliding.window
    see = causal
    if arch.bidirectional_image_attention and mm_token_type_ids is not None:
        blocks = image_block_ids(mm_token_type_ids, segment_ids)
        same_image = (blocks[:, :, None] == blocks[:, None, :]) & (blocks[:, :, None] >= 0)
        see = see | same_image
    sliding = (same_sample & (kv > q - window) & see) | diagonal

    return torch.stack([~sliding, ~full]).unsqueeze(2)


def attention_mask_mods(arch: Gemma4Arch, segment_ids: torch.Tensor, mm_token_type_ids: torch.Tensor | None):
    """The masks of :func:`build_attention_masks` as FlexAttention ``mask_mod`` predicates: (sliding, full).

    Each is ``mod(b, h, q, kv) -> bool`` (True = attend; the head index is unused), written with plain indexing
    and comparisons so that it works on 0-d indices (FlexAttention's vmap and its compiled kernels) and on any
    broadcastable index tensors alike (e.g. ``b`` [B, 1, 1], ``q`` [1, Q, 1], ``kv`` [1, 1, K] give [B, Q, K])."""
    segments = segment_ids
    window = arch.sliding.window
    images = None
    if arch.bidirectional_image_attention and mm_token_type_ids is not None:
        images = image_block_ids(mm_token_type_ids, segment_ids)

    def same_sample(b, q, kv):
        kv_segment = segments[b, kv]
        return (segments[b, q] == kv_segment) & (kv_segment > 0)

    def full(b, h, q, kv):
        return (same_sample(b, q, kv) & (kv <= q)) | (q == kv)

    def sliding(b, h, q, kv):
        see = kv <= q
        if images is not None:
            q_image = images[b, q]
            see = see | ((q_image == images[b, kv]) & (q_image >= 0))
        return (same_sample(b, q, kv) & (kv > q - window) & see) | (q == kv)

    return sliding, full


def rotary_angles(arch: Gemma4Arch, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE angles of both layer types for ``position_ids`` [b, s]: (sliding, full), each [s, b, 1, head_dim]
    float32, laid out as ``cat(freqs, freqs)`` like the reference (rotate-half pairing)."""
    out = []
    for spec in (arch.sliding, arch.full):
        inv_freq = spec.rope.inv_freq(spec.head_dim).to(position_ids.device)
        freqs = position_ids.to(torch.float32)[..., None] * inv_freq  # [b, s, d/2]
        angles = torch.cat((freqs, freqs), dim=-1)
        out.append(angles.transpose(0, 1).unsqueeze(2).contiguous())
    return out[0], out[1]
