"""Run any LoRAOps on a LoRACase in SGMV or BGMV form, so every backend is driven the same way."""

from __future__ import annotations

import torch

from kvrun.punica import LoRAOps
from tests.punica.patterns import LoRACase

MODES = ("sgmv", "bgmv")


def run_shrink(ops: LoRAOps, case: LoRACase, mode: str, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """-> [num_slices, num_tokens, max_rank]; starts as NaN so entries an op forgets to write show up."""
    out = torch.full(
        (case.num_slices, case.num_tokens, case.max_rank),
        float("nan"),
        dtype=out_dtype or case.x.dtype,
        device=case.x.device,
    )
    if mode == "sgmv":
        ops.sgmv_shrink(case.x, case.lora_a, case.seg_indptr, case.seg_slots, case.ranks, case.scalings, out)
    else:
        ops.bgmv_shrink(case.x, case.lora_a, case.token_slots, case.ranks, case.scalings, out)
    return out


def run_expand(ops: LoRAOps, case: LoRACase, mode: str, y: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """-> base + the LoRA delta (base itself is left as it was)."""
    out = base.clone()
    if mode == "sgmv":
        ops.sgmv_expand(
            y, case.lora_b, case.seg_indptr, case.seg_slots, case.ranks, out, case.slice_offsets, case.epilogue
        )
    else:
        ops.bgmv_expand(y, case.lora_b, case.token_slots, case.ranks, out, case.slice_offsets, case.epilogue)
    return out


def random_base(case: LoRACase, seed: int = 1) -> torch.Tensor:
    """The base layer's output the expand adds into: [num_tokens, out_features]."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(case.num_tokens, case.out_features, generator=generator)
    return base.to(device=case.x.device, dtype=case.x.dtype)
