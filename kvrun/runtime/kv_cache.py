"""The paged KV pool's storage: one tensor for all layers, in FlashInfer's NHD page layout."""

from __future__ import annotations

import torch

from kvrun.runtime.models.spec import ModelConfig


def bytes_per_block(model: ModelConfig, block_size: int, dtype: torch.dtype, num_kv_heads: int | None = None) -> int:
    """num_kv_heads: the K/V heads this device holds (its tensor-parallel shard); None: all of the model's."""
    element = torch.empty((), dtype=dtype).element_size()
    return model.num_layers * 2 * block_size * (num_kv_heads or model.num_kv_heads) * model.head_dim * element


def allocate_kv_cache(
    model: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device,
    num_kv_heads: int | None = None,
) -> torch.Tensor:  # fmt: skip
    """[num_layers, num_blocks, 2, block_size, num_kv_heads, head_dim]; layer i's slice is what attention sees.
    Under tensor parallelism each rank's pool holds its own K/V heads (same blocks, same block tables)."""
    shape = (model.num_layers, num_blocks, 2, block_size, num_kv_heads or model.num_kv_heads, model.head_dim)
    return torch.zeros(shape, dtype=dtype, device=device)
