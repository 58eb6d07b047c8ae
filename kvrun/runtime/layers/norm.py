from __future__ import annotations

import torch
from torch import nn


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Normalise in fp32 and scale in the input dtype, as the HF Llama reference does.
    x32 = x.float()
    variance = x32.pow(2).mean(-1, keepdim=True)
    return weight * (x32 * torch.rsqrt(variance + eps)).to(x.dtype)


def _add_rms_norm(x, residual, weight, eps):
    residual = x + residual
    return _rms_norm(residual, weight, eps), residual


class RMSNorm(nn.Module):
    """RMSNorm, optionally fused with the residual add before it (`forward(x, residual)`).

    `fused=True` (CUDA) runs each form as one Triton kernel (kvrun.runtime.layers.fused) with the same rounding.
    """

    def __init__(self, hidden_size: int, eps: float, fused: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps
        if fused:
            from kvrun.runtime.layers import fused as kernels

            self._norm, self._add_norm = kernels.rms_norm, kernels.add_rms_norm
        else:
            self._norm, self._add_norm = _rms_norm, _add_rms_norm

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """norm(x), or (norm(x + residual), x + residual) when a residual is given."""
        if residual is None:
            return self._norm(x, self.weight, self.eps)
        return self._add_norm(x, residual, self.weight, self.eps)
