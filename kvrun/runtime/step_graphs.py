"""Steps with prompt tokens, captured as CUDA graphs in pieces between the attention calls.

A decode step is captured whole (kvrun.runtime.cuda_graph). A step that carries prompt tokens (a prefill, or a
chunk of one beside running decodes) cannot be: FlashInfer's prefill attention plans for each step's lengths. Run
eagerly, though, such a step is bound by the host: an 8B model launches over a thousand kernels, and a mixed step
of a few hundred tokens then takes ~55 ms on an H200 where a decode step takes ~13. So everything between two
attention calls is captured, per bucket of token counts: embedding → first layer's q/k/v (K/V written into the cache
inside the piece), each layer's o_proj → MLP → next layer's q/k/v, and the last layer's MLP. A step replays the
pieces in order and runs each attention eagerly between them, planned for that step's real rows.

Everything a piece reads lives at a fixed address: token ids, positions, K/V slots, sequence lengths and LoRA
segments in per-bucket buffers, and the query and attention output in two buffers every bucket and layer share
(each piece copies its query into the first; the attention writes the second, which the next piece reads). A step
with fewer tokens than its bucket is padded with base-model tokens at position 0 that write into the scratch page;
the attention runs over the real tokens only, so padded rows of its output keep stale (finite) values whose rows
nothing samples. Segments are padded to one per token, so the LoRA kernels' grids never change. The final norm and
the output layer run eagerly on the rows that sample, with that step's own logits indices.

Pieces of every bucket share one memory pool with the decode graphs: they replay one step at a time, and what a
piece leaves for the next (hidden state, residual) is read before any other graph replays.
"""

from __future__ import annotations

import logging

import torch

from kvrun.runtime.forward_batch import BASE_SLOT, ForwardBatch, LoRABatchInfo, ScheduledBatch
from kvrun.runtime.step_layout import StepLayout, attention_metadata, fill_pending, layout_step, to_device

logger = logging.getLogger(__name__)

TOKEN_BUCKETS = (16, 32, 64, 128, 256, 384, 512, 640, 768, 1024, 1280, 1536, 1792, 2048)


def token_buckets(max_tokens: int) -> tuple[int, ...]:
    """The token counts captured for steps of up to max_tokens tokens (() when max_tokens is 0)."""
    if max_tokens <= 0:
        return ()
    return tuple(size for size in TOKEN_BUCKETS if size < max_tokens) + (max_tokens,)


class _Bucket:
    def __init__(self, size: int, device: torch.device) -> None:
        self.size = size
        self.input_ids = torch.zeros(size, dtype=torch.int64, device=device)
        self.positions = torch.zeros(size, dtype=torch.int64, device=device)
        self.slot_mapping = torch.zeros(size, dtype=torch.int64, device=device)
        self.token_seq_lens = torch.ones(size, dtype=torch.int64, device=device)
        self.seg_indptr = torch.zeros(size + 1, dtype=torch.int32, device=device)
        self.seg_slots = torch.full((size,), BASE_SLOT, dtype=torch.int32, device=device)
        # keyed by "runs the LoRA kernels": (pieces, attention calls between them, final hidden, final residual)
        self.captured: dict[bool, tuple[list[torch.cuda.CUDAGraph], list[tuple], torch.Tensor, torch.Tensor]] = {}


class _Recorder:
    """Installed on the attention backend while a bucket is captured: each attention call ends one piece and
    begins the next, and is recorded to run eagerly between them at replay."""

    def __init__(self, graphs: StepGraphs, size: int) -> None:
        self.owner, self.size = graphs, size
        self.pieces: list[torch.cuda.CUDAGraph] = []
        self.calls: list[tuple[torch.Tensor, object]] = []  # (the layer's KV cache, its attention variant)

    def begin(self) -> None:
        graph = torch.cuda.CUDAGraph()
        graph.capture_begin(pool=self.owner.pool)
        self.pieces.append(graph)

    def end(self) -> None:
        self.pieces[-1].capture_end()
        if self.owner.pool is None:
            self.owner.pool = self.pieces[-1].pool()

    def attention(self, q: torch.Tensor, kv_cache: torch.Tensor, variant) -> torch.Tensor:
        """q [tokens, heads, head_dim] of a captured piece: copied into the shared query buffer; the returned
        output buffer is what the attention will have written when the next piece replays."""
        self.owner.query[: self.size].copy_(q)
        self.end()
        self.calls.append((kv_cache, variant))
        self.begin()
        return self.owner.output[: self.size]


class StepGraphs:
    def __init__(self, runner, max_tokens: int, with_lora: bool, stream: torch.cuda.Stream) -> None:
        self.runner = runner
        self.with_lora = with_lora
        self.stream = stream
        self.pool = None
        self.scratch_page = runner.num_blocks  # the KV cache holds one page past the block manager's pool
        attention = runner.attention
        shape = (max_tokens, attention.num_heads, attention.head_dim)
        self.query = torch.zeros(shape, dtype=runner.dtype, device=runner.device)
        self.output = torch.zeros(shape, dtype=runner.dtype, device=runner.device)
        self.buckets = {size: _Bucket(size, runner.device) for size in token_buckets(max_tokens)}
        for size in sorted(self.buckets, reverse=True):  # largest first, so smaller pieces reuse its memory
            self._capture(self.buckets[size])
        logger.info("captured steps with prompt tokens in pieces for token counts %s", sorted(self.buckets))

    def bucket_for(self, num_tokens: int) -> _Bucket | None:
        for size in sorted(self.buckets):
            if size >= num_tokens:
                return self.buckets[size]
        return None

    def _capture(self, bucket: _Bucket) -> None:
        runner, attention, stream = self.runner, self.runner.attention, self.stream
        # Capture on one-token rows over the scratch page (the pieces never see the attention's row layout).
        layout = layout_step([], runner.block_size, pad_rows_to=bucket.size, scratch_page=self.scratch_page)
        metadata = self._fill(bucket, layout)
        for uses_lora in (True, False) if self.with_lora else (False,):
            batch = self._forward_batch(bucket, uses_lora, metadata, logits_indices=None)
            attention.plan(metadata)
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                runner.model.layer_stream(batch, runner.kv_cache)  # warm-up: Triton compiles outside the capture
            stream.synchronize()
            recorder = _Recorder(self, bucket.size)
            attention.capture = recorder
            try:
                with torch.cuda.stream(stream):
                    recorder.begin()
                    hidden, residual = runner.model.layer_stream(batch, runner.kv_cache)
                    recorder.end()
            finally:
                attention.capture = None
            torch.cuda.current_stream().wait_stream(stream)
            bucket.captured[uses_lora] = (recorder.pieces, recorder.calls, hidden, residual)

    def _forward_batch(self, bucket: _Bucket, uses_lora: bool, metadata, logits_indices) -> ForwardBatch:
        lora = LoRABatchInfo(bucket.seg_indptr, bucket.seg_slots) if uses_lora else None
        token_seq_lens = bucket.token_seq_lens if self.runner.needs_token_seq_lens else None
        return ForwardBatch(bucket.input_ids, bucket.positions, metadata, logits_indices, lora, token_seq_lens)

    def _fill(self, bucket: _Bucket, layout: StepLayout):
        """Copy the step's tokens and segments, padded to the bucket, into its buffers; the attention metadata of
        the real rows."""
        runner, size = self.runner, bucket.size
        count = len(layout.input_ids)
        pad = size - count
        block_size = runner.block_size
        scratch = [self.scratch_page * block_size + index % block_size for index in range(pad)]
        seg_indptr, seg_slots = list(layout.seg_indptr), list(layout.seg_slots)
        if pad:
            seg_indptr.append(size)
            seg_slots.append(BASE_SLOT)
        seg_indptr += [size] * (size + 1 - len(seg_indptr))
        seg_slots += [BASE_SLOT] * (size - len(seg_slots))

        def copy(target: torch.Tensor, values: list[int]) -> None:
            target.copy_(torch.tensor(values, dtype=target.dtype), non_blocking=True)

        copy(bucket.input_ids, layout.input_ids + [0] * pad)
        copy(bucket.positions, layout.positions + [0] * pad)
        copy(bucket.slot_mapping, layout.slot_mapping + scratch)
        copy(bucket.token_seq_lens, layout.token_seq_lens + [1] * pad)
        copy(bucket.seg_indptr, seg_indptr)
        copy(bucket.seg_slots, seg_slots)
        return attention_metadata(layout, True, block_size, bucket.slot_mapping[:count])

    def run(self, batch: ScheduledBatch, previous: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [rows that sample, vocab] of one step, replaying the pieces of the smallest bucket that holds it.
        previous: the last step's sampled tokens on the device (rows whose token is not on the host yet)."""
        runner = self.runner
        layout = layout_step(batch.requests, runner.block_size)
        count = len(layout.input_ids)
        bucket = self.bucket_for(count)
        metadata = self._fill(bucket, layout)
        fill_pending(bucket.input_ids, layout, previous)
        runner.attention.plan(metadata)
        uses_lora = self.with_lora and layout.uses_lora
        pieces, calls, hidden, residual = bucket.captured[uses_lora]
        query, output = self.query[:count], self.output[:count]
        for piece, (kv_cache, variant) in zip(pieces, calls):
            piece.replay()
            runner.attention.attend(query, kv_cache, variant, output)
        pieces[-1].replay()
        logits_indices = to_device(layout.logits_indices, torch.int64, runner.device)
        return runner.model.logits_of(hidden, residual, self._forward_batch(bucket, uses_lora, metadata, logits_indices))
