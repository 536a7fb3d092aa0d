"""The attention kernels of the Gemma 4 decoder, chosen per run by ``trainer.attention_kernel``.

- ``dense`` (the reference; the only choice on CPU): ``scaled_dot_product_attention`` with the explicit [b, 1, s, s]
  boolean masks of :func:`gemma4vl.models.masks.build_attention_masks`, key/value heads repeated to every query
  head. Any mask rules out SDPA's flash kernels, so on a GPU every layer does the whole s x s work.
- ``flex``: FlexAttention (``torch.nn.attention.flex_attention``) on every layer, with block masks built from the
  same rules (:func:`gemma4vl.models.masks.attention_mask_mods`): blocks outside the sample, the window or the
  causal order are skipped, blocks entirely inside are computed without evaluating the mask. Grouped-query
  attention through ``enable_gqa`` (no repeated key/value heads). On CUDA the kernel is ``torch.compile``'d, once
  per head dimension (one shape family per layer type: 26B-A4B's sliding layers are head_dim 256 with 8 KV heads,
  its full layers 512 with 2). On CPU FlexAttention runs its eager reference (forward only: torch 2.13 has no
  CPU backward), which is what the CPU tests use to check it against ``dense``.
- ``flex_sliding``: ``flex`` on sliding-window layers, ``dense`` on full-attention layers (for a device where the
  head_dim-512 flex kernel loses to SDPA; ``bench/gpu_step.py`` measures both per layer type).

The masks are built once per micro batch, in the model's forward, and shared by every layer of a type: dense
masks as the decoder's ``attention_mask`` tensor, block masks as a :class:`FlexBlockMasks` in the decoder's
``packed_seq_params`` slot. That slot is deliberate: Megatron-Core's full recompute hands ``attention_mask`` to
``save_for_backward``, which takes tensors only, while ``packed_seq_params`` reaches every layer by reference (in
the forward and in the recomputation alike).

The softmax scale is 1.0 on both kernels (Gemma 4's q/k norms set the temperature) and Gemma 4 has no attention
logit soft-capping (only the final logits are capped), so neither kernel needs a ``score_mod``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from gemma4vl.models.arch import FULL, SLIDING, Gemma4Arch
from gemma4vl.models.masks import attention_mask_mods, build_attention_masks

DENSE, FLEX = "dense", "flex"

ATTENTION_KERNELS: dict[str, dict[str, str]] = {
    "dense": {SLIDING: DENSE, FULL: DENSE},
    "flex": {SLIDING: FLEX, FULL: FLEX},
    "flex_sliding": {SLIDING: FLEX, FULL: DENSE},
}
"""``trainer.attention_kernel`` value -> the kernel of each layer type."""

FLEX_BLOCK_SIZE = 128
"""Side of the block mask's tiles (query and key/value), FlexAttention's default. Every kernel block size below
must divide it."""

# Triton tile sizes per (dtype, head dimension), forward (fwd_*) and backward (bwd_*); anything not listed keeps
# torch's own choice. Head dim 256 keeps torch's defaults (torch 2.13 has tuned H100 / A100 entries for it), in
# float32 too (torch picks small tiles for it). bf16 at head dim 512 has no tuned entry: torch falls back to a
# forward tile of 64 x 32 with 3 pipeline stages and a backward of 64 x 64 tiles with 2, whose K/V (and Q/dO)
# stages alone take 3 x 2 x 32 x 512 x 2 B = 192 KiB (forward) and more in the backward, near or past an H100's
# 227 KiB of shared memory per block. The entry below fits it by arithmetic (forward: Q 64 x 512 plus 2 stages of
# K and V 32 x 512 = 192 KiB; backward: 32-row tiles, 1 stage) and keeps the fp32 accumulators at 128 registers
# per thread (8 warps). It is NOT measured yet (no GPU in the session that wrote it): bench/gpu_step.py section
# (a) times it against torch's defaults and an alternative; replace it by what that finds.
# float32 runs only in numerics checks (tests, bench section (d)), where speed does not matter: at head dim 512
# torch's fp32 forward tile (32 x 16, 3 stages) puts Q 32 x 512 x 4 B = 64 KiB plus 3 stages of K and V 16 x 512 x 4 B
# = 192 KiB in shared memory, 256 KiB in all, past 227; one stage (128 KiB) fits. Its fp32 backward (16 x 16 tiles,
# 1 stage) fits.
FLEX_KERNEL_OPTIONS: dict[tuple[torch.dtype, int], dict[str, int | bool]] = {
    (torch.bfloat16, 512): {
        "fwd_BLOCK_M": 64, "fwd_BLOCK_N": 32, "fwd_num_stages": 2, "fwd_num_warps": 8,
        "bwd_BLOCK_M1": 32, "bwd_BLOCK_N1": 32, "bwd_BLOCK_M2": 32, "bwd_BLOCK_N2": 32,
        "bwd_num_stages": 1, "bwd_num_warps": 8,
    },
    (torch.float32, 512): {"fwd_BLOCK_M": 32, "fwd_BLOCK_N": 16, "fwd_num_stages": 1, "fwd_num_warps": 4},
}

# Every mask row allows at least its diagonal (masks.py: every token sees itself), which lets the kernel skip its
# guard against rows with no visible key.
_COMMON_KERNEL_OPTIONS: dict[str, bool] = {"ROWS_GUARANTEED_SAFE": True}


def kernels_per_layer_type(attention_kernel: str) -> dict[str, str]:
    """``{layer type: "dense" | "flex"}`` for a ``trainer.attention_kernel`` value."""
    if attention_kernel not in ATTENTION_KERNELS:
        raise ValueError(f"attention kernel {attention_kernel!r} is not one of {list(ATTENTION_KERNELS)}")
    return ATTENTION_KERNELS[attention_kernel]


@dataclass(frozen=True)
class FlexBlockMasks:
    """The block masks of one micro batch, per layer type (None for a type that runs the dense kernel)."""

    sliding: BlockMask | None
    """Block mask of sliding-window layers."""

    full: BlockMask | None
    """Block mask of full-attention layers."""

    def for_layer_type(self, layer_type: str) -> BlockMask:
        mask = self.sliding if layer_type == SLIDING else self.full
        if mask is None:
            raise ValueError(f"no FlexAttention block mask was built for {layer_type} layers")
        return mask


def _ordered(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense block table [b, h, nq, nkv] bool -> (count [b, h, nq], column indices [b, h, nq, nkv]) int32, the
    listed columns first in ascending order (FlexAttention's ``kv_num_blocks`` / ``kv_indices`` layout)."""
    as_int = blocks.to(torch.int32)
    count = as_int.sum(dim=-1, dtype=torch.int32)
    indices = torch.argsort(as_int, dim=-1, descending=True, stable=True).to(torch.int32)
    return count.contiguous(), indices.contiguous()


def build_block_mask(mask_mod, batch: int, seq_len: int, block_size: int = FLEX_BLOCK_SIZE,
                     device: torch.device | str = "cpu", max_chunk_elements: int = 1 << 24) -> BlockMask:
    """A FlexAttention block mask of ``mask_mod`` over [batch, seq_len, seq_len], one mask for all heads.

    Tiles where ``mask_mod`` allows every pair become "full" blocks (computed without evaluating the mask), tiles
    where it allows some become "partial" blocks (mask evaluated per element), the rest are skipped. The mask is
    evaluated a few query tiles at a time (at most ``max_chunk_elements`` pairs at once), so no [s, s] tensor is
    ever held: at s = 8192 and batch 1, one chunk of 16 tiles is 16M booleans and the result is two
    [1, 1, 64, 64] tables."""
    n = -(-seq_len // block_size)
    padded = n * block_size
    rows_per_chunk = max(1, max_chunk_elements // max(1, batch * padded * block_size)) * block_size
    b = torch.arange(batch, device=device).view(batch, 1, 1)
    kv = torch.arange(seq_len, device=device).view(1, 1, seq_len)
    partial = torch.zeros(batch, 1, n, n, dtype=torch.bool, device=device)
    full = torch.zeros_like(partial)
    for start in range(0, padded, rows_per_chunk):
        stop = min(start + rows_per_chunk, padded)
        q = torch.arange(start, min(stop, seq_len), device=device).view(1, -1, 1)
        allowed = mask_mod(b, None, q, kv).expand(batch, q.shape[1], seq_len)
        # Pad the ragged last query / key tile with "masked": such a tile is never full, only partial (the kernel
        # bounds-checks indices past seq_len itself).
        allowed = F.pad(allowed, (0, padded - seq_len, 0, stop - start - q.shape[1]), value=False)
        tiles = allowed.view(batch, (stop - start) // block_size, block_size, n, block_size)
        any_allowed = tiles.any(dim=4).any(dim=2)
        all_allowed = tiles.all(dim=4).all(dim=2)
        rows = slice(start // block_size, stop // block_size)
        full[:, 0, rows] = all_allowed
        partial[:, 0, rows] = any_allowed & ~all_allowed
    kv_count, kv_indices = _ordered(partial)
    full_count, full_indices = _ordered(full)
    return BlockMask.from_kv_blocks(kv_count, kv_indices, full_count, full_indices, BLOCK_SIZE=block_size,
                                    mask_mod=mask_mod, seq_lengths=(seq_len, seq_len))


def build_flex_masks(arch: Gemma4Arch, kernels: dict[str, str], segment_ids: torch.Tensor,
                     mm_token_type_ids: torch.Tensor | None, block_size: int = FLEX_BLOCK_SIZE) -> FlexBlockMasks | None:
    """Block masks of the layer types that run FlexAttention (None if none does)."""
    if FLEX not in kernels.values():
        return None
    sliding_mod, full_mod = attention_mask_mods(arch, segment_ids, mm_token_type_ids)
    b, s = segment_ids.shape

    def build(layer_type, mod):
        if kernels[layer_type] != FLEX:
            return None
        return build_block_mask(mod, b, s, block_size, segment_ids.device)

    return FlexBlockMasks(sliding=build(SLIDING, sliding_mod), full=build(FULL, full_mod))


def build_dense_masks(arch: Gemma4Arch, kernels: dict[str, str], segment_ids: torch.Tensor,
                      mm_token_type_ids: torch.Tensor | None) -> torch.Tensor | None:
    """The dense [2, b, 1, s, s] masks (:func:`build_attention_masks`) if any layer type runs the dense kernel."""
    if DENSE not in kernels.values():
        return None
    return build_attention_masks(arch, segment_ids, mm_token_type_ids)


@functools.cache
def _compiled_flex(head_dim: int):
    """``torch.compile``'d FlexAttention, one compiled function per head dimension (= per layer type), static
    shapes: each sees one shape family (its layer type's heads and the run's micro batch and sequence length)."""
    del head_dim  # the cache key: separate dynamo caches per layer type
    return torch.compile(flex_attention, dynamic=False)


def flex_kernel_options(dtype: torch.dtype, head_dim: int) -> dict[str, int | bool]:
    """FlexAttention ``kernel_options`` for ``dtype`` and ``head_dim`` (see :data:`FLEX_KERNEL_OPTIONS`)."""
    return {**_COMMON_KERNEL_OPTIONS, **FLEX_KERNEL_OPTIONS.get((dtype, head_dim), {})}


def flex_attention_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: BlockMask,
                          kernel_options: dict | None = None) -> torch.Tensor:
    """``softmax(q k^T) v`` under ``block_mask``, scale 1.0. ``q`` [b, heads, s, d]; ``k``, ``v`` [b, kv_heads, s, d]
    (query head ``i`` reads key/value head ``i // (heads / kv_heads)``, as ``repeat_interleave`` would give).

    Compiled on CUDA; FlexAttention's eager reference elsewhere (forward only on CPU in torch 2.13)."""
    head_dim = q.shape[-1]
    options = flex_kernel_options(q.dtype, head_dim) if kernel_options is None else kernel_options
    if q.is_cuda:
        return _compiled_flex(head_dim)(q, k, v, block_mask=block_mask, scale=1.0, enable_gqa=True,
                                        kernel_options=options)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        raise NotImplementedError(
            "FlexAttention has no backward on CPU (torch 2.13): train on CPU with trainer.attention_kernel=dense")
    return flex_attention(q, k, v, block_mask=block_mask, scale=1.0, enable_gqa=True)


def dense_attention_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                           dropout: float = 0.0) -> torch.Tensor:
    """The reference: SDPA with ``mask`` [b, 1, s, s] (True = masked out), key/value heads repeated to every query
    head, scale 1.0. Shapes as :func:`flex_attention_kernel`."""
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)
    v = v.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=~mask, dropout_p=dropout, scale=1.0)


__all__ = [
    "ATTENTION_KERNELS",
    "DENSE",
    "FLEX",
    "FLEX_BLOCK_SIZE",
    "FLEX_KERNEL_OPTIONS",
    "FlexBlockMasks",
    "build_block_mask",
    "build_dense_masks",
    "build_flex_masks",
    "dense_attention_kernel",
    "flex_attention_kernel",
    "flex_kernel_options",
    "kernels_per_layer_type",
]
