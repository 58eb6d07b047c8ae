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
) -> AttentionBackend:
    if device.type == "cuda":
        from kvrun.runtime.attention.flashinfer import FlashInferBackend

        return FlashInferBackend(device, dtype, num_heads, num_kv_heads, head_dim, variants)
    from kvrun.runtime.attention.torch_ref import TorchReferenceBackend

    return TorchReferenceBackend(num_heads, num_kv_heads, head_dim)


__all__ = ["AttentionBackend", "AttentionMetadata", "AttentionVariant", "select_backend"]
