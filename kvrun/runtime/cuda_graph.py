"""Decode steps captured as CUDA graphs, one per batch-size bucket, replayed with the step's rows copied in.

Everything a captured step reads lives in buffers allocated here once: token ids, positions, the K/V slot of each
row, the LoRA segments, and FlashInfer's page-table buffers (filled by `plan` before each replay). A batch smaller
than its bucket is padded with rows that use the base model and write into a scratch page no request owns.
Decode rows arrive grouped by adapter slot, so LoRA goes through the segment (SGMV) kernels with the segment list
padded to the bucket size by empty base-model segments: the launch grid never changes between replays. With LoRA
enabled each bucket holds a second graph without the LoRA launches, replayed when no row of the step uses an
adapter (those launches would find nothing to do, but still cost about a millisecond per step at 8B scale).
"""

from __future__ import annotations

import logging

import torch

from kvrun.runtime.forward_batch import BASE_SLOT, ForwardBatch, LoRABatchInfo, ScheduledBatch
from kvrun.runtime.step_layout import attention_metadata, fill_pending, layout_step

logger = logging.getLogger(__name__)

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256)


class _Bucket:
    def __init__(self, size: int, device: torch.device, max_pages_per_seq: int) -> None:
        self.size = size
        self.input_ids = torch.zeros(size, dtype=torch.int64, device=device)
        self.positions = torch.zeros(size, dtype=torch.int64, device=device)
        self.slot_mapping = torch.zeros(size, dtype=torch.int64, device=device)
        self.token_seq_lens = torch.ones(size, dtype=torch.int64, device=device)
        self.logits_indices = torch.arange(size, dtype=torch.int64, device=device)
        self.seg_indptr = torch.zeros(size + 1, dtype=torch.int32, device=device)
        self.seg_slots = torch.full((size,), BASE_SLOT, dtype=torch.int32, device=device)
        self.max_pages = size * max_pages_per_seq
        self.graphs: dict[bool, torch.cuda.CUDAGraph] = {}  # keyed by "runs the LoRA kernels"
        self.logits: dict[bool, torch.Tensor] = {}


class DecodeGraphs:
    def __init__(self, runner, max_batch_size: int, with_lora: bool, stream: torch.cuda.Stream, pool=None) -> None:
        """stream: the side stream every capture runs on (cuBLAS keeps a workspace per stream, 32 MiB on Hopper, so
        a fresh stream per graph would leave one behind for each). pool: a memory pool to share (the pieces')."""
        self.runner = runner
        self.with_lora = with_lora
        self.scratch_page = runner.num_blocks  # the KV cache holds one page past the block manager's pool
        max_pages_per_seq = -(-runner.max_model_len // runner.block_size)
        sizes = [size for size in BUCKETS if size < max_batch_size] + [max_batch_size]
        self.buckets = {size: _Bucket(size, runner.device, max_pages_per_seq) for size in sizes}
        self.pool = pool
        self.stream = stream
        for size in sorted(self.buckets, reverse=True):  # largest first, so smaller graphs reuse its memory
            self._capture(self.buckets[size])
        logger.info("captured decode graphs for batch sizes %s", sorted(self.buckets))

    def bucket_for(self, batch_size: int) -> _Bucket | None:
        for size in sorted(self.buckets):
            if size >= batch_size:
                return self.buckets[size]
        return None

    def _capture(self, bucket: _Bucket) -> None:
        runner = self.runner
        wrapper_pages = bucket.max_pages
        runner.attention.prepare_graph(bucket.size, wrapper_pages)
        self._fill(bucket, [])
        for uses_lora in (True, False) if self.with_lora else (False,):
            batch = self._forward_batch(bucket, uses_lora)
            stream = self.stream
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):  # warm up: Triton autotuning and FlashInfer JIT happen outside the capture
                    runner.model(batch, runner.kv_cache)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool, stream=stream):
                bucket.logits[uses_lora] = runner.model(batch, runner.kv_cache)
            self.pool = graph.pool()
            bucket.graphs[uses_lora] = graph

    def _forward_batch(self, bucket: _Bucket, uses_lora: bool) -> ForwardBatch:
        lora = LoRABatchInfo(bucket.seg_indptr, bucket.seg_slots) if uses_lora else None
        token_seq_lens = bucket.token_seq_lens if self.runner.needs_token_seq_lens else None
        return ForwardBatch(bucket.input_ids, bucket.positions, bucket.attention, bucket.logits_indices, lora,
                            token_seq_lens)  # fmt: skip

    def run(self, batch: ScheduledBatch, previous: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [len(batch.requests), vocab] of one decode step, by replaying the bucket's graph. previous: the last
        step's sampled tokens on the device (rows whose token is not on the host yet read theirs there)."""
        bucket = self.bucket_for(len(batch.requests))
        self._fill(bucket, batch.requests, previous)
        uses_lora = self.with_lora and any(request.adapter_slot != BASE_SLOT for request in batch.requests)
        bucket.graphs[uses_lora].replay()
        return bucket.logits[uses_lora][: len(batch.requests)]

    def _fill(self, bucket: _Bucket, requests, previous: torch.Tensor | None = None) -> None:
        runner = self.runner
        layout = layout_step(requests, runner.block_size, pad_rows_to=bucket.size, scratch_page=self.scratch_page)

        def copy(target: torch.Tensor, values: list[int]) -> None:
            target.copy_(torch.tensor(values, dtype=target.dtype), non_blocking=True)

        copy(bucket.input_ids, layout.input_ids)
        fill_pending(bucket.input_ids, layout, previous)
        copy(bucket.positions, layout.positions)
        copy(bucket.slot_mapping, layout.slot_mapping)
        copy(bucket.token_seq_lens, layout.token_seq_lens)
        copy(bucket.seg_indptr, layout.seg_indptr)
        copy(bucket.seg_slots, layout.seg_slots)
        bucket.attention = attention_metadata(layout, False, runner.block_size, bucket.slot_mapping)
        runner.attention.plan(bucket.attention, graph_batch_size=bucket.size)
