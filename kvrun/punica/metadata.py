"""Rows grouped by adapter slot: the one layout every Triton LoRA launch reads.

SGMV (prefill) batches already come grouped: segment g owns rows seg_indptr[g]:seg_indptr[g+1] and uses slot
seg_slots[g], so `SlotGroups.from_segments` only wraps those tensors. BGMV (decode) gives one slot per token in any
order; `LoRAKernelMeta.group_tokens` sorts the tokens by slot on the device so that each adapter's weights are read
once per block of rows instead of once per token.

CUDA graphs: build one `LoRAKernelMeta` per engine (sized for the largest batch) before capture, call
`group_tokens(token_slots)` once per step (inside the captured region or before replay; it only writes into the
buffers allocated here), and pass the returned `SlotGroups` to every LoRA op of the step. Nothing here reads device
values on the host.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class SlotGroups:
    """Semantics:
    group g uses slot group_slots[g] (-1 = base model: no work) for the rows
        token_order[group_starts[g] : group_starts[g+1]]   when token_order is given (BGMV, sorted tokens),
        group_starts[g] : group_starts[g+1]                when token_order is None (SGMV, contiguous rows).
    Rows that belong to no group are base rows.
    """

    token_order: torch.Tensor | None  # [num_tokens] int64 row ids grouped by slot, or None for contiguous rows
    group_starts: torch.Tensor  # [num_groups + 1] int32 offsets (into token_order, or rows)
    group_slots: torch.Tensor  # [num_groups] int32 adapter slot of each group, -1 = base

    @classmethod
    def from_segments(cls, seg_indptr: torch.Tensor, seg_slots: torch.Tensor) -> SlotGroups:
        return cls(token_order=None, group_starts=seg_indptr, group_slots=seg_slots)

    @property
    def num_groups(self) -> int:
        return self.group_slots.shape[0]


class LoRAKernelMeta:
    """Preallocated buffers for grouping decode tokens by slot (one group per slot, in slot order).

    Buffers (all on `device`, allocated once):
        sorted_slots:  [max_tokens] int32   scratch: token slots in ascending order (-1 first)
        token_order:   [max_tokens] int64   token ids in that order (stable: ties keep batch order)
        group_starts:  [num_slots + 1] int32   tokens of slot s are token_order[group_starts[s]:group_starts[s+1]]
        group_slots:   [num_slots] int32   0, 1, ..., num_slots - 1
    """

    def __init__(self, max_tokens: int, num_slots: int, device: torch.device | str) -> None:
        self.max_tokens = max_tokens
        self.num_slots = num_slots
        self._init_buffers(torch.device(device))

    def _init_buffers(self, device: torch.device) -> None:
        self.sorted_slots = torch.empty(self.max_tokens, dtype=torch.int32, device=device)
        self.token_order = torch.empty(self.max_tokens, dtype=torch.int64, device=device)
        self.group_starts = torch.zeros(self.num_slots + 1, dtype=torch.int32, device=device)
        # 0..num_slots: the searchsorted queries (where each slot, and "past the last slot", starts in sorted
        # order); its first num_slots entries are the group slots.
        self._slot_range = torch.arange(self.num_slots + 1, dtype=torch.int32, device=device)
        self.group_slots = self._slot_range[: self.num_slots]

    def group_tokens(self, token_slots: torch.Tensor) -> SlotGroups:
        """Semantics:
            order = stable argsort(token_slots)
            group_starts[s] = #{t : token_slots[t] < s}  for s in 0..num_slots
        token_slots: [num_tokens] int32, -1 = base, values < num_slots, num_tokens <= max_tokens.
        Base tokens sort first and fall before group 0, so no group (and no kernel program) covers them.
        """
        num_tokens = token_slots.shape[0]
        if num_tokens > self.max_tokens:
            raise ValueError(f"{num_tokens} tokens exceed the {self.max_tokens} this LoRAKernelMeta was sized for")
        sorted_slots = self.sorted_slots[:num_tokens]
        token_order = self.token_order[:num_tokens]
        torch.sort(token_slots.to(torch.int32), stable=True, out=(sorted_slots, token_order))
        torch.searchsorted(sorted_slots, self._slot_range, out_int32=True, out=self.group_starts)
        return SlotGroups(token_order=token_order, group_starts=self.group_starts, group_slots=self.group_slots)


def group_tokens(token_slots: torch.Tensor, num_slots: int) -> SlotGroups:
    """`LoRAKernelMeta.group_tokens` into fresh tensors: for eager callers without a per-step meta (a sort and a
    search per call; engines build one LoRAKernelMeta per step instead)."""
    slot_range = _slot_range(num_slots, token_slots.device)
    sorted_slots, token_order = torch.sort(token_slots.to(torch.int32), stable=True)
    group_starts = torch.searchsorted(sorted_slots, slot_range, out_int32=True)
    return SlotGroups(token_order=token_order, group_starts=group_starts, group_slots=slot_range[:num_slots])


_SLOT_RANGES: dict[tuple[torch.device, int], torch.Tensor] = {}


def _slot_range(num_slots: int, device: torch.device) -> torch.Tensor:
    """arange(num_slots + 1) int32, kept per device: a constant, so calls need not launch a kernel to rebuild it.
    Not cached while a CUDA graph is being captured: its contents would only appear on replay."""
    key = (device, num_slots)
    if key not in _SLOT_RANGES:
        slot_range = torch.arange(num_slots + 1, dtype=torch.int32, device=device)
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return slot_range
        _SLOT_RANGES[key] = slot_range
    return _SLOT_RANGES[key]
