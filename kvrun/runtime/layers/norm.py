"""Normalisation layers with the rounding of their HF references; each may fuse the residual add before it.

Every norm has the same call shape, so decoder blocks never branch on the kind:
    norm(x)            → normed
    norm(x, residual)  → (norm(x + residual), x + residual)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F


@dataclass(frozen=True, slots=True)
class NormSpec:
    """kind "rms": RMSNorm; kind "layer": LayerNorm (mean-subtracting).

    weight_offset: Gemma stores w and scales by (1 + w).
    scale_in_fp32: multiply by the weight before casting back (Gemma, Cohere), not after (Llama).
    """

    kind: str  # "rms" | "layer"
    eps: float
    bias: bool = False  # LayerNorm only
    weight_offset: float = 0.0
    scale_in_fp32: bool = False


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float, scale_in_fp32: bool) -> torch.Tensor:
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    if scale_in_fp32:
        return (normed * (offset + weight.float())).to(x.dtype)
    # Llama: normalise in fp32, cast, then scale in the input dtype.
    return (weight + offset if offset else weight) * normed.to(x.dtype)


class RMSNorm(nn.Module):
    """RMSNorm; `fused=True` (CUDA) runs each form as one Triton kernel (kvrun.runtime.layers.fused)."""

    def __init__(self, hidden_size: int, spec: NormSpec, fused: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps, self.offset, self.scale_in_fp32 = spec.eps, spec.weight_offset, spec.scale_in_fp32
        self.fused = fused

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if self.fused:
            from kvrun.runtime.layers import fused as kernels

            if residual is None:
                return kernels.rms_norm(x, self.weight, self.eps, self.offset, self.scale_in_fp32)
            return kernels.add_rms_norm(x, residual, self.weight, self.eps, self.offset, self.scale_in_fp32)
        if residual is not None:
            residual = x + residual
            return _rms_norm(residual, self.weight, self.eps, self.offset, self.scale_in_fp32), residual
        return _rms_norm(x, self.weight, self.eps, self.offset, self.scale_in_fp32)


class LayerNorm(nn.Module):
    """LayerNorm over the last dimension, with or without bias; `shape` may be [heads, head_dim] (per-head q/k)."""

    def __init__(self, shape: int | tuple[int, ...], spec: NormSpec) -> None:
        super().__init__()
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        self.weight = nn.Parameter(torch.ones(shape))
        self.bias = nn.Parameter(torch.zeros(shape)) if spec.bias else None
        self.eps, self.scale_in_fp32 = spec.eps, spec.scale_in_fp32

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale_in_fp32:  # Cohere: the whole norm in fp32, one cast at the end
            x32 = x.float()
            centered = x32 - x32.mean(-1, keepdim=True)
            normed = centered * torch.rsqrt(centered.pow(2).mean(-1, keepdim=True) + self.eps)
            out = normed * self.weight.float()
            if self.bias is not None:
                out = out + self.bias.float()
            return out.to(x.dtype)
        if self.weight.dim() == 1:
            return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)
        normed = F.layer_norm(x, x.shape[-1:], None, None, self.eps)
        return normed * self.weight + (self.bias if self.bias is not None else 0)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if residual is not None:
            residual = x + residual
            return self._norm(residual), residual
        return self._norm(x)


def make_norm(shape: int | tuple[int, ...], spec: NormSpec, fused: bool = False) -> nn.Module:
    if spec.kind == "rms":
        if not isinstance(shape, int):
            raise ValueError("RMSNorm is over one dimension")
        return RMSNorm(shape, spec, fused)
    if spec.kind == "layer":
        return LayerNorm(shape, spec)
    raise ValueError(f"unknown norm kind {spec.kind!r}")
