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
    scaling · bias; DoRA rescales each output feature (see `_set_dora`).

    Under tensor parallelism the adapter is split with the base weight and adds no communication: a
    column-parallel base keeps A whole and its rows of B (each rank computes the whole shrink, expands into its own
    output columns); a row-parallel base keeps its columns of A and B whole (each rank's shrink is a partial sum,
    expanded into its partial output, so the base layer's one all-reduce sums the delta with the output; a lora_bias
    is added by rank 0 alone). DoRA's norm of each output feature's row of W + s·BA: a column-parallel rank holds
    whole rows (its norms are final); a row-parallel rank holds some columns of every row, so its squared norms are
    partial sums that `finish_dora` completes with the other ranks' (one all-reduce per slot write, see
    LoRAManager.finish_slot). The rescaling is linear per output feature, so each rank applies it to its partial
    output before the base layer's all-reduce; the base bias, added after that all-reduce, is left out of it as
    DoRA leaves it (no shift on those ranks)."""

    # In a captured step (CUDA graph) the shrink, which needs only x, runs on a side stream while the base matmul runs:
    # a decode step's small LoRA launches use SMs and bandwidth that the matmul leaves idle. Read at capture.
    shrink_beside_base = True

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
        # (slice index, slot) → DoRA's partial squared row norms [out] fp32 and magnitude [out], of a row-parallel
        # rank, until finish_dora has the sums
        self.dora_partials: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

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
            rank = entry.a.shape[0]
            a, b = self.base.shard_input(entry.a), self.base.shard_output(name, entry.b)
            self.lora_a[index][slot, :rank].copy_(a, non_blocking=True)
            self.lora_b[index][slot, :rank].copy_(b.T, non_blocking=True)
            self.ranks[index, slot] = rank
            self.scalings[index, slot] = entry.scaling
            # A row-parallel rank's output is a partial sum: one rank adds the bias.
            if entry.bias is not None and not (self.base.reduces and self.base.tp.rank != 0):
                # PEFT: lora_B(lora_A(x)) * scaling, lora_B's bias inside the product.
                bias = self.base.shard_output(name, entry.bias)
                self.epilogue.shift[index][slot].copy_(bias.float() * entry.scaling)
                self.epilogue.modes[index, slot] = SHIFT
            self.dora_partials.pop((index, slot), None)
            if entry.magnitude is not None:
                self._write_dora(index, slot, a, b, entry.scaling, self.base.shard_output(name, entry.magnitude))

    def _write_dora(
        self, index: int, slot: int, a: torch.Tensor, b: torch.Tensor, scaling: float, magnitude: torch.Tensor
    ) -> None:
        """a, b, magnitude: this rank's shards."""
        rows = slice(self.slice_offsets[index], self.slice_offsets[index] + self.lora_b[index].shape[2])
        squares = dora_squared_norms(self.base.weight[rows], a, b, scaling)
        if self.base.reduces:
            self.dora_partials[index, slot] = (squares, magnitude)
            return
        self._set_dora(index, slot, squares, magnitude, None if self.base.bias is None else self.base.bias[rows])

    def finish_dora(self, index: int, slot: int, squares: torch.Tensor) -> None:
        """Complete a row-parallel slice's DoRA with its squared row norms summed over every rank."""
        _, magnitude = self.dora_partials.pop((index, slot))
        self._set_dora(index, slot, squares, magnitude, None)

    def _set_dora(
        self, index: int, slot: int, squares: torch.Tensor, magnitude: torch.Tensor, bias: torch.Tensor | None
    ) -> None:
        """DoRA as PEFT computes it, y = base(x) + (m/||W + s·BA|| - 1)·(base(x) - b) + m/||W + s·BA||·s·(x A^T B^T)
        with the norm per output feature (row of W) and the base bias b left out of the rescaling, rearranged for
        the expand epilogue: y = scale·(base(x) + s·x A^T B^T) + shift, with scale = m/||W + s·BA|| and
        shift = (1 - scale)·b. bias: the base bias in this rank's output (None where it is added after it)."""
        scale = magnitude.to(device=squares.device, dtype=torch.float32) / squares.sqrt()
        self.epilogue.scale[index][slot].copy_(scale)
        shift = (1 - scale) * bias.float() if bias is not None else torch.zeros_like(scale)
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
        if lora is None:
            return self.base.reduce(self.base.partial(x))
        shrunk = torch.empty(len(self.slice_names), x.shape[0], self.max_rank, dtype=self.shrink_dtype, device=x.device)
        capturing = x.is_cuda and self.shrink_beside_base and torch.cuda.is_current_stream_capturing()
        side = beside_stream(x.device) if capturing else None
        if side is None:
            out = self.base.partial(x)
            self.ops.sgmv_shrink(x, self.lora_a, lora.seg_indptr, lora.seg_slots, self.ranks, self.scalings, shrunk)
        else:  # a captured step: the shrink is a branch of the graph beside the base matmul, joined before the expand
            main = torch.cuda.current_stream(x.device)
            side.wait_stream(main)
            with torch.cuda.stream(side):
                self.ops.sgmv_shrink(x, self.lora_a, lora.seg_indptr, lora.seg_slots, self.ranks, self.scalings, shrunk)
            out = self.base.partial(x)
            main.wait_stream(side)
        self.ops.sgmv_expand(
            shrunk, self.lora_b, lora.seg_indptr, lora.seg_slots, self.ranks, out, self.slice_offsets, self.epilogue
        )
        return self.base.reduce(out)


_BESIDE: dict[torch.device, torch.cuda.Stream] = {}


def beside_stream(device: torch.device) -> torch.cuda.Stream:
    """The one side stream per device on which captured steps run LoRA shrinks beside the base matmuls."""
    if device not in _BESIDE:
        _BESIDE[device] = torch.cuda.Stream(device)
    return _BESIDE[device]


def dora_squared_norms(
    weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float, rows_per_chunk: int = 2048
) -> torch.Tensor:
    """[out] fp32: the squared norm of each row of weight + scaling·b·a (weight [out, in], a [rank, in], b [out, rank]).
    The norm depends only on the frozen base weight and the adapter, so it is computed once per slot load, in fp32, a
    chunk of rows at a time (W + s·BA of a whole MLP projection is hundreds of MB)."""
    a = a.to(device=weight.device, dtype=torch.float32)
    b = b.to(device=weight.device, dtype=torch.float32)
    squares = torch.empty(weight.shape[0], dtype=torch.float32, device=weight.device)
    for start in range(0, weight.shape[0], rows_per_chunk):
        rows = slice(start, start + rows_per_chunk)
        squares[rows] = (weight[rows].float() + scaling * (b[rows] @ a)).square().sum(dim=1)
    return squares
