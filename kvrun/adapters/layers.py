"""LinearWithLoRA: a base projection plus each row's adapter delta, through the ops chosen at start-up."""

from __future__ import annotations

import torch
from torch import nn

from kvrun.punica import LoRAOps
from kvrun.runtime.forward_batch import LoRABatchInfo
from kvrun.runtime.layers.linear import Projection


class LinearWithLoRA(nn.Module):
    """y = base(x) + scaling_{i,s} · (x A_{i,s}^T) B_{i,s}^T for each row's slot s, per output slice i (q/k/v,
    gate/up, ...): every slice of every slot has its own rank and scaling."""

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
            torch.zeros(num_slots, width, max_rank, dtype=weight.dtype, device=weight.device)
            for width in base.output_slices.values()
        ]
        self.ranks = torch.zeros(len(self.slice_names), num_slots, dtype=torch.int32, device=weight.device)
        self.scalings = torch.zeros(len(self.slice_names), num_slots, dtype=torch.float32, device=weight.device)
        self.max_rank = max_rank
        self.ops = ops
        # The Triton shrink accumulates in fp32 and splits the input dimension when it may write fp32 partials;
        # the torch reference multiplies in the activation dtype.
        self.shrink_dtype = torch.float32 if weight.is_cuda else weight.dtype

    def set_slot(self, slot: int, weights: dict[str, tuple[torch.Tensor, torch.Tensor, float]]) -> None:
        """Write one adapter's (A, B, scaling) per slice into slot (slices it leaves alone get rank 0)."""
        for index, name in enumerate(self.slice_names):
            entry = weights.get(name)
            self.lora_a[index][slot].zero_()
            self.lora_b[index][slot].zero_()
            if entry is None:
                self.ranks[index, slot] = 0
                self.scalings[index, slot] = 0.0
                continue
            a, b, scaling = entry
            rank = a.shape[0]
            self.lora_a[index][slot, :rank].copy_(a, non_blocking=True)
            self.lora_b[index][slot, :, :rank].copy_(b, non_blocking=True)
            self.ranks[index, slot] = rank
            self.scalings[index, slot] = scaling

    def forward(self, x: torch.Tensor, lora: LoRABatchInfo | None = None) -> torch.Tensor:
        out = self.base(x)
        if lora is None:
            return out
        shrunk = torch.empty(len(self.slice_names), x.shape[0], self.max_rank, dtype=self.shrink_dtype, device=x.device)
        self.ops.sgmv_shrink(x, self.lora_a, lora.seg_indptr, lora.seg_slots, self.ranks, self.scalings, shrunk)
        self.ops.sgmv_expand(shrunk, self.lora_b, lora.seg_indptr, lora.seg_slots, self.ranks, out, self.slice_offsets)
        return out
