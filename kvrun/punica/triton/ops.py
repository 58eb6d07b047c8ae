"""The Triton kernels as torch custom ops, and the four LoRAOps entry points with the reference's signatures.

Custom ops (opaque to torch.compile, capturable in CUDA graphs; both mutate only `out`):
    torch.ops.kvrun.lora_shrink(x, lora_a, token_order, group_starts, group_slots, ranks, scalings, out)
    torch.ops.kvrun.lora_expand(y, lora_b, token_order, group_starts, group_slots, ranks, out, slice_offsets,
                                modes, scale, shift)
where (token_order, group_starts, group_slots) is a `SlotGroups` (see kvrun.punica.metadata).

What a CUDA-graphed caller preallocates (allocate before capture, update in place, pass the same tensors):
    - the shrink output [num_slices, num_tokens, max_rank], fp32 for decode (enables split-K; bf16 works too),
    - for BGMV, one `LoRAKernelMeta(max_tokens, num_slots, device)`; call `group_tokens(token_slots)` once per
      step and pass the result as `groups=` to every bgmv_* call of the step (without it each call sorts again
      into fresh, graph-pool memory: correct, but a few extra launches per call),
    - ranks and scalings [num_slices, num_slots] (int32, float32) per layer, updated in place on load,
and runs each batch-size bucket once before capturing it, so Triton compiles its kernels outside the capture.
The ops themselves allocate nothing, sync nothing and size their grids from shapes alone. Layout they require:
A and B rank-major as [num_slots, max_rank, in] / [num_slots, max_rank, out_i] (all A slices alike), and
the shrink output contiguous per slice. An expand epilogue (`kvrun.punica.ref.ExpandEpilogue`) is passed as its
three fields (modes, or None and two empty lists for none; scale; shift), its tables preallocated and updated in place like ranks.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kvrun.punica.metadata import SlotGroups, group_tokens
from kvrun.punica.ref import ExpandEpilogue
from kvrun.punica.triton.expand import launch_expand
from kvrun.punica.triton.shrink import launch_shrink


@torch.library.custom_op("kvrun::lora_shrink", mutates_args=("out",))
def lora_shrink(
    x: torch.Tensor,
    lora_a: list[torch.Tensor],
    token_order: torch.Tensor | None,
    group_starts: torch.Tensor,
    group_slots: torch.Tensor,
    ranks: torch.Tensor,
    scalings: torch.Tensor,
    out: torch.Tensor,
) -> None:
    launch_shrink(x, lora_a, token_order, group_starts, group_slots, ranks, scalings, out)


@lora_shrink.register_fake
def _(x, lora_a, token_order, group_starts, group_slots, ranks, scalings, out) -> None:
    return None


@torch.library.custom_op("kvrun::lora_expand", mutates_args=("out",))
def lora_expand(
    y: torch.Tensor,
    lora_b: list[torch.Tensor],
    token_order: torch.Tensor | None,
    group_starts: torch.Tensor,
    group_slots: torch.Tensor,
    ranks: torch.Tensor,
    out: torch.Tensor,
    slice_offsets: list[int],
    modes: torch.Tensor | None,
    scale: list[torch.Tensor],
    shift: list[torch.Tensor],
) -> None:
    launch_expand(y, lora_b, token_order, group_starts, group_slots, ranks, out, slice_offsets, modes, scale, shift)


@lora_expand.register_fake
def _(y, lora_b, token_order, group_starts, group_slots, ranks, out, slice_offsets, modes, scale, shift) -> None:
    return None


def shrink(
    x: torch.Tensor,  # [num_tokens, in_features]
    lora_a: Sequence[torch.Tensor],  # num_slices x [num_slots, max_rank, in_features]
    groups: SlotGroups,
    ranks: torch.Tensor,  # [num_slices, num_slots] int32
    scalings: torch.Tensor,  # [num_slices, num_slots] float32
    out: torch.Tensor,  # [num_slices, num_tokens, max_rank], overwritten
) -> None:
    """Semantics: `kvrun.punica.ref.sgmv_shrink` over the groups (a group is a segment)."""
    torch.ops.kvrun.lora_shrink(
        x, list(lora_a), groups.token_order, groups.group_starts, groups.group_slots, ranks, scalings, out
    )


def expand(
    y: torch.Tensor,  # [num_slices, num_tokens, max_rank]
    lora_b: Sequence[torch.Tensor],  # num_slices x [num_slots, max_rank, out_features_i]
    groups: SlotGroups,
    ranks: torch.Tensor,  # [num_slices, num_slots] int32
    out: torch.Tensor,  # [num_tokens, sum(out_features_i)], accumulated in place
    slice_offsets: Sequence[int],
    epilogue: ExpandEpilogue | None = None,
) -> None:
    """Semantics: `kvrun.punica.ref.sgmv_expand` over the groups (a group is a segment)."""
    extras = (epilogue.modes, list(epilogue.scale), list(epilogue.shift)) if epilogue is not None else (None, [], [])
    torch.ops.kvrun.lora_expand(
        y, list(lora_b), groups.token_order, groups.group_starts, groups.group_slots, ranks, out, list(slice_offsets),
        *extras,
    )  # fmt: skip


def sgmv_shrink(x, lora_a, seg_indptr, seg_slots, ranks, scalings, out) -> None:
    """Semantics and shapes: `kvrun.punica.ref.sgmv_shrink`."""
    shrink(x, lora_a, SlotGroups.from_segments(seg_indptr, seg_slots), ranks, scalings, out)


def sgmv_expand(y, lora_b, seg_indptr, seg_slots, ranks, out, slice_offsets, epilogue=None) -> None:
    """Semantics and shapes: `kvrun.punica.ref.sgmv_expand`."""
    expand(y, lora_b, SlotGroups.from_segments(seg_indptr, seg_slots), ranks, out, slice_offsets, epilogue)


def bgmv_shrink(x, lora_a, token_slots, ranks, scalings, out, *, groups: SlotGroups | None = None) -> None:
    """Semantics and shapes: `kvrun.punica.ref.bgmv_shrink`. groups: `LoRAKernelMeta.group_tokens(token_slots)`,
    built once per step; built here when omitted."""
    if groups is None:
        groups = group_tokens(token_slots, ranks.shape[1])
    shrink(x, lora_a, groups, ranks, scalings, out)


def bgmv_expand(
    y, lora_b, token_slots, ranks, out, slice_offsets, epilogue=None, *, groups: SlotGroups | None = None
) -> None:
    """Semantics and shapes: `kvrun.punica.ref.bgmv_expand`; groups as in `bgmv_shrink`."""
    if groups is None:
        groups = group_tokens(token_slots, ranks.shape[1])
    expand(y, lora_b, groups, ranks, out, slice_offsets, epilogue)
