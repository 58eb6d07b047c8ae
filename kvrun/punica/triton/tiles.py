"""Which rows a kernel program works on: the segment -> tile map, computed inside each program.

Both kernels launch `max_tiles(num_tokens, num_groups, block_m)` programs along grid axis 0 (a bound known from
shapes alone, so the launch never reads device values and CUDA graphs can replay it). Each program loads the
group offsets (a few hundred int32 at most: one per segment or slot), counts the row tiles of every group with work,
and finds its own tile by a prefix sum. Groups of base rows (slot -1) and empty groups get no tile, so base rows cost
nothing; programs past the last tile exit at once.
"""

from __future__ import annotations

import triton
import triton.language as tl


def max_tiles(num_tokens: int, num_groups: int, block_m: int) -> int:
    """Upper bound on row tiles: each group wastes at most one partial tile, and at most num_tokens groups have rows."""
    return triton.cdiv(num_tokens, block_m) + min(num_groups, num_tokens)


def groups_block(num_groups: int) -> int:
    """Lanes for the group table, a compile-time size: few buckets, so few kernel variants (each one compiles on
    first use, see configs.warm_up_shapes)."""
    return max(64, triton.next_power_of_2(num_groups))


@triton.jit
def locate_tile(
    tile,
    group_starts_ptr,
    group_slots_ptr,
    num_groups,
    BLOCK_M: tl.constexpr,
    BLOCK_GROUPS: tl.constexpr,
):
    """-> (slot, first_row, end_row): this program's rows are first_row + arange(BLOCK_M) below end_row, as
    positions in the grouped order. slot is -1 when the tile has no work."""
    groups = tl.arange(0, BLOCK_GROUPS)
    in_range = groups < num_groups
    starts = tl.load(group_starts_ptr + groups, mask=in_range, other=0).to(tl.int32)
    ends = tl.load(group_starts_ptr + groups + 1, mask=in_range, other=0).to(tl.int32)
    slots = tl.load(group_slots_ptr + groups, mask=in_range, other=-1)
    tiles = tl.where(slots >= 0, (ends - starts + BLOCK_M - 1) // BLOCK_M, 0)
    tiles_end = tl.cumsum(tiles, 0)
    # tiles_end never decreases, so the groups ending at or before this tile are exactly those before its group
    # (empty groups included), and the last of their ends is where its group's tiles begin. Past the last tile
    # every lane counts, which puts group at BLOCK_GROUPS >= num_groups.
    before = tiles_end <= tile
    group = tl.sum(before.to(tl.int32), 0)
    first_tile = tl.max(tl.where(before, tiles_end, 0), 0)
    has_work = group < num_groups
    # These lines were just loaded as vectors, so the scalar reloads hit L1.
    slot = tl.load(group_slots_ptr + group, mask=has_work, other=-1).to(tl.int32)
    first_row = tl.load(group_starts_ptr + group, mask=has_work, other=0).to(tl.int32)
    end_row = tl.load(group_starts_ptr + group + 1, mask=has_work, other=0).to(tl.int32)
    first_row += (tile - first_tile) * BLOCK_M
    return slot, first_row, end_row


@triton.jit
def tile_tokens(token_order_ptr, first_row, end_row, BLOCK_M: tl.constexpr, SORTED: tl.constexpr):
    """-> (tokens, row_mask): the token ids (rows of x / out) of this tile."""
    rows = first_row + tl.arange(0, BLOCK_M)
    row_mask = rows < end_row
    if SORTED:
        tokens = tl.load(token_order_ptr + rows, mask=row_mask, other=0)
    else:
        tokens = rows
    return tokens.to(tl.int64), row_mask
