"""LoRA expand: out[t, o_i : o_i + n_i] += y[i, t, :r] @ lora_b[i][s, :r], all slices of a layer in one launch.

Grid: (row tiles, column blocks of all slices laid end to end). Each program reads one adapter's B tile once for a
tile of rows of that adapter, loops over rank only up to the slot's own rank, and adds into its columns of the
fused output (q/k/v or gate/up side by side). B is rank-major ([slot, max_rank, out]): the rows a slot's rank
covers are one contiguous block whatever the pool's max_rank, so padding slots to a higher rank costs no bandwidth.
Every (row, column) belongs to exactly one program, so the
read-add-write needs no atomics; base rows are in no tile and are never touched. With an epilogue (PEFT's lora_bias,
DoRA; `kvrun.punica.ref.ExpandEpilogue`), the program reads its slot's mode once and, for a slot that has one, its
shift (and scale) columns once per tile, and finishes the rows in registers before the one store.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvrun.punica.triton.configs import ExpandConfig, expand_config
from kvrun.punica.triton.tiles import groups_block, locate_tile, max_tiles, tile_tokens

MAX_SLICES_PER_LAUNCH = 3


# num_groups varies step to step: not specialized on (== 1, divisible by 16), so it never picks a new variant.
@triton.jit(do_not_specialize=["num_groups"])
def _expand_kernel(
    y_ptr,
    b0_ptr,
    b1_ptr,
    b2_ptr,
    out_ptr,
    token_order_ptr,
    group_starts_ptr,
    group_slots_ptr,
    ranks_ptr,
    modes_ptr,
    scale0_ptr,
    scale1_ptr,
    scale2_ptr,
    shift0_ptr,
    shift1_ptr,
    shift2_ptr,
    num_groups,
    features0,
    features1,
    features2,
    offset0,
    offset1,
    offset2,
    blocks0,
    blocks1,
    stride_b0_slot,
    stride_b1_slot,
    stride_b2_slot,
    stride_y_slice,
    stride_out_token,
    stride_ranks_slice,
    stride_scale0_slot,
    stride_scale1_slot,
    stride_scale2_slot,
    stride_shift0_slot,
    stride_shift1_slot,
    stride_shift2_slot,
    NUM_SLICES: tl.constexpr,
    MAX_RANK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_GROUPS: tl.constexpr,
    SORTED: tl.constexpr,
    IEEE_FP32: tl.constexpr,
    EPILOGUE: tl.constexpr,
):
    slot, first_row, end_row = locate_tile(
        tl.program_id(0), group_starts_ptr, group_slots_ptr, num_groups, BLOCK_M, BLOCK_GROUPS
    )
    if slot < 0:
        return

    # Column blocks of slice 0, then slice 1, then slice 2 along grid axis 1.
    # Values reassigned under a runtime condition must be tensors (not constexprs Triton may have specialized).
    block = tl.program_id(1)
    zero = block * 0
    slice_id = zero
    b_ptr = b0_ptr
    features = features0 + zero
    offset = offset0 + zero
    stride_slot = stride_b0_slot + zero
    scale_ptr = scale0_ptr
    shift_ptr = shift0_ptr
    stride_scale = stride_scale0_slot + zero
    stride_shift = stride_shift0_slot + zero
    if NUM_SLICES > 1:
        if block >= blocks0:
            block -= blocks0
            slice_id = zero + 1
            b_ptr = b1_ptr
            features = features1 + zero
            offset = offset1 + zero
            stride_slot = stride_b1_slot + zero
            scale_ptr = scale1_ptr
            shift_ptr = shift1_ptr
            stride_scale = stride_scale1_slot + zero
            stride_shift = stride_shift1_slot + zero
    if NUM_SLICES > 2:
        if slice_id == 1 and block >= blocks1:
            block -= blocks1
            slice_id = zero + 2
            b_ptr = b2_ptr
            features = features2 + zero
            offset = offset2 + zero
            stride_slot = stride_b2_slot + zero
            scale_ptr = scale2_ptr
            shift_ptr = shift2_ptr
            stride_scale = stride_scale2_slot + zero
            stride_shift = stride_shift2_slot + zero
    # Clamped so a rank table that overstates a slot never reads or writes past its padded buffers.
    rank = tl.minimum(tl.load(ranks_ptr + slice_id * stride_ranks_slice + slot), MAX_RANK)
    if rank == 0:
        return

    tokens, row_mask = tile_tokens(token_order_ptr, first_row, end_row, BLOCK_M, SORTED)
    column_offsets = block * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = column_offsets < features
    rank_offsets = tl.arange(0, BLOCK_R)
    y_ptrs = y_ptr + slice_id * stride_y_slice + tokens[:, None] * MAX_RANK + rank_offsets[None, :]
    b_ptrs = b_ptr + slot.to(tl.int64) * stride_slot + rank_offsets[:, None] * features + column_offsets[None, :]

    accumulator = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r in range(0, rank, BLOCK_R):
        # Rows past the slot's rank are never loaded (the padding may hold anything, NaN included).
        in_rank = rank_offsets + r < rank
        y_tile = tl.load(y_ptrs, mask=row_mask[:, None] & in_rank[None, :], other=0.0)
        b_tile = tl.load(b_ptrs, mask=in_rank[:, None] & n_mask[None, :], other=0.0)
        # The shrink output may be fp32 (split-K); the product runs in the weights' dtype like the reference's.
        if IEEE_FP32:
            accumulator += tl.dot(y_tile.to(b_tile.dtype), b_tile, input_precision="ieee")
        else:
            accumulator += tl.dot(y_tile.to(b_tile.dtype), b_tile)
        y_ptrs += BLOCK_R
        b_ptrs += BLOCK_R * features

    out_ptrs = out_ptr + tokens[:, None] * stride_out_token + (offset + column_offsets)[None, :]
    out_mask = row_mask[:, None] & n_mask[None, :]
    result = tl.load(out_ptrs, mask=out_mask, other=0.0).to(tl.float32) + accumulator
    if EPILOGUE:
        # modes share the ranks' layout: [num_slices, num_slots]. 1 = shift (lora_bias), 2 = scale and shift (DoRA).
        mode = tl.load(modes_ptr + slice_id * stride_ranks_slice + slot)
        if mode != 0:
            slot_columns = slot.to(tl.int64) * stride_shift + column_offsets
            shift = tl.load(shift_ptr + slot_columns, mask=n_mask, other=0.0).to(tl.float32)
            if mode == 2:
                scale_columns = slot.to(tl.int64) * stride_scale + column_offsets
                scale = tl.load(scale_ptr + scale_columns, mask=n_mask, other=1.0).to(tl.float32)
                result = result * scale[None, :]
            result = result + shift[None, :]
    tl.store(out_ptrs, result.to(out_ptr.dtype.element_ty), mask=out_mask)


def launch_expand(
    y: torch.Tensor,  # [num_slices, num_tokens, max_rank]
    lora_b: list[torch.Tensor],  # num_slices x [num_slots, max_rank, out_features_i]
    token_order: torch.Tensor | None,  # [num_tokens] int64 grouped row ids, None = rows contiguous per group
    group_starts: torch.Tensor,  # [num_groups + 1] int32
    group_slots: torch.Tensor,  # [num_groups] int32, -1 = base
    ranks: torch.Tensor,  # [num_slices, num_slots] int32
    out: torch.Tensor,  # [num_tokens, >= max(slice_offsets[i] + out_features_i)], accumulated in place
    slice_offsets: list[int],  # [num_slices] first column of slice i in out
    modes: torch.Tensor | None = None,  # [num_slices, num_slots] int32 epilogue modes, None = plain LoRA everywhere
    scale: list[torch.Tensor] | None = None,  # num_slices x [num_slots, out_features_i] float32
    shift: list[torch.Tensor] | None = None,  # num_slices x [num_slots, out_features_i]
    config: ExpandConfig | None = None,  # None = chosen from the shapes (benchmarks pass their own)
) -> None:
    _check_expand(y, lora_b, ranks, out, slice_offsets)
    if modes is not None:
        _check_epilogue(lora_b, ranks, modes, scale, shift)
    num_tokens = out.shape[0]
    num_groups = group_slots.shape[0]
    if num_tokens == 0 or num_groups == 0:
        return
    max_rank = y.shape[2]
    config = config or expand_config(num_tokens, num_groups, max_rank)
    for first in range(0, len(lora_b), MAX_SLICES_PER_LAUNCH):
        chunk = lora_b[first : first + MAX_SLICES_PER_LAUNCH]
        offsets = list(slice_offsets[first : first + MAX_SLICES_PER_LAUNCH])
        blocks = [triton.cdiv(b.shape[2], config.block_n) for b in chunk]
        padding = MAX_SLICES_PER_LAUNCH - len(chunk)
        padded = chunk + [chunk[0]] * padding
        if modes is not None:
            scales = scale[first : first + MAX_SLICES_PER_LAUNCH]
            shifts = shift[first : first + MAX_SLICES_PER_LAUNCH]
            scales, shifts = scales + [scales[0]] * padding, shifts + [shifts[0]] * padding
        else:  # never read: EPILOGUE is off
            scales = shifts = padded
        offsets += [0] * padding
        blocks += [0] * padding
        grid = (max_tiles(num_tokens, num_groups, config.block_m), sum(blocks))
        _expand_kernel[grid](
            y[first:],
            *padded,
            out,
            token_order if token_order is not None else group_starts,
            group_starts,
            group_slots,
            ranks[first:],
            modes[first:] if modes is not None else ranks,
            *scales,
            *shifts,
            num_groups,
            *(b.shape[2] for b in padded),
            *offsets,
            blocks[0],
            blocks[1],
            *(b.stride(0) for b in padded),
            y.stride(0),
            out.stride(0),
            ranks.stride(0),
            *(t.stride(0) for t in scales),
            *(t.stride(0) for t in shifts),
            NUM_SLICES=len(chunk),
            MAX_RANK=max_rank,
            BLOCK_M=config.block_m,
            BLOCK_N=config.block_n,
            BLOCK_R=config.block_r,
            BLOCK_GROUPS=groups_block(num_groups),
            SORTED=token_order is not None,
            IEEE_FP32=chunk[0].dtype == torch.float32,
            EPILOGUE=modes is not None,
            num_warps=config.num_warps,
            num_stages=config.num_stages,
        )


def _check_expand(y, lora_b, ranks, out, slice_offsets) -> None:
    num_slots, max_rank = lora_b[0].shape[0], y.shape[2]
    if len(slice_offsets) != len(lora_b) or y.shape[0] != len(lora_b) or y.shape[1] != out.shape[0]:
        raise ValueError("need one y slice and one offset per lora_b slice, and y rows matching out rows")
    for b, offset in zip(lora_b, slice_offsets, strict=True):
        if b.shape[0] != num_slots or b.shape[1] != max_rank or b.stride()[1:] != (b.shape[2], 1):
            raise ValueError("lora_b slices must be [num_slots, max_rank, out_features_i] with contiguous slots")
        if b.dtype != lora_b[0].dtype:
            raise ValueError("lora_b slices must share one dtype")
        if offset < 0 or offset + b.shape[2] > out.shape[1]:
            raise ValueError(f"slice at column {offset} of width {b.shape[2]} overflows out's {out.shape[1]} columns")
    if y.stride()[1:] != (max_rank, 1) or out.stride(1) != 1:
        raise ValueError("y needs contiguous [num_tokens, max_rank] slices and out a contiguous last dimension")
    if ranks.shape != (len(lora_b), num_slots) or ranks.stride(1) != 1:
        raise ValueError("ranks must be [num_slices, num_slots] with contiguous rows")


def _check_epilogue(lora_b, ranks, modes, scale, shift) -> None:
    if modes.shape != ranks.shape or modes.stride() != ranks.stride() or modes.dtype != torch.int32:
        raise ValueError("epilogue modes must be int32 laid out as ranks ([num_slices, num_slots])")
    if scale is None or shift is None or len(scale) != len(lora_b) or len(shift) != len(lora_b):
        raise ValueError("an epilogue needs one scale and one shift per lora_b slice")
    for b, scales, shifts in zip(lora_b, scale, shift, strict=True):
        for table in (scales, shifts):
            if table.shape != (b.shape[0], b.shape[2]) or table.stride(1) != 1:
                raise ValueError("epilogue scale and shift must be [num_slots, out_features_i], contiguous rows")
