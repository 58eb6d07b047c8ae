"""LinearWithLoRA: a base projection plus each row's adapter delta, through the ops chosen at start-up."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from kvrun.punica import LoRAOps
from kvrun.punica.ref import PLAIN, SCALE_SHIFT, SHIFT, ExpandEpilogue
from kvrun.runtime.forward_batch import LoRABatchInfo
from kvrun.runtime.layers.linear import Projection


@dataclass(frozen=True, slots=True)
class SliceWeights:
    """One adapter's weights for one output slice of a wrapped projection."""

    a: torch.Tensor  # [rank, in_features]
    b: torch.Tensor  # [out_features_i, rank]
    scaling: float
    bias: torch.Tensor | None = None  # [out_features_i] lora_B's bias (PEFT's lora_bias), None without one
    magnitude: torch.Tensor | None = None  # [out_features_i] DoRA's magnitude vector, None for a plain LoRA


class LinearWithLoRA(nn.Module):
    """y = base(x) + scaling_{i,s} · (x A_{i,s}^T) B_{i,s}^T for each row's slot s, per output slice i (q/k/v,
    gate/up, ...): every slice of every slot has its own rank and scaling. The expand's epilogue
    (`kvrun.punica.ref.ExpandEpilogue`) finishes the rows of adapters that add more: lora_bias adds
    scaling · bias; DoRA rescales each output feature (see `dora_scale`).

    Under tensor parallelism the adapter is split with the base weight and adds no communication: a
    column-parallel base keeps A whole and its rows of B (each rank computes the whole shrink, expands into its own
    output columns); a row-parallel base keeps its columns of A and B whole (each rank's shrink is a partial sum,
    expanded into its partial output, so the base layer's one all-reduce sums the delta with the output; a lora_bias
    is added by rank 0 alone). DoRA's per-feature norm spans the whole row, which a row-parallel rank does not hold:
    DoRA adapters are refused under tensor parallelism."""

    def __init__(self, base: Projection, num_slots: int, max_rank: int, ops: LoRAOps) -> None:
        super().__init__()
        self.base = base
        self.slice_names = list(base.output_slices)
        self.slice_offsets = []
        offset = 0
        for width in base.output_slices.values():
            self.slice_offsets.append(offset)
            offset += width
        weight = base.weight
        self.lora_a = [
            torch.zeros(num_slots, max_rank, base.in_features, dtype=weight.dtype, device=weight.device)
            for _ in self.slice_names
        ]
        self.lora_b = [
            torch.zeros(num_slots, max_rank, width, dtype=weight.dtype, device=weight.device)
            for width in base.output_slices.values()
        ]
        self.ranks = torch.zeros(len(self.slice_names), num_slots, dtype=torch.int32, device=weight.device)
        self.scalings = torch.zeros(len(self.slice_names), num_slots, dtype=torch.float32, device=weight.device)
        self.epilogue = ExpandEpilogue(
            modes=torch.zeros(len(self.slice_names), num_slots, dtype=torch.int32, device=weight.device),
            scale=[torch.ones(num_slots, width, device=weight.device) for width in base.output_slices.values()],
            shift=[
                torch.zeros(num_slots, width, dtype=weight.dtype, device=weight.device)
                for width in base.output_slices.values()
            ],
        )
        self.max_rank = max_rank
        self.ops = ops
        # The Triton shrink accumulates in fp32 and splits the input dimension when it may write fp32 partials;
        # the torch reference multiplies in the activation dtype.
        self.shrink_dtype = torch.float32 if weight.is_cuda else weight.dtype

    def set_slot(self, slot: int, weights: dict[str, SliceWeights]) -> None:
        """Write one adapter's weights per slice into slot (slices it leaves alone get rank 0)."""
        for index, name in enumerate(self.slice_names):
            entry = weights.get(name)
            self.lora_a[index][slot].zero_()
            self.lora_b[index][slot].zero_()
            self.epilogue.modes[index, slot] = PLAIN
            if entry is None:
                self.ranks[index, slot] = 0
                self.scalings[index, slot] = 0.0
                continue
            if entry.magnitude is not None and self.base.tp is not None:
                raise ValueError("DoRA adapters are not supported with tensor parallelism yet")
            rank = entry.a.shape[0]
            self.lora_a[index][slot, :rank].copy_(self.base.shard_input(entry.a), non_blocking=True)
            self.lora_b[index][slot, :rank].copy_(self.base.shard_output(name, entry.b).T, non_blocking=True)
            self.ranks[index, slot] = rank
            self.scalings[index, slot] = entry.scaling
            # A row-parallel rank's output is a partial sum: one rank adds the bias.
            if entry.bias is not None and not (self.base.reduces and self.base.tp.rank != 0):
                # PEFT: lora_B(lora_A(x)) * scaling, lora_B's bias inside the product.
                bias = self.base.shard_output(name, entry.bias)
                self.epilogue.shift[index][slot].copy_(bias.float() * entry.scaling)
                self.epilogue.modes[index, slot] = SHIFT
            if entry.magnitude is not None:
                rows = slice(self.slice_offsets[index], self.slice_offsets[index] + self.lora_b[index].shape[2])
                bias = self.base.bias[rows] if self.base.bias is not None else None
                scale, shift = dora_scale(self.base.weight[rows], bias, entry)
                self.epilogue.scale[index][slot].copy_(scale)
                self.epilogue.shift[index][slot].copy_(shift)
                self.epilogue.modes[index, slot] = SCALE_SHIFT

    def shape_key(self) -> tuple:
        """Equal for wrappers whose LoRA ops see the same shapes (the same kernel variants)."""
        return (self.lora_a[0].shape, tuple(b.shape for b in self.lora_b), self.lora_a[0].dtype)

    def run_segment_shapes(self, shapes: list[tuple[int, int]]) -> None:
        """Run the segment (SGMV) ops once per (segments, rows per segment) on zeros, every segment on slot 0, into
        scratch outputs: compiles the kernel variants those step shapes select before any request is served."""
        device, dtype = self.lora_a[0].device, self.lora_a[0].dtype
        width = self.slice_offsets[-1] + self.lora_b[-1].shape[2]
        for segments, rows in shapes:
            tokens = segments * rows
            x = torch.zeros(tokens, self.lora_a[0].shape[2], dtype=dtype, device=device)
            seg_indptr = torch.arange(0, tokens + 1, rows, dtype=torch.int32, device=device)
            seg_slots = torch.zeros(segments, dtype=torch.int32, device=device)
            shrunk = torch.empty(len(self.slice_names), tokens, self.max_rank, dtype=self.shrink_dtype, device=device)
            self.ops.sgmv_shrink(x, self.lora_a, seg_indptr, seg_slots, self.ranks, self.scalings, shrunk)
            out = torch.zeros(tokens, width, dtype=dtype, device=device)
            self.ops.sgmv_expand(
                shrunk, self.lora_b, seg_indptr, seg_slots, self.ranks, out, self.slice_offsets, self.epilogue
            )

    def forward(self, x: torch.Tensor, lora: LoRABatchInfo | None = None) -> torch.Tensor:
        out = self.base.partial(x)
        if lora is None:
            return self.base.reduce(out)
        shrunk = torch.empty(len(self.slice_names), x.shape[0], self.max_rank, dtype=self.shrink_dtype, device=x.device)
        self.ops.sgmv_shrink(x, self.lora_a, lora.seg_indptr, lora.seg_slots, self.ranks, self.scalings, shrunk)
        self.ops.sgmv_expand(
            shrunk, self.lora_b, lora.seg_indptr, lora.seg_slots, self.ranks, out, self.slice_offsets, self.epilogue
        )
        return self.base.reduce(out)


def dora_scale(
    weight: torch.Tensor, bias: torch.Tensor | None, entry: SliceWeights, rows_per_chunk: int = 2048
) -> tuple[torch.Tensor, torch.Tensor]:
    """DoRA as PEFT computes it, y = base(x) + (m/||W + s·BA|| - 1)·(base(x) - b) + m/||W + s·BA||·s·(x A^T B^T)
    with the norm per output feature (row of W) and the base bias b left out of the rescaling, rearranged for the
    expand epilogue: y = scale·(base(x) + s·x A^T B^T) + shift, with scale = m/||W + s·BA|| and
    shift = (1 - scale)·b. The norm depends only on the frozen base weight and the adapter, so it is computed once
    per slot load, in fp32, a chunk of rows at a time (W + s·BA of a whole MLP projection is hundreds of MB).

    weight: [out, in] the base rows of this slice; bias: [out] or None. -> (scale [out] fp32, shift [out] fp32)."""
    a = entry.a.to(device=weight.device, dtype=torch.float32)
    b = entry.b.to(device=weight.device, dtype=torch.float32)
    norms = torch.empty(weight.shape[0], dtype=torch.float32, device=weight.device)
    for start in range(0, weight.shape[0], rows_per_chunk):
        rows = slice(start, start + rows_per_chunk)
        norms[rows] = torch.linalg.vector_norm(weight[rows].float() + entry.scaling * (b[rows] @ a), dim=1)
    scale = entry.magnitude.to(device=weight.device, dtype=torch.float32) / norms
    shift = (1 - scale) * bias.float() if bias is not None else torch.zeros_like(scale)
    return scale, shift
