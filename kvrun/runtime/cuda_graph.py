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

from kvrun.runtime.attention.base import AttentionMetadata
from kvrun.runtime.forward_batch import BASE_SLOT, ForwardBatch, LoRABatchInfo, ScheduledBatch

logger = logging.getLogger(__name__)

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256)


class _Bucket:
    def __init__(self, size: int, device: torch.device, max_pages_per_seq: int) -> None:
        self.size = size
        self.input_ids = torch.zeros(size, dtype=torch.int64, device=device)
        self.positions = torch.zeros(size, dtype=torch.int64, device=device)
        self.slot_mapping = torch.zeros(size, dtype=torch.int64, device=device)
        self.logits_indices = torch.arange(size, dtype=torch.int64, device=device)
        self.seg_indptr = torch.zeros(size + 1, dtype=torch.int32, device=device)
        self.seg_slots = torch.full((size,), BASE_SLOT, dtype=torch.int32, device=device)
        self.max_pages = size * max_pages_per_seq
        self.graphs: dict[bool, torch.cuda.CUDAGraph] = {}  # keyed by "runs the LoRA kernels"
        self.logits: dict[bool, torch.Tensor] = {}


class DecodeGraphs:
    def __init__(self, runner, max_batch_size: int, with_lora: bool) -> None:
        self.runner = runner
        self.with_lora = with_lora
        self.scratch_page = runner.num_blocks  # the KV cache holds one page past the block manager's pool
        max_pages_per_seq = -(-runner.max_model_len // runner.block_size)
        sizes = [size for size in BUCKETS if size < max_batch_size] + [max_batch_size]
        self.buckets = {size: _Bucket(size, runner.device, max_pages_per_seq) for size in sizes}
        self.pool = None
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
        runner.attention.graph_wrapper(bucket.size, wrapper_pages)
        self._fill(bucket, [])
        for uses_lora in (True, False) if self.with_lora else (False,):
            batch = self._forward_batch(bucket, uses_lora)
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):  # warm up: Triton autotuning and FlashInfer JIT happen outside the capture
                    runner.model(batch, runner.kv_cache)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                bucket.logits[uses_lora] = runner.model(batch, runner.kv_cache)
            self.pool = graph.pool()
            bucket.graphs[uses_lora] = graph

    def _forward_batch(self, bucket: _Bucket, uses_lora: bool) -> ForwardBatch:
        lora = LoRABatchInfo(bucket.seg_indptr, bucket.seg_slots) if uses_lora else None
        return ForwardBatch(bucket.input_ids, bucket.positions, bucket.attention, bucket.logits_indices, lora)

    def run(self, batch: ScheduledBatch) -> torch.Tensor:
        """Logits [len(batch.requests), vocab] of one decode step, by replaying the bucket's graph."""
        bucket = self.bucket_for(len(batch.requests))
        self._fill(bucket, batch.requests)
        uses_lora = self.with_lora and any(request.adapter_slot != BASE_SLOT for request in batch.requests)
        bucket.graphs[uses_lora].replay()
        return bucket.logits[uses_lora][: len(batch.requests)]

    def _fill(self, bucket: _Bucket, requests) -> None:
        runner, page_size = self.runner, self.runner.block_size
        input_ids, positions, slot_mapping = [], [], []
        kv_indptr, page_indices, last_page_lens, seq_lens = [0], [], [], []
        seg_indptr, seg_slots = [0], []
        for request in requests:
            position = request.start_position
            seq_len = position + 1
            pages = request.block_table[: -(-seq_len // page_size)]
            input_ids.append(request.token_ids[0])
            positions.append(position)
            slot_mapping.append(pages[position // page_size] * page_size + position % page_size)
            page_indices.extend(pages)
            kv_indptr.append(len(page_indices))
            last_page_lens.append(seq_len - (len(pages) - 1) * page_size)
            seq_lens.append(seq_len)
            if seg_slots and seg_slots[-1] == request.adapter_slot:
                seg_indptr[-1] += 1
            else:
                seg_slots.append(request.adapter_slot)
                seg_indptr.append(seg_indptr[-1] + 1)
        count = len(requests)
        for _ in range(bucket.size - count):  # padding rows: base model, scratch page, sequence length 1
            input_ids.append(0)
            positions.append(0)
            slot_mapping.append(self.scratch_page * page_size)
            page_indices.append(self.scratch_page)
            kv_indptr.append(len(page_indices))
            last_page_lens.append(1)
            seq_lens.append(1)
        seg_indptr += [seg_indptr[-1]] * (bucket.size + 1 - len(seg_indptr))
        seg_slots += [BASE_SLOT] * (bucket.size - len(seg_slots))

        def copy(target: torch.Tensor, values: list[int]) -> None:
            target.copy_(torch.tensor(values, dtype=target.dtype), non_blocking=True)

        copy(bucket.input_ids, input_ids)
        copy(bucket.positions, positions)
        copy(bucket.slot_mapping, slot_mapping)
        copy(bucket.seg_indptr, seg_indptr)
        copy(bucket.seg_slots, seg_slots)

        def host(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.int32)

        bucket.attention = AttentionMetadata(
            is_prefill=False,
            qo_indptr=host(list(range(bucket.size + 1))),
            kv_indptr=host(kv_indptr),
            kv_page_indices=host(page_indices),
            kv_last_page_len=host(last_page_lens),
            seq_lens=host(seq_lens),
            slot_mapping=bucket.slot_mapping,
            page_size=page_size,
            query_lens_host=[1] * bucket.size,
            seq_lens_host=seq_lens,
        )
        runner.attention.plan(bucket.attention, graph_batch_size=bucket.size)
