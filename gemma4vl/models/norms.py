"""Gemma 4's RMSNorm.

``y = x * (mean(x**2) + eps) ** -0.5 * weight``: a plain ``weight`` (not ``1 + weight``), computed in float32
with ``torch.pow`` exactly as the reference implementation does, and cast back to the input dtype.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.transformer_config import TransformerConfig


def rms_normalize(x: torch.Tensor, eps: float, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Gemma 4 RMS normalisation of the last dimension (``weight`` None: the scaleless variant)."""
    x32 = x.float()
    y = x32 * torch.pow(x32.pow(2).mean(-1, keepdim=True) + eps, -0.5)
    if weight is not None:
        y = y * weight.float()
    return y.type_as(x)


class Gemma4RMSNorm(torch.nn.Module):
    """RMSNorm with a learned scale; signature compatible with Megatron-Core's layer-norm builders.

    The weight is replicated across tensor-parallel ranks; with sequence parallelism each rank sees a slice of
    the sequence, so the weight is marked ``sequence_parallel`` for Megatron-Core's gradient all-reduce.
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        setattr(self.weight, "sequence_parallel", config.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_normalize(x, self.eps, self.weight)
