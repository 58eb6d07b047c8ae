"""LoRA by the definition, one row at a time with plain matmuls: what the reference ops are checked against."""

from __future__ import annotations

import torch

from tests.punica.patterns import LoRACase


def row_slots_from_segments(case: LoRACase) -> list[int]:
    """Slot of each row as the SGMV segments state it (-1 for rows outside every segment)."""
    slots = [-1] * case.num_tokens
    bounds = case.seg_indptr.tolist()
    for segment, slot in enumerate(case.seg_slots.tolist()):
        for row in range(bounds[segment], bounds[segment + 1]):
            slots[row] = slot
    return slots


def naive_lora(case: LoRACase, row_slots: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (shrink output [num_slices, num_tokens, max_rank], delta [num_tokens, out_features])."""
    shrunk = torch.zeros(case.num_slices, case.num_tokens, case.max_rank, dtype=case.x.dtype)
    delta = torch.zeros(case.num_tokens, case.out_features, dtype=case.x.dtype)
    for row, slot in enumerate(row_slots):
        if slot < 0:
            continue
        for i, (a, b) in enumerate(zip(case.lora_a, case.lora_b, strict=True)):
            rank = int(case.ranks[i, slot])
            shrunk[i, row, :rank] = case.scalings[i, slot] * (a[slot, :rank] @ case.x[row])
            columns = slice(case.slice_offsets[i], case.slice_offsets[i] + b.shape[1])
            delta[row, columns] = b[slot, :, :rank] @ shrunk[i, row, :rank]
    return shrunk, delta
