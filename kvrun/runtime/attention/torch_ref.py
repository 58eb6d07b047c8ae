"""Paged attention in plain torch: the CPU backend and the semantics the FlashInfer backend must match."""

from __future__ import annotations

import torch
from torch.nn import functional as F

from kvrun.runtime.attention.base import AttentionMetadata, write_kv


class TorchReferenceBackend:
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.scale = head_dim**-0.5
        self._metadata: AttentionMetadata | None = None
        self._page_table: torch.Tensor | None = None  # [batch, max_pages] for the batched decode gather
        self._decode_mask: torch.Tensor | None = None  # [batch, 1, 1, max_pages * page_size], True = attend

    def plan(self, metadata: AttentionMetadata) -> None:
        self._metadata = metadata
        if metadata.is_prefill:
            return
        indptr = metadata.kv_indptr.tolist()
        counts = [end - start for start, end in zip(indptr, indptr[1:])]
        max_pages = max(counts)
        table = torch.zeros(len(counts), max_pages, dtype=torch.long)
        for row, (start, count) in enumerate(zip(indptr, counts)):
            table[row, :count] = metadata.kv_page_indices[start : start + count]
        device = metadata.slot_mapping.device
        self._page_table = table.to(device)
        key_positions = torch.arange(max_pages * metadata.page_size)
        mask = (key_positions[None, :] < metadata.seq_lens[:, None].long())[:, None, None, :]
        self._decode_mask = mask.to(device)

    def forward(self, q, k, v, kv_cache):
        metadata = self._metadata
        write_kv(kv_cache, k, v, metadata.slot_mapping)
        if metadata.is_prefill:
            return self._prefill(q, kv_cache, metadata)
        return self._decode(q, kv_cache)

    def _prefill(self, q: torch.Tensor, kv_cache: torch.Tensor, metadata: AttentionMetadata) -> torch.Tensor:
        out = torch.empty_like(q)
        page_size = metadata.page_size
        qo, kv = metadata.qo_indptr.tolist(), metadata.kv_indptr.tolist()
        for index, (query_len, seq_len) in enumerate(zip(metadata.query_lens_host, metadata.seq_lens_host)):
            pages = metadata.kv_page_indices[kv[index] : kv[index + 1]].long().to(kv_cache.device)
            keys = kv_cache[pages, 0].reshape(-1, self.num_kv_heads, kv_cache.shape[-1])[:seq_len]
            values = kv_cache[pages, 1].reshape(-1, self.num_kv_heads, kv_cache.shape[-1])[:seq_len]
            # Query j sits at position seq_len - query_len + j and sees every key up to it.
            query_positions = torch.arange(seq_len - query_len, seq_len, device=q.device)
            mask = torch.arange(seq_len, device=q.device)[None, :] <= query_positions[:, None]
            rows = slice(qo[index], qo[index + 1])
            out[rows] = self._attend(q[rows].transpose(0, 1), keys, values, mask).transpose(0, 1)
        return out

    def _decode(self, q: torch.Tensor, kv_cache: torch.Tensor) -> torch.Tensor:
        batch, max_pages = self._page_table.shape
        head_dim = kv_cache.shape[-1]
        keys = kv_cache[self._page_table, 0].reshape(batch, max_pages * kv_cache.shape[2], self.num_kv_heads, head_dim)
        values = kv_cache[self._page_table, 1].reshape(batch, -1, self.num_kv_heads, head_dim)
        queries = q.unsqueeze(2)  # [batch, heads, 1, head_dim]
        out = self._attend(queries, keys.transpose(1, 2), values.transpose(1, 2), self._decode_mask, batched=True)
        return out.squeeze(2)

    def _attend(self, q, keys, values, mask, batched: bool = False) -> torch.Tensor:
        if not batched:  # keys arrive [seq, kv_heads, dim]
            keys, values = keys.transpose(0, 1), values.transpose(0, 1)
        return F.scaled_dot_product_attention(
            q, keys.to(q.dtype), values.to(q.dtype), attn_mask=mask, scale=self.scale,
            enable_gqa=self.num_heads != self.num_kv_heads,
        )
