"""Projection: the one linear layer type of every model, so LoRA wrappers find all of them by type."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from kvrun.runtime.forward_batch import LoRABatchInfo


class Projection(nn.Linear):
    """A linear layer whose output packs one or more checkpoint modules.

    `output_slices` maps each packed checkpoint module's leaf name (the name it has beside this module in the
    checkpoint, e.g. q_proj/k_proj/v_proj for a fused qkv_proj, or c_attn for a module the checkpoint already fuses)
    to its width, in output order. The loader fills slice by slice; a LoRA adapter targets slices by those names, so
    checkpoint naming is declared here once and the loader, LoRA wrapping and adapter shape tables all derive from it.
    """

    def __init__(self, in_features: int, output_slices: dict[str, int], bias: bool, *, transposed: bool = False) -> None:
        """transposed: the checkpoint stores weights as [in, out] (GPT-2's Conv1D); they are loaded as [out, in]."""
        super().__init__(in_features, sum(output_slices.values()), bias=bias)
        self.output_slices = dict(output_slices)
        self.transposed = transposed

    def slice_rows(self, name: str) -> slice:
        start = 0
        for slice_name, width in self.output_slices.items():
            if slice_name == name:
                return slice(start, start + width)
            start += width
        raise KeyError(name)

    def load_checkpoint_tensor(self, param_name: str, slice_name: str, tensor: torch.Tensor) -> None:
        """Copy one checkpoint tensor (`<slice_name>.weight` or `.bias`) into its rows of this layer."""
        param = getattr(self, param_name, None)
        if not isinstance(param, torch.Tensor):
            raise ValueError(f"has no place: this layer has no {param_name} (does the config say it has one?)")
        if self.transposed and param_name == "weight":
            tensor = tensor.t()
        rows = self.slice_rows(slice_name)
        target = param.data[rows]
        if tuple(tensor.shape) != tuple(target.shape):
            raise ValueError(f"has shape {tuple(tensor.shape)}, expected {tuple(target.shape)}")
        target.copy_(tensor)

    def forward(self, x: torch.Tensor, lora: LoRABatchInfo | None = None) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)
