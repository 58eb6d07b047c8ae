"""LoRA by the definition, one row at a time with plain matmuls: what the reference ops are checked against."""

from __future__ import annotations

import torch

from kvrun.punica.ref import PLAIN, SCALE_SHIFT
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
    """-> (shrink output [num_slices, num_tokens, max_rank], delta [num_tokens, out_features]), the delta without the
    case's epilogue (see naive_expand)."""
    shrunk = torch.zeros(case.num_slices, case.num_tokens, case.max_rank, dtype=case.x.dtype)
    delta = torch.zeros(case.num_tokens, case.out_features, dtype=case.x.dtype)
    for row, slot in enumerate(row_slots):
        if slot < 0:
            continue
        for i, (a, b) in enumerate(zip(case.lora_a, case.lora_b, strict=True)):
            rank = int(case.ranks[i, slot])
            shrunk[i, row, :rank] = case.scalings[i, slot] * (a[slot, :rank] @ case.x[row])
            columns = slice(case.slice_offsets[i], case.slice_offsets[i] + b.shape[2])
            delta[row, columns] = shrunk[i, row, :rank] @ b[slot, :rank]
    return shrunk, delta


def naive_expand(case: LoRACase, row_slots: list[int], base: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """The expand's output from the base output and naive_lora's delta, with the case's epilogue row by row."""
    out = base + delta
    if case.epilogue is None:
        return out
    for row, slot in enumerate(row_slots):
        if slot < 0:
            continue
        for i, b in enumerate(case.lora_b):
            mode = int(case.epilogue.modes[i, slot])
            if int(case.ranks[i, slot]) == 0 or mode == PLAIN:
                continue
            columns = slice(case.slice_offsets[i], case.slice_offsets[i] + b.shape[2])
            if mode == SCALE_SHIFT:
                out[row, columns] = case.epilogue.scale[i][slot] * out[row, columns]
            out[row, columns] += case.epilogue.shift[i][slot]
    return out
