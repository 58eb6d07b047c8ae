"""FlashInfer paged attention: one plan per step, shared by every layer; per-bucket wrappers for CUDA graphs.

K/V are written by one fused Triton scatter (same semantics as base.write_kv); FlashInfer reads the NHD page layout.
Page-table index arrays are planned from host copies, so planning never waits on the GPU.
"""

from __future__ import annotations

import torch

from kvrun.runtime.attention.base import AttentionMetadata
from kvrun.runtime.layers.fused import write_kv

WORKSPACE_BYTES = 256 * 1024 * 1024


class FlashInferBackend:
    def __init__(
        self, device: torch.device, dtype: torch.dtype, num_heads: int, num_kv_heads: int, head_dim: int
    ) -> None:
        import flashinfer

        self._flashinfer = flashinfer
        self.device, self.dtype = device, dtype
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.workspace = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        self.prefill = flashinfer.BatchPrefillWithPagedKVCacheWrapper(self.workspace, "NHD")
        self.decode = self._decode_wrapper()
        self._graph_wrappers: dict[int, object] = {}
        self._active = self.decode
        self._metadata: AttentionMetadata | None = None

    def _decode_wrapper(self, **graph_buffers):
        # Tensor-core decode pays off once several query heads share a KV head (GQA).
        tensor_cores = self.num_heads // self.num_kv_heads >= 4
        return self._flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            self.workspace, "NHD", use_tensor_cores=tensor_cores, **graph_buffers
        )

    def graph_wrapper(self, batch_size: int, max_pages: int):
        """A decode wrapper whose index buffers stay put, for a graph captured at batch_size rows."""
        if batch_size not in self._graph_wrappers:
            self._graph_wrappers[batch_size] = self._decode_wrapper(
                use_cuda_graph=True,
                paged_kv_indptr_buffer=torch.zeros(batch_size + 1, dtype=torch.int32, device=self.device),
                paged_kv_indices_buffer=torch.zeros(max_pages, dtype=torch.int32, device=self.device),
                paged_kv_last_page_len_buffer=torch.zeros(batch_size, dtype=torch.int32, device=self.device),
            )
        return self._graph_wrappers[batch_size]

    def plan(self, metadata: AttentionMetadata, graph_batch_size: int | None = None) -> None:
        self._metadata = metadata
        dtype = self.dtype
        if metadata.is_prefill:
            self.prefill.plan(
                metadata.qo_indptr, metadata.kv_indptr, metadata.kv_page_indices, metadata.kv_last_page_len,
                self.num_heads, self.num_kv_heads, self.head_dim, metadata.page_size,
                causal=True, q_data_type=dtype, kv_data_type=dtype,
            )
            self._active = self.prefill
            return
        wrapper = self.decode if graph_batch_size is None else self._graph_wrappers[graph_batch_size]
        wrapper.plan(
            metadata.kv_indptr, metadata.kv_page_indices, metadata.kv_last_page_len,
            self.num_heads, self.num_kv_heads, self.head_dim, metadata.page_size,
            q_data_type=dtype, kv_data_type=dtype,
        )
        self._active = wrapper

    def forward(self, q, k, v, kv_cache):
        write_kv(kv_cache, k, v, self._metadata.slot_mapping)
        return self._active.run(q, kv_cache)
