"""Plain-torch LoRA ops: the semantics every backend must reproduce.

A LoRA-wrapped linear has `num_slices` output slices (q/k/v of a fused qkv projection, gate/up of a fused MLP, or one
slice). Each slice has its own stacked adapter weights, one entry per adapter slot:

    lora_a[i]: [num_slots, max_rank, in_features]
    lora_b[i]: [num_slots, max_rank, out_features_i]   (rank-major: a slot's first r rows are one contiguous block)
    ranks:     [num_slices, num_slots] int32   rank of slot s for slice i; 0 = the adapter leaves that module alone
    scalings:  [num_slices, num_slots] float32 lora_alpha / r (or / sqrt(r) for rsLoRA) of slot s for slice i: each
                                               module has its own (PEFT's rank_pattern / alpha_pattern)

Each slice of each slot runs at its own rank: no work is done for columns past it (the padding past a slot's rank
may hold anything).

Rows are matched to slots either by segments (SGMV: prefill, rows of one request are contiguous and the batch is
grouped by slot) or per token (BGMV: decode). Slot -1 means "base model": no delta, and shrink writes zeros.

The expand may finish each row's output slice by what its slot's adapter adds beyond the delta (an `ExpandEpilogue`:
PEFT's lora_bias, DoRA's per-feature rescaling), on the rows of that slot alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

# ExpandEpilogue.modes
PLAIN = 0  # out += delta
SHIFT = 1  # out += delta + shift                 (lora_bias: shift = scaling * lora_B.bias)
SCALE_SHIFT = 2  # out = scale * (out + delta) + shift  (DoRA: scale = m / ||W + scaling B A||, shift = (1 - scale) b)


@dataclass(frozen=True, slots=True)
class ExpandEpilogue:
    """Per slice and slot, what a row's output gets beyond the LoRA delta; applied only where the slot's rank for the
    slice is non-zero (an adapter that leaves a module alone changes nothing there).

        modes[i, s] == PLAIN:        out[t, cols_i] += delta
        modes[i, s] == SHIFT:        out[t, cols_i] += delta + shift[i][s]
        modes[i, s] == SCALE_SHIFT:  out[t, cols_i] = scale[i][s] * (out[t, cols_i] + delta) + shift[i][s]
    (elementwise over the slice's columns, computed in fp32). DoRA's y = m/||W + s·BA|| * (x W^T + s·x A^T B^T) + b
    is SCALE_SHIFT with shift = (1 - scale) * b, since the base output `out` already holds the bias b.
    """

    modes: torch.Tensor  # [num_slices, num_slots] int32
    scale: Sequence[torch.Tensor]  # num_slices x [num_slots, out_features_i] float32
    shift: Sequence[torch.Tensor]  # num_slices x [num_slots, out_features_i] float32 or the weights' dtype


def sgmv_shrink(
    x: torch.Tensor,  # [num_tokens, in_features]
    lora_a: Sequence[torch.Tensor],  # num_slices x [num_slots, max_rank, in_features]
    seg_indptr: torch.Tensor,  # [num_segments + 1] int32, token offsets
    seg_slots: torch.Tensor,  # [num_segments] int32, -1 = base
    ranks: torch.Tensor,  # [num_slices, num_slots] int32
    scalings: torch.Tensor,  # [num_slices, num_slots] float32
    out: torch.Tensor,  # [num_slices, num_tokens, max_rank], overwritten
) -> None:
    """Semantics:
        for each segment g with slot s = seg_slots[g], rows t in seg_indptr[g]:seg_indptr[g+1], slice i, r = ranks[i, s]:
            out[i, t, :r] = scalings[i, s] * x[t] @ lora_a[i][s, :r].T
            out[i, t, r:] = 0                       (and out[i, t] = 0 for s == -1)
    """
    out.zero_()
    # Host copies of the small tables: indexing a tensor per segment costs more than the segment's matmul on CPU.
    bounds, slice_ranks, scales = seg_indptr.tolist(), ranks.tolist(), scalings.tolist()
    for g, slot in enumerate(seg_slots.tolist()):
        if slot < 0:
            continue
        rows = slice(bounds[g], bounds[g + 1])
        for i, a in enumerate(lora_a):
            rank = slice_ranks[i][slot]
            if rank == 0:
                continue
            out[i, rows, :rank] = (x[rows] @ a[slot, :rank].T) * scales[i][slot]


def sgmv_expand(
    y: torch.Tensor,  # [num_slices, num_tokens, max_rank]
    lora_b: Sequence[torch.Tensor],  # num_slices x [num_slots, max_rank, out_features_i]
    seg_indptr: torch.Tensor,  # [num_segments + 1] int32
    seg_slots: torch.Tensor,  # [num_segments] int32, -1 = base
    ranks: torch.Tensor,  # [num_slices, num_slots] int32
    out: torch.Tensor,  # [num_tokens, sum(out_features_i)], accumulated in place
    slice_offsets: Sequence[int],  # [num_slices] column where slice i starts in out
    epilogue: ExpandEpilogue | None = None,
) -> None:
    """Semantics:
        for each segment g with slot s >= 0, rows t, slice i, r = ranks[i, s] > 0, o = slice_offsets[i]:
            out[t, o : o + out_features_i] += y[i, t, :r] @ lora_b[i][s, :r]
            (finished as the epilogue's mode for (i, s) says, when one is given)
    """
    bounds, slice_ranks = seg_indptr.tolist(), ranks.tolist()
    modes = epilogue.modes.tolist() if epilogue is not None else None
    for g, slot in enumerate(seg_slots.tolist()):
        if slot < 0:
            continue
        rows = slice(bounds[g], bounds[g + 1])
        for i, b in enumerate(lora_b):
            rank = slice_ranks[i][slot]
            if rank == 0:
                continue
            cols = slice(slice_offsets[i], slice_offsets[i] + b.shape[2])
            delta = y[i, rows, :rank] @ b[slot, :rank]
            mode = modes[i][slot] if modes is not None else PLAIN
            if mode == PLAIN:
                out[rows, cols] += delta
                continue
            result = out[rows, cols].float() + delta.float()
            if mode == SCALE_SHIFT:
                result = result * epilogue.scale[i][slot]
            out[rows, cols] = (result + epilogue.shift[i][slot].float()).to(out.dtype)


def bgmv_shrink(
    x: torch.Tensor,  # [num_tokens, in_features]
    lora_a: Sequence[torch.Tensor],  # num_slices x [num_slots, max_rank, in_features]
    token_slots: torch.Tensor,  # [num_tokens] int32, -1 = base
    ranks: torch.Tensor,  # [num_slices, num_slots] int32
    scalings: torch.Tensor,  # [num_slices, num_slots] float32
    out: torch.Tensor,  # [num_slices, num_tokens, max_rank], overwritten
) -> None:
    """Semantics: sgmv_shrink with one segment per token (slot token_slots[t])."""
    active = token_slots >= 0
    slots = token_slots.clamp(min=0).long()
    rank_positions = torch.arange(out.shape[-1], device=x.device)
    for i, a in enumerate(lora_a):
        # Zero the columns past each row's rank so padded weights never leak into the result.
        keep = (rank_positions[None, :] < ranks[i][slots][:, None]) & active[:, None]
        delta = torch.bmm(a[slots], x.unsqueeze(-1)).squeeze(-1)  # [num_tokens, max_rank]
        out[i] = torch.where(keep, delta * scalings[i][slots].to(x.dtype)[:, None], torch.zeros_like(delta))


def bgmv_expand(
    y: torch.Tensor,  # [num_slices, num_tokens, max_rank]
    lora_b: Sequence[torch.Tensor],  # num_slices x [num_slots, max_rank, out_features_i]
    token_slots: torch.Tensor,  # [num_tokens] int32, -1 = base
    ranks: torch.Tensor,  # [num_slices, num_slots] int32
    out: torch.Tensor,  # [num_tokens, sum(out_features_i)], accumulated in place
    slice_offsets: Sequence[int],
    epilogue: ExpandEpilogue | None = None,
) -> None:
    """Semantics: sgmv_expand with one segment per token; rows with slot -1 are left untouched."""
    active = token_slots >= 0
    slots = token_slots.clamp(min=0).long()
    rank_positions = torch.arange(y.shape[-1], device=y.device)
    for i, b in enumerate(lora_b):
        keep = (rank_positions[None, :] < ranks[i][slots][:, None]) & active[:, None]
        masked = torch.where(keep, y[i], torch.zeros_like(y[i]))
        delta = torch.bmm(masked.unsqueeze(1), b[slots]).squeeze(1)  # [num_tokens, out_features_i]
        cols = slice(slice_offsets[i], slice_offsets[i] + b.shape[2])
        if epilogue is None:
            out[:, cols] += delta
            continue
        modes = torch.where(active & (ranks[i][slots] > 0), epilogue.modes[i][slots], PLAIN)[:, None]
        scale = torch.where(modes == SCALE_SHIFT, epilogue.scale[i][slots], 1.0)
        shift = torch.where(modes == PLAIN, 0.0, epilogue.shift[i][slots].float())
        finished = scale * (out[:, cols].float() + delta.float()) + shift
        out[:, cols] = torch.where(modes == PLAIN, out[:, cols] + delta, finished.to(out.dtype))
