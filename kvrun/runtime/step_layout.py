"""The host-side layout of one step, built by one function for eager steps and captured decode graphs alike.

A step is a list of rows (ScheduledRequest); each row runs `token_ids` from `start_position` against its block
table. The layout lists, per token: input id, position, K/V slot and sequence length; per row: the paged-KV arrays
FlashInfer plans from and the row of its last token; per LoRA segment: the token range and adapter slot. A graph
bucket asks for padding: padded rows use the base model, sit at position 0 and write into a scratch page no request
owns, and padded segments are empty, so a captured launch grid never changes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvrun.runtime.attention.base import AttentionMetadata
from kvrun.runtime.forward_batch import BASE_SLOT, ScheduledRequest


@dataclass(slots=True)
class StepLayout:
    input_ids: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    slot_mapping: list[int] = field(default_factory=list)
    token_seq_lens: list[int] = field(default_factory=list)
    qo_indptr: list[int] = field(default_factory=lambda: [0])
    kv_indptr: list[int] = field(default_factory=lambda: [0])
    page_indices: list[int] = field(default_factory=list)
    last_page_lens: list[int] = field(default_factory=list)
    seq_lens: list[int] = field(default_factory=list)
    query_lens: list[int] = field(default_factory=list)
    seg_indptr: list[int] = field(default_factory=lambda: [0])
    seg_slots: list[int] = field(default_factory=list)
    samples: list[bool] = field(default_factory=list)  # per row: False for a prompt chunk short of the prompt's end
    # tokens still on their way to the host (async scheduling): their index in input_ids, and the row of the previous
    # step's sampled tokens (on the device) that holds each
    pending_tokens: list[int] = field(default_factory=list)
    pending_rows: list[int] = field(default_factory=list)

    @property
    def logits_indices(self) -> list[int]:
        """The last token of each row that samples (logits are computed for those rows alone)."""
        return [end - 1 for end, samples in zip(self.qo_indptr[1:], self.samples) if samples]

    @property
    def uses_lora(self) -> bool:
        return any(slot != BASE_SLOT for slot in self.seg_slots)

    def _add_row(
        self, token_ids: list[int], start: int, pages: list[int], slot: int, block_size: int, samples: bool = True,
        adapter_start: int = 0, rope_length: int = 0,
    ) -> None:
        count = len(token_ids)
        self.samples.append(samples)
        seq_len = start + count
        self.input_ids.extend(token_ids)
        for position in range(start, seq_len):
            self.positions.append(position)
            self.slot_mapping.append(pages[position // block_size] * block_size + position % block_size)
        # Each token's rotary length: the prompt's for prompt tokens, its own sequence length past it (as a decode step
        # had it), so recomputing a preempted request rotates every token as its first computation did.
        self.token_seq_lens.extend(max(position + 1, rope_length) for position in range(start, seq_len))
        self.page_indices.extend(pages)
        self.qo_indptr.append(self.qo_indptr[-1] + count)
        self.kv_indptr.append(len(self.page_indices))
        self.last_page_lens.append(seq_len - (len(pages) - 1) * block_size)
        self.seq_lens.append(seq_len)
        self.query_lens.append(count)
        # An activated LoRA's row runs the base model before its adapter start: a base segment, then the adapter's.
        num_base = min(count, max(0, adapter_start - start)) if slot != BASE_SLOT else 0
        self._add_segment(BASE_SLOT, num_base)
        self._add_segment(slot, count - num_base)

    def _add_segment(self, slot: int, count: int) -> None:
        if not count:
            return
        if self.seg_slots and self.seg_slots[-1] == slot:
            self.seg_indptr[-1] += count
        else:
            self.seg_slots.append(slot)
            self.seg_indptr.append(self.seg_indptr[-1] + count)


def layout_step(
    requests: list[ScheduledRequest], block_size: int, pad_rows_to: int = 0, scratch_page: int = -1
) -> StepLayout:
    """Rows must arrive grouped by adapter slot (each adapter's rows form one LoRA segment)."""
    layout = StepLayout()
    for request in requests:
        seq_len = request.start_position + len(request.token_ids)
        pages = request.block_table[: -(-seq_len // block_size)]
        layout._add_row(
            request.token_ids, request.start_position, pages, request.adapter_slot, block_size, request.samples,
            request.adapter_start, request.rope_length,
        )
        if request.previous_row >= 0:
            layout.pending_tokens.append(len(layout.input_ids) - 1)
            layout.pending_rows.append(request.previous_row)
    for _ in range(pad_rows_to - len(requests)):
        layout._add_row([0], 0, [scratch_page], BASE_SLOT, block_size)
    if pad_rows_to:  # one segment per row at most: pad with empty base-model segments
        layout.seg_indptr += [layout.seg_indptr[-1]] * (pad_rows_to + 1 - len(layout.seg_indptr))
        layout.seg_slots += [BASE_SLOT] * (pad_rows_to - len(layout.seg_slots))
    return layout


def to_device(values, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Host numbers (a list, or a CPU tensor) as a tensor on device, queued in stream order without the host
    waiting. torch.tensor(values, device=cuda) and tensor.to(cuda) first wait for every kernel queued on the stream
    (a blocking copy synchronizes it): under async scheduling that would hold the host until the step in flight
    ends, and the next step could not be prepared meanwhile."""
    host = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    return host.to(device=device, dtype=dtype, non_blocking=True)


def fill_pending(input_ids: torch.Tensor, layout: StepLayout, previous: torch.Tensor | None) -> None:
    """Put the tokens still on their way to the host into the step's input ids [tokens] on the device, from the
    previous step's sampled tokens (previous [rows] int64): device-to-device, no wait for the host."""
    if not layout.pending_tokens:
        return
    if previous is None:
        raise RuntimeError("a step has tokens still on their way to the host, but no previous step's tokens")
    device = input_ids.device
    rows = to_device(layout.pending_rows, torch.int64, device)
    where = to_device(layout.pending_tokens, torch.int64, device)
    input_ids.index_copy_(0, where, previous.index_select(0, rows))


def attention_metadata(
    layout: StepLayout, is_prefill: bool, page_size: int, slot_mapping: torch.Tensor
) -> AttentionMetadata:
    def host(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int32)

    return AttentionMetadata(
        is_prefill=is_prefill,
        qo_indptr=host(layout.qo_indptr),
        kv_indptr=host(layout.kv_indptr),
        kv_page_indices=host(layout.page_indices),
        kv_last_page_len=host(layout.last_page_lens),
        seq_lens=host(layout.seq_lens),
        slot_mapping=slot_mapping,
        page_size=page_size,
        query_lens_host=layout.query_lens,
        seq_lens_host=layout.seq_lens,
    )
