"""The runtime's input (ScheduledBatch, host lists) and the forward pass's input (ForwardBatch, device tensors)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvrun.runtime.attention.base import AttentionMetadata

BASE_SLOT = -1  # adapter slot of a row that uses the base model alone


@dataclass(slots=True)
class ScheduledRequest:
    """One request's share of a step, as the scheduler hands it to the model runner."""

    request_id: str
    token_ids: list[int]  # tokens to run this step (a prompt chunk, or the last sampled token)
    start_position: int  # position of token_ids[0] in the sequence
    block_table: list[int]  # KV pages owning positions 0 .. start_position + len(token_ids) - 1
    adapter_slot: int  # BASE_SLOT or a resident adapter slot
    temperature: float
    top_p: float
    top_k: int
    generator: torch.Generator | None
    num_logprobs: int | None  # top-N logprobs to return with the sampled token; None = none
    samples: bool = True  # False: a prompt chunk short of the prompt's end, which only fills the KV cache
    # first position adapter_slot applies to; the positions before it run the base model (an activated LoRA)
    adapter_start: int = 0
    # >= 0: the row's last token is not on the host yet (async scheduling): it is this row of the previous step's
    # sampled tokens on the device, and token_ids holds a 0 in its place
    previous_row: int = -1
    # the sequence length a length-dependent rotary embedding (LongRoPE) rotates this row's tokens by, at least: the
    # prompt's, so every chunk of a prompt rotates as the whole prompt does in one forward pass (HF's reference); a
    # token past the prompt rotates by its own position + 1, as the decode step that made it did
    rope_length: int = 0


@dataclass(slots=True)
class ScheduledBatch:
    is_prefill: bool  # False only when every row is one token that samples (a pure decode step: CUDA graphs)
    requests: list[ScheduledRequest]  # grouped by adapter_slot, so LoRA segments are contiguous
    full_copies: bool = False  # a row's adapter has a whole copy of a vocabulary layer (runs eagerly, no graph)

    @property
    def num_tokens(self) -> int:
        return sum(len(request.token_ids) for request in self.requests)

    def sampling_requests(self) -> list[ScheduledRequest]:
        """The rows that produce a token this step, in batch order (logits come back for these alone)."""
        return [request for request in self.requests if request.samples]


@dataclass(slots=True)
class LoRABatchInfo:
    """Which adapter slot each row of the step uses (see kvrun.punica.ref for the op semantics).

    The scheduler groups every batch by adapter slot, decode included, so a step is always a list of segments and
    both phases use the segment (SGMV) ops: one matmul per adapter rather than a weight gather per token (1.7x
    faster decode on CPU). The per-token BGMV ops in kvrun.punica serve callers whose rows are not grouped.
    """

    seg_indptr: torch.Tensor  # [num_segments + 1] int32, token offsets of runs of one slot
    seg_slots: torch.Tensor  # [num_segments] int32, -1 = base model
    # Whether a row uses an adapter's whole copy of a vocabulary layer (modules_to_save): such steps run eagerly
    full_copies: bool = False

    def for_rows(self, rows: torch.Tensor) -> LoRABatchInfo:
        """The same segments over a subset of the step's tokens, `rows` [n] int64 ascending (the rows whose logits
        are computed, for the output layer's LoRA): segment g keeps the rows inside its token range. Computed on the
        device, so a CUDA graph replays it."""
        return LoRABatchInfo(torch.searchsorted(rows, self.seg_indptr.long()).int(), self.seg_slots, self.full_copies)

    def token_slots(self, num_tokens: int) -> torch.Tensor:
        """[num_tokens] each token's slot (-1: base)."""
        lengths = self.seg_indptr[1:] - self.seg_indptr[:-1]
        return torch.repeat_interleave(self.seg_slots, lengths, output_size=num_tokens)


@dataclass(slots=True)
class ForwardBatch:
    input_ids: torch.Tensor  # [num_tokens] int64
    positions: torch.Tensor  # [num_tokens] int64
    attention: AttentionMetadata
    logits_indices: torch.Tensor  # [sampling rows] int64, row of each sampling request's last token
    lora: LoRABatchInfo | None = field(default=None)  # None when no row of the step uses an adapter
    # [num_tokens] int64, each token's sequence length after this step; set only for models whose rotary
    # frequencies depend on it (dynamic NTK, LongRoPE)
    token_seq_lens: torch.Tensor | None = field(default=None)
