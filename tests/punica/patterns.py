"""Batches for LoRA kernel tests: Punica's adapter-popularity patterns x ranks, with base rows and rank-0 slices.

Shared by the CPU reference test, the Triton interpreter test and the GPU test, so all three cover the same cases.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kvrun.punica.ref import ExpandEpilogue

PATTERNS = ("distinct", "uniform", "zipf", "identical", "skewed")
# "mixed": each slot's slices take different ranks, as one adapter's modules do under PEFT's rank_pattern; "uneven":
# ranks that fill no tile (a kernel that rounds a rank up to its block reads the padding).
RANK_SETTINGS: dict[str, tuple[int, ...]] = {
    "8": (8,), "16": (16,), "64": (64,), "mixed": (8, 16, 32, 64), "uneven": (3, 5, 12, 40),
}  # fmt: skip
# Padding past an adapter's rank holds this (finite, so 0 * padding stays 0): a kernel that reads it fails loudly.
PADDING_VALUE = 100.0


@dataclass(frozen=True, slots=True)
class LoRACase:
    x: torch.Tensor  # [num_tokens, in_features]
    lora_a: list[torch.Tensor]  # num_slices x [num_slots, max_rank, in_features]
    lora_b: list[torch.Tensor]  # num_slices x [num_slots, max_rank, out_features_i]
    ranks: torch.Tensor  # [num_slices, num_slots] int32
    scalings: torch.Tensor  # [num_slices, num_slots] float32
    slice_offsets: list[int]  # [num_slices]
    token_slots: torch.Tensor  # [num_tokens] int32, -1 = base (BGMV view of the batch)
    seg_indptr: torch.Tensor  # [num_requests + 1] int32 (SGMV view: one segment per request)
    seg_slots: torch.Tensor  # [num_requests] int32
    # lora_bias / DoRA finishing of the expand (None: plain LoRA everywhere)
    epilogue: ExpandEpilogue | None = None

    @property
    def num_tokens(self) -> int:
        return self.x.shape[0]

    @property
    def num_slices(self) -> int:
        return len(self.lora_a)

    @property
    def max_rank(self) -> int:
        return self.lora_a[0].shape[1]

    @property
    def out_features(self) -> int:
        return sum(b.shape[2] for b in self.lora_b)

    def to(self, dtype: torch.dtype) -> LoRACase:
        """The same case with x and weights in dtype (metadata unchanged)."""
        return LoRACase(
            self.x.to(dtype),
            [a.to(dtype) for a in self.lora_a],
            [b.to(dtype) for b in self.lora_b],
            self.ranks,
            self.scalings,
            self.slice_offsets,
            self.token_slots,
            self.seg_indptr,
            self.seg_slots,
            self.epilogue if self.epilogue is None else _epilogue_to(self.epilogue, dtype),
        )


def _epilogue_to(epilogue: ExpandEpilogue, dtype: torch.dtype) -> ExpandEpilogue:
    """Shifts in dtype (as a layer stores them beside its weights); scales stay fp32."""
    return ExpandEpilogue(epilogue.modes, epilogue.scale, [shift.to(dtype) for shift in epilogue.shift])


def request_adapters(pattern: str, num_requests: int, generator: torch.Generator) -> list[int]:
    """Adapter of each request, numbered by popularity (0 = most used)."""
    if pattern == "distinct":
        return list(range(num_requests))
    if pattern == "identical":
        return [0] * num_requests
    if pattern == "uniform":  # Punica: sqrt(batch) adapters, equally popular
        num_adapters = max(1, math.isqrt(num_requests))
        return torch.randint(num_adapters, (num_requests,), generator=generator).tolist()
    if pattern == "zipf":  # Punica's skewed popularity: Zipf with alpha 1.5 over num_requests adapters
        weights = torch.arange(1, num_requests + 1, dtype=torch.float64) ** -1.5
        return torch.multinomial(weights, num_requests, replacement=True, generator=generator).tolist()
    if pattern == "skewed":  # one hot adapter takes half the batch, the rest are distinct
        hot = (num_requests + 1) // 2
        return [0] * hot + list(range(1, num_requests - hot + 1))
    raise ValueError(f"unknown pattern {pattern!r}")


def make_case(
    pattern: str,
    rank_setting: str,
    num_requests: int,
    *,
    in_features: int,
    out_features: Sequence[int],
    max_segment: int = 1,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    seed: int = 0,
    epilogue: bool = False,
) -> LoRACase:
    """A batch of num_requests requests of 1..max_segment tokens (1 = decode) in shuffled order.

    Every 7th request (from the 4th) is a base request (slot -1). Slots are a shuffled numbering of the adapters plus
    one spare, unused slot. Some slots have rank 0 on one slice (the adapter leaves that projection alone).
    With epilogue, slots cycle through plain LoRA, lora_bias (a shift) and DoRA (a scale near 1 and a shift) per slice;
    the scale and shift tables hold large values in the plain slots (reading them fails loudly).
    """
    generator = torch.Generator().manual_seed(seed)  # batch layout, drawn on the CPU
    adapters = request_adapters(pattern, num_requests, generator)
    num_slots = max(adapters) + 2
    slot_of_adapter = torch.randperm(num_slots, generator=generator).tolist()
    order = torch.randperm(num_requests, generator=generator).tolist()
    slots = [-1 if i % 7 == 3 else slot_of_adapter[adapters[i]] for i in order]
    lengths = torch.randint(1, max_segment + 1, (num_requests,), generator=generator)
    seg_indptr = torch.zeros(num_requests + 1, dtype=torch.int32)
    seg_indptr[1:] = torch.cumsum(lengths, 0)
    slot_tensor = torch.tensor(slots, dtype=torch.int32)

    # Values are drawn where they live: GPU cases hold hundreds of MB of weights.
    values = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=values, device=device)

    ranks = _ranks(RANK_SETTINGS[rank_setting], len(out_features), num_slots).to(device)
    max_rank = max(RANK_SETTINGS[rank_setting])
    lora_a = [
        _padded(randn(num_slots, max_rank, in_features) / in_features**0.5, ranks[i]).to(dtype)
        for i in range(len(out_features))
    ]
    lora_b = [
        _padded(randn(num_slots, max_rank, n) / max_rank**0.5, ranks[i]).to(dtype)
        for i, n in enumerate(out_features)
    ]
    # Each slice of each slot has its own alpha and rank, so its own scaling (PEFT's alpha_pattern / rank_pattern).
    slot_plus_slice = torch.arange(num_slots, device=device)[None, :] + torch.arange(len(out_features), device=device)[:, None]
    alphas = torch.tensor([8.0, 16.0, 32.0], device=device)[slot_plus_slice % 3]
    return LoRACase(
        x=randn(int(seg_indptr[-1]), in_features).to(dtype),
        lora_a=lora_a,
        lora_b=lora_b,
        ranks=ranks,
        scalings=alphas / ranks.clamp(min=1),
        slice_offsets=[sum(out_features[:i]) for i in range(len(out_features))],
        token_slots=torch.repeat_interleave(slot_tensor, lengths).to(device),
        seg_indptr=seg_indptr.to(device),
        seg_slots=slot_tensor.to(device),
        epilogue=_random_epilogue(out_features, num_slots, randn, dtype, device) if epilogue else None,
    )


def _random_epilogue(out_features, num_slots, randn, dtype, device) -> ExpandEpilogue:
    slots, slices = torch.arange(num_slots, device=device), torch.arange(len(out_features), device=device)
    slot_plus_slice = slots[None, :] + slices[:, None]
    modes = (slot_plus_slice % 3).to(torch.int32)  # 0 plain, 1 shift, 2 scale and shift
    scale, shift = [], []
    for i, n in enumerate(out_features):
        plain = (modes[i] == 0)[:, None]
        scale.append(torch.where(plain, PADDING_VALUE, 1 + 0.2 * randn(num_slots, n)).float().contiguous())
        shift.append(torch.where(plain, PADDING_VALUE, randn(num_slots, n)).to(dtype).contiguous())
    return ExpandEpilogue(modes, scale, shift)


def _ranks(choices: tuple[int, ...], num_slices: int, num_slots: int) -> torch.Tensor:
    ranks = torch.tensor([[choices[(slot + i) % len(choices)] for slot in range(num_slots)] for i in range(num_slices)])
    for slot in range(2, num_slots, 5):
        ranks[slot % num_slices, slot] = 0
    return ranks.to(torch.int32)


def _padded(weights: torch.Tensor, ranks: torch.Tensor) -> torch.Tensor:
    """weights [num_slots, max_rank, features] with the rows past each slot's rank set to PADDING_VALUE."""
    positions = torch.arange(weights.shape[1], device=weights.device)
    beyond = (positions[None, :] >= ranks[:, None])[:, :, None]  # [num_slots, max_rank, 1]
    return torch.where(beyond, torch.full_like(weights, PADDING_VALUE), weights)
