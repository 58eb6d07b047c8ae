"""Block sizes, chosen on the host from shapes alone (never from device values), so a captured graph stays valid.

Decode-shaped batches (a few rows per adapter) are bound by reading the adapters' weights: small row tiles, wide
K / N tiles, and split-K for the shrink so enough programs stream weights at once to fill HBM. Prefill-shaped
batches (long segments) reuse each weight tile across many rows: bigger row tiles.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton


@dataclass(frozen=True, slots=True)
class ShrinkConfig:
    block_m: int
    block_r: int
    block_k: int
    split_k: int
    num_warps: int
    num_stages: int
    rank_programs: int = 1  # programs per slice along rank; each loops over every rank_programs-th rank block


@dataclass(frozen=True, slots=True)
class ExpandConfig:
    block_m: int
    block_n: int
    block_r: int
    num_warps: int
    num_stages: int


@functools.cache
def _num_programs_in_flight(device: torch.device) -> int:
    """Programs that keep every SM busy: a few per SM."""
    return 4 * torch.cuda.get_device_properties(device).multi_processor_count


def _block_m(num_tokens: int, num_groups: int) -> int:
    rows_per_group = num_tokens / max(1, min(num_groups, num_tokens))
    if rows_per_group <= 16:
        return 16  # tl.dot needs at least 16 rows; decode tiles are mostly masked, which costs no memory traffic
    return 32 if rows_per_group <= 32 else 64


def shrink_config(
    num_tokens: int,
    num_groups: int,
    in_features: int,
    max_rank: int,
    num_slices: int,
    can_split: bool,
    device: torch.device,
) -> ShrinkConfig:
    """can_split: the output is fp32, so partial sums over in_features can be added with atomics."""
    block_m = _block_m(num_tokens, num_groups)
    # Wide rank tiles only when many rows share them (prefill): they save re-reading x per rank block.
    block_r = 16 if block_m <= 32 else min(64, max(16, triton.next_power_of_2(max_rank)))
    block_k = 256 if block_m <= 32 else 64
    block_k = min(block_k, max(16, triton.next_power_of_2(in_features) // 2))  # small inputs: still >= 2 K steps
    # Decode: one program walks all of a slot's rank blocks, so padding the pool to a higher max_rank adds no
    # programs and leaves split-K as it is. Prefill: a program per rank block (x tiles are reused across rows).
    rank_programs = 1 if block_m <= 32 else triton.cdiv(max_rank, block_r)
    programs = (triton.cdiv(num_tokens, block_m) + min(num_groups, num_tokens)) * num_slices * rank_programs
    split_k = 1
    k_blocks = triton.cdiv(in_features, block_k)
    if can_split and device.type != "cuda" and k_blocks >= 2:
        split_k = 2  # the interpreter gains nothing from splitting, but tests then cover the atomic path
    elif can_split:
        while split_k * 2 <= k_blocks // 2 and programs * split_k * 2 <= _num_programs_in_flight(device):
            split_k *= 2
    return ShrinkConfig(
        block_m, block_r, block_k, split_k, num_warps=4, num_stages=3 if block_m <= 32 else 2, rank_programs=rank_programs
    )


def warm_up_shapes(max_tokens: int, max_segments: int) -> list[tuple[int, int]]:
    """(segments, rows per segment) of segment-grouped steps that together select every kernel variant the rules above
    (and tiles.groups_block) can pick for steps of up to max_tokens tokens and max_segments segments: each group-table
    bucket with one, ~24 and ~48 rows per segment (row tiles of 16, 32 and 64), and one whole-budget segment. Triton
    compiles a variant on its first launch (about a second, or a disk-cache hit); running these at start-up keeps
    that out of live steps."""
    # The fewest segments of each group-table bucket (64 lanes, 128, ...): the most rows each segment can have.
    segment_counts = [1] + [2**power + 1 for power in range(6, max_segments.bit_length()) if 2**power < max_segments]
    shapes = [(count, rows) for count in segment_counts for rows in (1, 24, 48) if count * rows <= max_tokens]
    return [*shapes, (1, max_tokens)]


def expand_config(num_tokens: int, num_groups: int, max_rank: int) -> ExpandConfig:
    block_m = _block_m(num_tokens, num_groups)
    block_n = 256 if block_m == 16 else 128
    # The rank loop stops at each slot's own rank, so block_r only bounds the waste for ranks below it.
    block_r = 16 if max_rank <= 16 or block_m == 16 else 32
    # Decode tiles do one or two rank steps: software pipelining has nothing to overlap (measured best on an H200).
    return ExpandConfig(block_m, block_n, block_r, num_warps=4, num_stages=1 if block_m == 16 else 2)
