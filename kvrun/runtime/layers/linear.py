"""Projection: the one linear layer type of every model, so LoRA wrappers find all of them by type.

Under tensor parallelism a Projection is column-parallel (each rank holds its rows of every output slice and its
output stays split by rank) or row-parallel (each rank holds its columns of the input, which arrives split, and the
ranks' partial outputs are summed by one all-reduce). How a run of rows splits is a `Split`: by whole attention
heads, or by single rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn import functional as F

from kvrun.runtime.forward_batch import LoRABatchInfo

if TYPE_CHECKING:
    from kvrun.runtime.distributed.group import TensorParallel


@dataclass(frozen=True, slots=True)
class Split:
    """A run of `units × unit_size` rows that tensor parallelism divides by whole units (heads, or rows).

    With at least as many units as ranks each rank holds units/size of them (they must divide evenly); with fewer
    (K/V heads under GQA) the ranks share them: rank r holds unit r·units/size, on size/units ranks. A shared unit
    is replicated whole, unless `parts` lays it out: then the ranks sharing it split each part in turn as a Split
    of its own (a K/V head's group in a fused per-group q/k/v: its query heads split, its key and value replicated).
    """

    units: int
    unit_size: int = 1
    parts: tuple[Split, ...] = ()

    def __post_init__(self) -> None:
        if self.parts and sum(part.width for part in self.parts) != self.unit_size:
            raise ValueError(f"parts {self.parts} do not add up to a unit of {self.unit_size} rows")

    @property
    def width(self) -> int:
        return self.units * self.unit_size

    def local(self, rank: int, size: int) -> list[tuple[int, int]]:
        """(first row, number of rows) of each piece of this run that `rank` of `size` holds, in order."""
        if self.units >= size:
            if self.units % size:
                raise ValueError(f"{self.units} units do not split evenly over {size} tensor-parallel ranks")
            per_rank = self.units // size * self.unit_size
            return [(rank * per_rank, per_rank)]
        if size % self.units:
            raise ValueError(f"{self.units} units cannot be replicated evenly over {size} tensor-parallel ranks")
        sharing = size // self.units
        start = rank // sharing * self.unit_size
        if not self.parts:
            return [(start, self.unit_size)]
        pieces = []
        for part in self.parts:
            pieces += [(start + first, length) for first, length in part.local(rank % sharing, sharing)]
            start += part.width
        return pieces

    def local_width(self, rank: int, size: int) -> int:
        return sum(length for _, length in self.local(rank, size))


def as_splits(layout: int | tuple[Split, ...]) -> tuple[Split, ...]:
    return (Split(layout),) if isinstance(layout, int) else tuple(layout)


def shard(tensor: torch.Tensor, splits: tuple[Split, ...], tp: TensorParallel | None, dim: int = 0) -> torch.Tensor:
    """This rank's part of a full tensor whose `dim` is laid out as `splits` (the tensor itself without TP)."""
    if tp is None or tp.size == 1:
        return tensor
    parts, offset = [], 0
    for split in splits:
        parts += [tensor.narrow(dim, offset + start, length) for start, length in split.local(tp.rank, tp.size)]
        offset += split.width
    if offset != tensor.shape[dim]:
        raise ValueError(f"has {tensor.shape[dim]} entries along dim {dim}, expected {offset}")
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


def local_width(splits: tuple[Split, ...], tp: TensorParallel | None) -> int:
    if tp is None or tp.size == 1:
        return sum(split.width for split in splits)
    return sum(split.local_width(tp.rank, tp.size) for split in splits)


class Projection(nn.Linear):
    """A linear layer whose output packs one or more checkpoint modules.

    `output_slices` maps each packed checkpoint module's leaf name (the name it has beside this module in the
    checkpoint, e.g. q_proj/k_proj/v_proj for a fused qkv_proj, or c_attn for a module the checkpoint already fuses)
    to its width, in output order; a width may be given as Splits (heads of q, k and v inside one pre-fused module)
    so tensor parallelism splits it by whole heads. The loader fills slice by slice; a LoRA adapter targets slices
    by those names, so checkpoint naming is declared here once and the loader, LoRA wrapping and adapter shape
    tables all derive from it.

    tp: None (one device), else column-parallel, or row-parallel when `row_split` describes the input's layout.
    `output_slices` then holds this rank's widths and in/out_features this rank's sizes; `full_slices` the layout.
    """

    def __init__(
        self,
        in_features: int,
        output_slices: dict[str, int | tuple[Split, ...]],
        bias: bool,
        *,
        transposed: bool = False,
        tp: TensorParallel | None = None,
        row_split: tuple[Split, ...] | None = None,
    ) -> None:
        """transposed: the checkpoint stores weights as [in, out] (GPT-2's Conv1D); they are loaded as [out, in]."""
        self.full_slices = {name: as_splits(layout) for name, layout in output_slices.items()}
        self.tp = tp if tp is not None and tp.size > 1 else None
        self.row_split = row_split if self.tp is not None else None
        if self.row_split is None:
            widths = {name: local_width(splits, self.tp) for name, splits in self.full_slices.items()}
        else:
            widths = {name: local_width(splits, None) for name, splits in self.full_slices.items()}
            in_features = local_width(self.row_split, self.tp)
        super().__init__(in_features, sum(widths.values()), bias=bias)
        self.output_slices = widths
        self.reduces = self.row_split is not None  # partial outputs: summed across ranks, bias added after
        self.transposed = transposed

    def slice_rows(self, name: str) -> slice:
        start = 0
        for slice_name, width in self.output_slices.items():
            if slice_name == name:
                return slice(start, start + width)
            start += width
        raise KeyError(name)

    def shard_output(self, slice_name: str, tensor: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a full checkpoint (or LoRA B) tensor of one output slice."""
        if self.row_split is not None:
            return tensor
        return shard(tensor, self.full_slices[slice_name], self.tp, dim=0)

    def shard_input(self, tensor: torch.Tensor) -> torch.Tensor:
        """This rank's columns of a full [..., in_features] tensor (a weight, or LoRA A)."""
        if self.row_split is None:
            return tensor
        return shard(tensor, self.row_split, self.tp, dim=-1)

    def load_checkpoint_tensor(self, param_name: str, slice_name: str, tensor: torch.Tensor) -> None:
        """Copy one checkpoint tensor (`<slice_name>.weight` or `.bias`) into its rows of this layer."""
        param = getattr(self, param_name, None)
        if not isinstance(param, torch.Tensor):
            raise ValueError(f"has no place: this layer has no {param_name} (does the config say it has one?)")
        if self.transposed and param_name == "weight":
            tensor = tensor.t()
        rows = self.slice_rows(slice_name)
        target = param.data[rows]
        tensor = self.shard_output(slice_name, tensor)
        if param_name == "weight":
            tensor = self.shard_input(tensor)
        if tuple(tensor.shape) != tuple(target.shape):
            raise ValueError(f"has shape {tuple(tensor.shape)}, expected {tuple(target.shape)}")
        target.copy_(tensor)

    def forward(self, x: torch.Tensor, lora: LoRABatchInfo | None = None) -> torch.Tensor:
        return self.reduce(self.partial(x))

    def partial(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's share of the output (the whole output unless row-parallel)."""
        return F.linear(x, self.weight, None if self.reduces else self.bias)

    def reduce(self, out: torch.Tensor) -> torch.Tensor:
        """partial → output: a row-parallel layer sums the ranks' shares, then adds its bias once."""
        if not self.reduces:
            return out
        out = self.tp.all_reduce(out)
        return out if self.bias is None else out + self.bias
