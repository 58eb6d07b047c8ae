from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 and scale in the input dtype, as the HF Llama reference does.
        dtype = hidden.dtype
        hidden32 = hidden.float()
        variance = hidden32.pow(2).mean(-1, keepdim=True)
        return self.weight * (hidden32 * torch.rsqrt(variance + self.eps)).to(dtype)
