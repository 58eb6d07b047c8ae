"""Paged attention in plain torch: the CPU backend and the semantics the FlashInfer backend must match."""

from __future__ import annotations

import torch
from torch.nn import functional as F

from kvrun.runtime.attention.base import AttentionMetadata, AttentionVariant, write_kv


class TorchReferenceBackend:
    graph_buffer_bytes = 0  # no CUDA graphs
    graph_page_index_bytes = 0
    capture = None  # never captured in pieces

    def __init__(
        self, num_heads: int, num_kv_heads: int, head_dim: int, alibi_slopes: torch.Tensor | None = None
    ) -> None:
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.slopes = alibi_slopes  # [heads] fp32, read by ALiBi variants only (see select_backend)
        self._metadata: AttentionMetadata | None = None
        self._page_table: torch.Tensor | None = None  # [batch, max_pages] for the batched decode gather
        self._key_positions: torch.Tensor | None = None  # [max_pages * page_size]
        self._query_positions: torch.Tensor | None = None  # [batch] position of each decode row's query

    def prepare_graph(self, batch_size: int, max_pages: int) -> None:
        raise RuntimeError("the torch reference backend does not run CUDA graphs")

    def plan(self, metadata: AttentionMetadata, graph_batch_size: int | None = None) -> None:
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
        self._key_positions = torch.arange(max_pages * metadata.page_size, device=device)
        self._query_positions = (metadata.seq_lens.long() - 1).to(device)

    def forward(self, q, k, v, kv_cache, variant: AttentionVariant):
        metadata = self._metadata
        write_kv(kv_cache, k, v, metadata.slot_mapping)
        if metadata.is_prefill:
            return self._prefill(q, kv_cache, metadata, variant)
        return self._decode(q, kv_cache, variant)

    def _prefill(self, q, kv_cache, metadata: AttentionMetadata, variant: AttentionVariant) -> torch.Tensor:
        out = torch.empty_like(q)
        qo, kv = metadata.qo_indptr.tolist(), metadata.kv_indptr.tolist()
        for index, (query_len, seq_len) in enumerate(zip(metadata.query_lens_host, metadata.seq_lens_host)):
            pages = metadata.kv_page_indices[kv[index] : kv[index + 1]].long().to(kv_cache.device)
            keys = kv_cache[pages, 0].reshape(-1, self.num_kv_heads, kv_cache.shape[-1])[:seq_len]
            values = kv_cache[pages, 1].reshape(-1, self.num_kv_heads, kv_cache.shape[-1])[:seq_len]
            # Query j sits at position seq_len - query_len + j and sees every key up to it.
            query_positions = torch.arange(seq_len - query_len, seq_len, device=q.device)
            key_positions = torch.arange(seq_len, device=q.device)
            mask = _visible(query_positions, key_positions, variant)
            bias = self._alibi(query_positions, key_positions) if variant.alibi else None
            rows = slice(qo[index], qo[index + 1])
            queries = q[rows].transpose(0, 1)
            attended = self._attend(queries, keys.transpose(0, 1), values.transpose(0, 1), mask, variant, bias)
            out[rows] = attended.transpose(0, 1)
        return out

    def _alibi(self, query_positions: torch.Tensor, key_positions: torch.Tensor) -> torch.Tensor:
        """[heads, queries, keys] fp32: slope_h * (key position - query position)."""
        distance = (key_positions[None, :] - query_positions[:, None]).float()
        return self.slopes.to(distance.device)[:, None, None] * distance[None]

    def _decode(self, q, kv_cache, variant: AttentionVariant) -> torch.Tensor:
        batch, max_pages = self._page_table.shape
        head_dim = kv_cache.shape[-1]
        keys = kv_cache[self._page_table, 0].reshape(batch, max_pages * kv_cache.shape[2], self.num_kv_heads, head_dim)
        values = kv_cache[self._page_table, 1].reshape(batch, -1, self.num_kv_heads, head_dim)
        mask = _visible(self._query_positions, self._key_positions, variant)[:, None, None, :]
        bias = None
        if variant.alibi:  # one query per row: [heads, batch, keys] → [batch, heads, 1, keys]
            bias = self._alibi(self._query_positions, self._key_positions).transpose(0, 1)[:, :, None, :]
        queries = q.unsqueeze(2)  # [batch, heads, 1, head_dim]
        out = self._attend(queries, keys.transpose(1, 2), values.transpose(1, 2), mask, variant, bias)
        return out.squeeze(2)

    def _attend(self, q, keys, values, mask, variant: AttentionVariant, bias=None) -> torch.Tensor:
        """q [..., heads, q_len, dim]; keys/values [..., kv_heads, k_len, dim]; mask broadcastable, True = attend;
        bias (ALiBi, never with a soft cap) broadcastable to the scores, added after scaling."""
        keys, values = keys.to(q.dtype), values.to(q.dtype)
        if variant.logits_soft_cap is None:
            if bias is not None:  # SDPA adds a float mask to the scaled scores
                mask = bias.masked_fill(~mask, float("-inf")).to(q.dtype)
            return F.scaled_dot_product_attention(
                q, keys, values, attn_mask=mask, scale=variant.scale, enable_gqa=self.num_heads != self.num_kv_heads
            )
        # Soft-capping sits between the product and the softmax, which SDPA cannot express.
        groups = self.num_heads // self.num_kv_heads
        keys = keys.repeat_interleave(groups, dim=-3)
        values = values.repeat_interleave(groups, dim=-3)
        cap = variant.logits_soft_cap
        scores = torch.tanh(torch.matmul(q, keys.transpose(-1, -2)) * variant.scale / cap) * cap
        scores = scores.masked_fill(~mask, float("-inf"))
        weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        return torch.matmul(weights, values)


def _visible(query_positions: torch.Tensor, key_positions: torch.Tensor, variant: AttentionVariant) -> torch.Tensor:
    """[queries, keys] True where the query may attend the key: causal, and within the sliding window if any."""
    query, key = query_positions[:, None], key_positions[None, :]
    mask = key <= query
    if variant.sliding_window is not None:
        mask &= key > query - variant.sliding_window
    return mask
