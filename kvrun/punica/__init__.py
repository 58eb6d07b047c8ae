"""Segmented-gather LoRA matmuls (Punica's SGMV for prefill, BGMV for decode).

`select_ops(device)` picks one implementation at start-up; callers never branch per call.
Semantics, argument shapes and the slot convention (-1 = base model) are stated in `kvrun.punica.ref`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from kvrun.punica import ref


@dataclass(frozen=True, slots=True)
class LoRAOps:
    name: str
    sgmv_shrink: Callable[..., None]
    sgmv_expand: Callable[..., None]
    bgmv_shrink: Callable[..., None]
    bgmv_expand: Callable[..., None]


REFERENCE_OPS = LoRAOps("torch", ref.sgmv_shrink, ref.sgmv_expand, ref.bgmv_shrink, ref.bgmv_expand)


def select_ops(device: torch.device) -> LoRAOps:
    """The torch reference on CPU; the Triton kernels on CUDA."""
    if device.type == "cuda":
        from kvrun.punica.triton import TRITON_OPS

        return TRITON_OPS
    return REFERENCE_OPS
