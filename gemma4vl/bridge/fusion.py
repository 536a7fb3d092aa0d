"""The two weight fusions of the Gemma 4 MoE block and their inverses.

Per layer, with ``w1 = pre_feedforward_layernorm``, ``w2 = pre_feedforward_layernorm_2``, ``s = router.scale``
and ``H`` the hidden size, per input column ``j``:

    router:        fused[:, j] = proj[:, j] * (s[j] * H**-0.5 / w2[j])
    shared expert: fused[:, j] = W[:, j]    * (w1[j] / w2[j])            for W in (gate_proj, up_proj)

so the layer needs one pre-MLP norm (``w2``) for router, routed and shared experts alike. Export inverts them
with the model's *current* ``w2`` (trained) and the anchors ``s`` and ``w1`` kept from the checkpoint.

Everything is computed in float64 and delivered as float32. A divisor that is zero or not finite is an error
naming the layer and the tensor.

Exactness: a fused tensor in a finite precision cannot always be divided back to the original bits (the
scaling is not injective on floats). :func:`exact_preimage` therefore checks whether the source checkpoint's
original tensor fuses to exactly the model's current tensor; if so, that original is an exact preimage and is
what export writes (bit-exact round trip); after training it no longer is, and the arithmetic inverse with the
trained values is written.
"""

from __future__ import annotations

import torch


class FusionError(ValueError):
    """A fusion divisor is zero or not finite."""


def _check_divisor(value: torch.Tensor, what: str) -> torch.Tensor:
    v = value.to(torch.float64)
    bad = (~torch.isfinite(v)) | (v == 0)
    if bool(bad.any()):
        idx = torch.nonzero(bad).flatten()[:5].tolist()
        raise FusionError(f"{what}: cannot fuse, divisor is zero or not finite at index {idx} "
                          f"(values {v[bad][:5].tolist()})")
    return v


def router_factor(scale: torch.Tensor, w2: torch.Tensor, hidden_size: int, where: str) -> torch.Tensor:
    """Per-column factor of the router fusion, float64 [H]."""
    w2 = _check_divisor(w2, f"{where}: pre_feedforward_layernorm_2.weight")
    return scale.to(torch.float64) * hidden_size**-0.5 / w2


def shared_factor(w1: torch.Tensor, w2: torch.Tensor, where: str) -> torch.Tensor:
    """Per-column factor of the shared-expert fusion, float64 [H]."""
    w2 = _check_divisor(w2, f"{where}: pre_feedforward_layernorm_2.weight")
    return w1.to(torch.float64) / w2


def fuse(weight: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``weight * factor`` per input column (last dim), in float64, returned as float32."""
    return (weight.to(torch.float64) * factor).to(torch.float32)


def fuse_into(out: torch.Tensor, weight: torch.Tensor, factor: torch.Tensor, chunk_elements: int = 1 << 18) -> None:
    """``out.copy_(fuse(weight, factor))``, bit for bit, a block of rows at a time through one reused float64
    scratch block (2 MB at the default): no whole-tensor temporaries, and no fresh temporary per block (on this
    platform every freshly faulted page costs several microseconds, so temporaries that are allocated and freed
    per block cost more than the arithmetic). ``weight`` and ``out`` have the same shape; ``out`` is contiguous.
    The steps are those of :func:`fuse`: exact widening to float64, the float64 product, rounding to float32
    (then to ``out``'s dtype, as ``fuse(...).to(out.dtype)`` would)."""
    if out.shape != weight.shape or not out.is_contiguous():
        raise ValueError(f"fuse_into: out {list(out.shape)} (contiguous: {out.is_contiguous()}) does not match "
                         f"weight {list(weight.shape)}")
    columns = weight.shape[-1]
    factor = factor.to(device=weight.device, dtype=torch.float64)  # a TP mapping may have put weight on the GPU
    src, dst = weight.reshape(-1, columns), out.view(-1, columns)
    rows = max(1, min(src.shape[0], chunk_elements // columns))
    scratch = torch.empty(rows, columns, dtype=torch.float64, device=weight.device)
    narrow = None if out.dtype == torch.float32 else torch.empty(rows, columns, dtype=torch.float32,
                                                                   device=weight.device)
    for begin in range(0, src.shape[0], rows):
        n = min(rows, src.shape[0] - begin)
        block = scratch[:n]
        block.copy_(src[begin:begin + n])
        block.mul_(factor)
        if narrow is None:
            dst[begin:begin + n].copy_(block)
        else:
            dst[begin:begin + n].copy_(narrow[:n].copy_(block))


def unfuse(fused: torch.Tensor, factor: torch.Tensor, where: str) -> torch.Tensor:
    """Inverse of :func:`fuse` (float64 arithmetic, float32 result)."""
    factor = _check_divisor(factor, f"{where}: fusion factor")
    return (fused.to(torch.float64) / factor).to(torch.float32)


def exact_preimage(original: torch.Tensor | None, factor: torch.Tensor, current: torch.Tensor) -> bool:
    """True when ``original`` fuses (as import did) to exactly ``current``, bit for bit."""
    if original is None or original.shape != current.shape:
        return False
    return torch.equal(fuse(original, factor).to(current.dtype), current)
