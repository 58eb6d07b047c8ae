"""LoRA shrink: out[i, t, :r] = scaling[i, s] * x[t] @ lora_a[i][s, :r].T, all slices of a layer in one launch.

Grid: (row tiles, slices x rank programs, split-K). A program loads one adapter's A tile once for a whole tile of rows
of that adapter and walks rank blocks `rank program, + rank programs, ...` up to the slot's own rank, so ranks below
the pool's max_rank cost neither loads nor programs. With an fp32 output it adds its partial sum over a slice of
in_features with atomics, so decode batches put enough programs in flight to stream the adapters' weights at HBM
speed. Decode configs use one rank program (the loop covers every rank block; x's tile is re-read from cache),
so the split-K choice does not depend on how far the pool pads ranks.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvrun.punica.triton.configs import ShrinkConfig, shrink_config
from kvrun.punica.triton.tiles import groups_block, locate_tile, max_tiles, tile_tokens

# Slice weights are passed as separate pointer arguments (no device pointer table to keep alive or to copy
# during capture); layers with more slices are launched in chunks of this many.
MAX_SLICES_PER_LAUNCH = 3


# num_groups varies step to step: not specialized on (== 1, divisible by 16), so it never picks a new variant.
@triton.jit(do_not_specialize=["num_groups"])
def _shrink_kernel(
    x_ptr,
    a0_ptr,
    a1_ptr,
    a2_ptr,
    out_ptr,
    token_order_ptr,
    group_starts_ptr,
    group_slots_ptr,
    ranks_ptr,
    scalings_ptr,
    num_groups,
    in_features,
    k_per_split,
    stride_x_token,
    stride_a_slot,
    stride_a_rank,
    stride_out_slice,
    stride_ranks_slice,
    stride_scalings_slice,
    NUM_SLICES: tl.constexpr,
    MAX_RANK: tl.constexpr,
    RANK_PROGRAMS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_GROUPS: tl.constexpr,
    SORTED: tl.constexpr,
    ATOMIC: tl.constexpr,
    IEEE_FP32: tl.constexpr,
):
    slot, first_row, end_row = locate_tile(
        tl.program_id(0), group_starts_ptr, group_slots_ptr, num_groups, BLOCK_M, BLOCK_GROUPS
    )
    if slot < 0:
        return
    slice_id = tl.program_id(1) // RANK_PROGRAMS
    first_rank = (tl.program_id(1) % RANK_PROGRAMS) * BLOCK_R
    # Clamped so a rank table that overstates a slot never reads or writes past its padded buffers.
    rank = tl.minimum(tl.load(ranks_ptr + slice_id * stride_ranks_slice + slot), MAX_RANK)
    if first_rank >= rank:
        return

    a_ptr = a0_ptr
    if NUM_SLICES > 1:
        if slice_id == 1:
            a_ptr = a1_ptr
    if NUM_SLICES > 2:
        if slice_id == 2:
            a_ptr = a2_ptr

    tokens, row_mask = tile_tokens(token_order_ptr, first_row, end_row, BLOCK_M, SORTED)
    scaling = tl.load(scalings_ptr + slice_id * stride_scalings_slice + slot)
    k_start = tl.program_id(2) * k_per_split
    for rank_start in range(first_rank, rank, RANK_PROGRAMS * BLOCK_R):
        rank_offsets = rank_start + tl.arange(0, BLOCK_R)
        rank_mask = rank_offsets < rank
        k_offsets = k_start + tl.arange(0, BLOCK_K)
        x_ptrs = x_ptr + tokens[:, None] * stride_x_token + k_offsets[None, :]
        a_ptrs = (
            a_ptr + slot.to(tl.int64) * stride_a_slot + rank_offsets[None, :] * stride_a_rank + k_offsets[:, None]
        )
        accumulator = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k in range(0, k_per_split, BLOCK_K):
            k_mask = k_offsets + k < in_features
            x_tile = tl.load(x_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            a_tile = tl.load(a_ptrs, mask=k_mask[:, None] & rank_mask[None, :], other=0.0)
            if IEEE_FP32:  # fp32 inputs: full-precision products rather than TF32's 10-bit mantissa
                accumulator += tl.dot(x_tile, a_tile, input_precision="ieee")
            else:
                accumulator += tl.dot(x_tile, a_tile)
            x_ptrs += BLOCK_K
            a_ptrs += BLOCK_K
        accumulator *= scaling

        out_ptrs = out_ptr + slice_id * stride_out_slice + tokens[:, None] * MAX_RANK + rank_offsets[None, :]
        out_mask = row_mask[:, None] & rank_mask[None, :]
        if ATOMIC:
            tl.atomic_add(out_ptrs, accumulator, mask=out_mask, sem="relaxed")
        else:
            tl.store(out_ptrs, accumulator.to(out_ptr.dtype.element_ty), mask=out_mask)


def launch_shrink(
    x: torch.Tensor,  # [num_tokens, in_features]
    lora_a: list[torch.Tensor],  # num_slices x [num_slots, max_rank, in_features], same shape and strides
    token_order: torch.Tensor | None,  # [num_tokens] int64 grouped row ids, None = rows contiguous per group
    group_starts: torch.Tensor,  # [num_groups + 1] int32
    group_slots: torch.Tensor,  # [num_groups] int32, -1 = base
    ranks: torch.Tensor,  # [num_slices, num_slots] int32
    scalings: torch.Tensor,  # [num_slices, num_slots] float32
    out: torch.Tensor,  # [num_slices, num_tokens, max_rank], overwritten
    config: ShrinkConfig | None = None,  # None = chosen from the shapes (benchmarks pass their own)
) -> None:
    _check_shrink(x, lora_a, ranks, scalings, out)
    out.zero_()  # base rows and columns past each rank stay zero; split-K programs add into it
    num_tokens, in_features = x.shape
    num_groups = group_slots.shape[0]
    if num_tokens == 0 or num_groups == 0:
        return
    max_rank = lora_a[0].shape[1]
    for first in range(0, len(lora_a), MAX_SLICES_PER_LAUNCH):
        chunk = lora_a[first : first + MAX_SLICES_PER_LAUNCH]
        chosen = config or shrink_config(
            num_tokens, num_groups, in_features, max_rank, len(chunk), out.dtype == torch.float32, x.device
        )
        rank_programs = min(chosen.rank_programs, triton.cdiv(max_rank, chosen.block_r))
        k_per_split = triton.cdiv(triton.cdiv(in_features, chosen.split_k), chosen.block_k) * chosen.block_k
        grid = (max_tiles(num_tokens, num_groups, chosen.block_m), len(chunk) * rank_programs, chosen.split_k)
        padded = chunk + [chunk[0]] * (MAX_SLICES_PER_LAUNCH - len(chunk))
        _shrink_kernel[grid](
            x,
            *padded,
            out[first:],
            token_order if token_order is not None else group_starts,
            group_starts,
            group_slots,
            ranks[first:],
            scalings[first:],
            num_groups,
            in_features,
            k_per_split,
            x.stride(0),
            chunk[0].stride(0),
            chunk[0].stride(1),
            out.stride(0),
            ranks.stride(0),
            scalings.stride(0),
            NUM_SLICES=len(chunk),
            MAX_RANK=max_rank,
            RANK_PROGRAMS=rank_programs,
            BLOCK_M=chosen.block_m,
            BLOCK_R=chosen.block_r,
            BLOCK_K=chosen.block_k,
            BLOCK_GROUPS=groups_block(num_groups),
            SORTED=token_order is not None,
            ATOMIC=chosen.split_k > 1,
            IEEE_FP32=x.dtype == torch.float32,
            num_warps=chosen.num_warps,
            num_stages=chosen.num_stages,
        )


def _check_shrink(x, lora_a, ranks, scalings, out) -> None:
    first = lora_a[0]
    for a in lora_a:
        if a.shape != first.shape or a.stride() != first.stride() or a.dtype != x.dtype:
            raise ValueError("lora_a slices must share shape, strides and x's dtype")
    if x.stride(1) != 1 or first.stride(2) != 1 or out.stride()[1:] != (first.shape[1], 1):
        raise ValueError("x and lora_a need contiguous last dimensions, out contiguous [num_tokens, max_rank] slices")
    if out.shape != (len(lora_a), x.shape[0], first.shape[1]):
        raise ValueError(f"out is {tuple(out.shape)}, expected {(len(lora_a), x.shape[0], first.shape[1])}")
    for name, table in (("ranks", ranks), ("scalings", scalings)):
        if table.shape != (len(lora_a), first.shape[0]) or table.stride(1) != 1:
            raise ValueError(f"{name} must be [num_slices, num_slots] with contiguous rows")
