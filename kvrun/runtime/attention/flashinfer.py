"""FlashInfer paged attention: one plan per step and attention variant, shared by every layer of that variant.

K/V are written by one fused Triton scatter (same semantics as base.write_kv); FlashInfer reads the NHD page layout.
Page-table index arrays are planned from host copies, so a plan waits on the GPU only until the previous plan's copy
to the device has run (see plan). Layers that differ in scale, sliding window or logit soft-cap (Gemma 2's
alternating layers) each get their own wrappers, all planned from the same metadata; decode graphs get their own
fixed-buffer wrappers per batch-size bucket.

ALiBi: FlashInfer's wrappers take no slopes. Every run() (paged prefill; decode on CUDA cores; tensor-core decode,
which runs the prefill kernel; with or without a JIT-specialised module) reads them from one cached device tensor,
`flashinfer.utils._get_cache_alibi_slopes_buf(num_qo_heads, q.device)`, keyed by head count and device only and
filled with the slopes of a model of that many heads. A tensor-parallel rank holds a slice of the model's heads,
whose slopes are not those; and two engines in one process (a model with as many heads as a rank of another) share
the buffer. So `plan`, which runs before the layers and before every graph replay, copies this backend's slopes
into it: num_heads floats per step, in stream order before the kernels (and the graphs, which captured the
buffer's address) read them.
"""

from __future__ import annotations

import torch

from kvrun.runtime.attention.base import AttentionMetadata, AttentionVariant
from kvrun.runtime.layers.fused import write_kv

WORKSPACE_BYTES = 256 * 1024 * 1024
INT_WORKSPACE_BYTES = 8 * 1024 * 1024  # every FlashInfer wrapper allocates this much for its plan, graph ones too


class FlashInferBackend:
    def __init__(
        self,
        device: torch.device,
        dtype: torch.dtype,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        variants: tuple[AttentionVariant, ...],
        alibi_slopes: torch.Tensor | None = None,
    ) -> None:
        import flashinfer
        from flashinfer.utils import _get_cache_alibi_slopes_buf

        self._flashinfer = flashinfer
        self.device, self.dtype = device, dtype
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.variants = tuple(dict.fromkeys(variants))
        self.graph_buffer_bytes = len(self.variants) * INT_WORKSPACE_BYTES  # one decode wrapper per variant and size
        self.graph_page_index_bytes = len(self.variants) * 4  # each wrapper's int32 page indices of every row
        self.workspace = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        self.prefill = {v: flashinfer.BatchPrefillWithPagedKVCacheWrapper(self.workspace, "NHD") for v in self.variants}
        self.decode = {v: self._decode_wrapper() for v in self.variants}
        self._graph_wrappers: dict[int, dict[AttentionVariant, object]] = {}
        self._active: dict[AttentionVariant, object] = self.decode
        self._metadata: AttentionMetadata | None = None
        self.capture = None  # set while a step is captured in pieces (kvrun.runtime.step_graphs)
        self._planned: torch.cuda.Event | None = None  # recorded after the last plan's copies to the device
        self._alibi: tuple[torch.Tensor, torch.Tensor] | None = None  # (our slopes, FlashInfer's buffer), device
        if any(variant.alibi for variant in self.variants):
            # The key FlashInfer looks up is q's device, which carries its index (a bare "cuda" would miss).
            buffer = _get_cache_alibi_slopes_buf(num_heads, self.workspace.device)
            self._alibi = (alibi_slopes.to(device=buffer.device, dtype=buffer.dtype), buffer)

    def _decode_wrapper(self, **graph_buffers):
        # Tensor-core decode pays off once several query heads share a KV head (GQA).
        tensor_cores = self.num_heads // self.num_kv_heads >= 4
        return self._flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            self.workspace, "NHD", use_tensor_cores=tensor_cores, **graph_buffers
        )

    def prepare_graph(self, batch_size: int, max_pages: int) -> None:
        if batch_size in self._graph_wrappers:
            return
        wrappers = {}
        for variant in self.variants:
            wrappers[variant] = self._decode_wrapper(
                use_cuda_graph=True,
                paged_kv_indptr_buffer=torch.zeros(batch_size + 1, dtype=torch.int32, device=self.device),
                paged_kv_indices_buffer=torch.zeros(max_pages, dtype=torch.int32, device=self.device),
                paged_kv_last_page_len_buffer=torch.zeros(batch_size, dtype=torch.int32, device=self.device),
            )
        self._graph_wrappers[batch_size] = wrappers

    def plan(self, metadata: AttentionMetadata, graph_batch_size: int | None = None) -> None:
        # Each wrapper's plan fills one pinned host buffer and copies it to the device asynchronously, in stream
        # order. A step with no row that samples never waits for the device, so the host can plan the next step
        # before the device has reached the last step's copy, and would overwrite what that copy reads: the last
        # step's attention then runs with this step's work arrays. Wait for that copy first. It comes before the last
        # step's kernels, so the device may still be a step behind the host, no more.
        if self._planned is None:
            self._planned = torch.cuda.Event()
        else:
            self._planned.synchronize()
        self._plan_wrappers(metadata, graph_batch_size)
        self._planned.record(torch.cuda.current_stream(self.device))

    def _plan_wrappers(self, metadata: AttentionMetadata, graph_batch_size: int | None) -> None:
        self._metadata = metadata
        if self._alibi is not None:
            slopes, buffer = self._alibi
            buffer.copy_(slopes)
        dtype = self.dtype
        if metadata.is_prefill:
            for variant, wrapper in self.prefill.items():
                wrapper.plan(
                    metadata.qo_indptr, metadata.kv_indptr, metadata.kv_page_indices, metadata.kv_last_page_len,
                    self.num_heads, self.num_kv_heads, self.head_dim, metadata.page_size,
                    causal=True, q_data_type=dtype, kv_data_type=dtype, **_variant_arguments(variant),
                )
            self._active = self.prefill
            return
        wrappers = self.decode if graph_batch_size is None else self._graph_wrappers[graph_batch_size]
        for variant, wrapper in wrappers.items():
            wrapper.plan(
                metadata.kv_indptr, metadata.kv_page_indices, metadata.kv_last_page_len,
                self.num_heads, self.num_kv_heads, self.head_dim, metadata.page_size,
                q_data_type=dtype, kv_data_type=dtype, **_variant_arguments(variant),
            )
        self._active = wrappers

    def forward(self, q, k, v, kv_cache, variant: AttentionVariant):
        write_kv(kv_cache, k, v, self._metadata.slot_mapping)
        if self.capture is not None:  # a step captured in pieces: the attention itself runs between them
            return self.capture.attention(q, kv_cache, variant)
        return self._active[variant].run(q, kv_cache)

    def attend(self, q, kv_cache, variant: AttentionVariant, out) -> None:
        """The planned attention alone (the K/V already written), into out: between the pieces of a captured step."""
        self._active[variant].run(q, kv_cache, out=out)


def _variant_arguments(variant: AttentionVariant) -> dict:
    # FlashInfer's window_left counts the keys left of the query's own: a window of W keys is window_left W - 1.
    # ALiBi: FlashInfer adds slope_h * (key - query) to the scaled scores, slope_h from the buffer plan() fills.
    return {
        "sm_scale": variant.scale,
        "window_left": -1 if variant.sliding_window is None else variant.sliding_window - 1,
        "logits_soft_cap": variant.logits_soft_cap or 0.0,
        "pos_encoding_mode": "ALIBI" if variant.alibi else "NONE",
    }
