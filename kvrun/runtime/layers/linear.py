"""Projection layers that take the step's LoRA row map, so an adapter wrapper can stand in for them."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from kvrun.runtime.forward_batch import LoRABatchInfo


class Projection(nn.Linear):
    """A linear layer; `output_slices` names the fused parts (q/k/v, gate/up) and their widths."""

    def __init__(self, in_features: int, output_slices: dict[str, int], bias: bool) -> None:
        super().__init__(in_features, sum(output_slices.values()), bias=bias)
        self.output_slices = dict(output_slices)

    def forward(self, x: torch.Tensor, lora: LoRABatchInfo | None = None) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)
