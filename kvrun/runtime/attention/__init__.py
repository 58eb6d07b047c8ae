"""Attention backends behind one seam (see base.py); `select_backend` picks one at start-up."""

from __future__ import annotations

import torch

from kvrun.runtime.attention.base import AttentionBackend, AttentionMetadata, AttentionVariant


def select_backend(
    device: torch.device,
    dtype: torch.dtype,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    variants: tuple[AttentionVariant, ...],
    alibi_slopes: torch.Tensor | None = None,
) -> AttentionBackend:
    """alibi_slopes: [num_heads] fp32, the slopes of the heads this backend attends over, given whenever a variant
    uses ALiBi. Under tensor parallelism a rank holds a slice of the model's heads, whose slopes are that slice of
    the whole model's (not the slopes a model of num_heads heads would have)."""
    if any(variant.alibi for variant in variants) and (alibi_slopes is None or alibi_slopes.shape != (num_heads,)):
        raise ValueError(f"ALiBi attention needs one slope per head ({num_heads}), got {alibi_slopes!r}")
    if device.type == "cuda":
        from kvrun.runtime.attention.flashinfer import FlashInferBackend

        return FlashInferBackend(device, dtype, num_heads, num_kv_heads, head_dim, variants, alibi_slopes)
    from kvrun.runtime.attention.torch_ref import TorchReferenceBackend

    return TorchReferenceBackend(num_heads, num_kv_heads, head_dim, alibi_slopes)


__all__ = ["AttentionBackend", "AttentionMetadata", "AttentionVariant", "select_backend"]
