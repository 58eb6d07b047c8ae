"""Rotary position embeddings: every frequency scheme HF defines, rotate-half or interleaved, full or partial.

Static schemes (default, linear, llama3, yarn) precompute cos/sin tables indexed by position. The two schemes whose
frequencies depend on the sequence length (dynamic NTK, Phi-3 "longrope") compute each token's angles from the
length its sequence has after this step, which is what HF computes when it generates with a KV cache: every token's
key is rotated with the frequencies of the step that produced it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

STATIC_TYPES = ("default", "linear", "llama3", "yarn")
LENGTH_DEPENDENT_TYPES = ("dynamic", "longrope")
ROPE_TYPES = STATIC_TYPES + LENGTH_DEPENDENT_TYPES
# A rope parameter's value as the config gives it, a list stored as a tuple. Typed, so a spec decoded from
# MessagePack (the engine core process sends the server its ModelConfig) has tuples where the original had them.
RopeValue = bool | int | float | str | tuple | dict | None


@dataclass(frozen=True, slots=True)
class RopeSpec:
    """One rotary embedding, as read from a config (both `rope_scaling` and `rope_parameters` styles)."""

    theta: float
    head_dim: int
    rotary_dim: int  # < head_dim: only the first rotary_dim features of each head rotate (partial rotary)
    max_position_embeddings: int
    rope_type: str = "default"
    # sorted (name, value) pairs: factor, low_freq_factor, ... (lists stored as tuples)
    parameters: tuple[tuple[str, RopeValue], ...] = ()
    interleaved: bool = False  # rotate pairs (x0, x1), (x2, x3) instead of the two halves (Cohere, GPT-J)

    def __post_init__(self) -> None:
        if isinstance(self.parameters, dict):
            frozen = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in self.parameters.items()))
            object.__setattr__(self, "parameters", frozen)
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"rope type {self.rope_type!r} is not supported (supported: {', '.join(ROPE_TYPES)})")
        if self.rotary_dim % 2 or not 0 < self.rotary_dim <= self.head_dim:
            raise ValueError(f"rotary dimension {self.rotary_dim} must be even and in 1..head_dim={self.head_dim}")

    @property
    def length_dependent(self) -> bool:
        return self.rope_type in LENGTH_DEPENDENT_TYPES

    def length_regime(self, length: int) -> int:
        """What the K/V of a sequence computed at `length` tokens depend on besides its tokens and positions (0:
        nothing): LongRoPE switches to its long factors above the original context, dynamic NTK rescales its base by
        the length itself."""
        if self.rope_type == "longrope":
            return int(length > self.params["original_max_position_embeddings"])
        if self.rope_type == "dynamic":
            return length if length > self.max_position_embeddings else 0
        return 0

    @property
    def params(self) -> dict:
        return dict(self.parameters)


def _base_frequencies(spec: RopeSpec, theta: float | None = None) -> torch.Tensor:
    dim = spec.rotary_dim
    return 1.0 / ((theta or spec.theta) ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def _llama3(spec: RopeSpec) -> torch.Tensor:
    p = spec.params
    inv_freq = _base_frequencies(spec)
    factor, low, high = p["factor"], p.get("low_freq_factor", 1.0), p.get("high_freq_factor", 4.0)
    original = p["original_max_position_embeddings"]
    low_freq_wavelen, high_freq_wavelen = original / low, original / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (original / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(medium, smoothed, scaled)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(spec: RopeSpec) -> tuple[torch.Tensor, float]:
    p, dim, base = spec.params, spec.rotary_dim, spec.theta
    original = p["original_max_position_embeddings"]
    factor = p.get("factor") or spec.max_position_embeddings / original
    attention_factor = p.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = p.get("mscale"), p.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = _yarn_mscale(factor)
    beta_fast, beta_slow = p.get("beta_fast") or 32, p.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    positions = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation, interpolation = 1.0 / positions, 1.0 / (factor * positions)
    keep = 1 - ramp
    return interpolation * (1 - keep) + extrapolation * keep, float(attention_factor)


def static_frequencies(spec: RopeSpec) -> tuple[torch.Tensor, float]:
    """(inverse frequencies [rotary_dim / 2], attention factor applied to cos and sin)."""
    if spec.rope_type == "default":
        return _base_frequencies(spec), 1.0
    if spec.rope_type == "linear":
        return _base_frequencies(spec) / spec.params["factor"], 1.0
    if spec.rope_type == "llama3":
        return _llama3(spec), 1.0
    if spec.rope_type == "yarn":
        return _yarn(spec)
    raise ValueError(f"{spec.rope_type} rope frequencies depend on the sequence length")


def _longrope_factor(spec: RopeSpec) -> tuple[float, int]:
    p = spec.params
    original = p["original_max_position_embeddings"]
    factor = p.get("factor") or spec.max_position_embeddings / original
    attention_factor = p.get("attention_factor")
    if attention_factor is None:
        attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    return float(attention_factor), original


def _length_dependent_angles(spec: RopeSpec, positions: torch.Tensor, lengths: torch.Tensor, factor_tables):
    """Per-token angles [num_tokens, rotary_dim / 2] (fp32) and attention factor, from each token's sequence length."""
    dim = spec.rotary_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=positions.device).float() / dim
    if spec.rope_type == "dynamic":
        factor, original = spec.params["factor"], spec.max_position_embeddings
        length = torch.clamp(lengths.float(), min=original)
        base = spec.theta * ((factor * length / original) - (factor - 1)) ** (dim / (dim - 2))
        inv_freq = 1.0 / (base[:, None] ** exponents[None, :])
        return positions.float()[:, None] * inv_freq, 1.0
    attention_factor, original = _longrope_factor(spec)
    long, short = factor_tables
    factors = torch.where((lengths > original)[:, None], long[None, :], short[None, :])
    inv_freq = 1.0 / (factors * spec.theta ** exponents[None, :])
    return positions.float()[:, None] * inv_freq, attention_factor


class RotaryEmbedding(nn.Module):
    def __init__(self, spec: RopeSpec, max_positions: int, fused: bool = False) -> None:
        super().__init__()
        self.spec = spec
        # The fused Triton kernel covers rotate-half rotation (full or partial) from a table (or per-token rows).
        self._kernel = None
        if fused and not spec.interleaved:
            from kvrun.runtime.layers.fused import rotary as kernel

            self._kernel = kernel
        if spec.length_dependent:
            self.cos = self.sin = None
            # LongRoPE's per-frequency factors live on the device with the model: a CUDA graph cannot copy them in.
            params = spec.params
            for name in ("long_factor", "short_factor"):
                values = params.get(name, ())
                self.register_buffer(name, torch.tensor(values, dtype=torch.float32), persistent=False)
            return
        inv_freq, attention_factor = static_frequencies(spec)
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq.float())
        cos, sin = self._expand(freqs.cos() * attention_factor), self._expand(freqs.sin() * attention_factor)
        # Computed in fp32 and stored in the model dtype, as the reference casts them before use.
        self.register_buffer("cos", cos.to(torch.get_default_dtype()), persistent=False)
        self.register_buffer("sin", sin.to(torch.get_default_dtype()), persistent=False)

    def _expand(self, half: torch.Tensor) -> torch.Tensor:
        if self.spec.interleaved:
            return torch.repeat_interleave(half, 2, dim=-1)
        return torch.cat([half, half], dim=-1)

    def forward(
        self,
        positions: torch.Tensor,  # [num_tokens] int64
        q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        lengths: torch.Tensor | None = None,  # [num_tokens] int64, each token's sequence length after this step
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.spec.length_dependent:
            tables = (self.long_factor, self.short_factor)
            angles, attention_factor = _length_dependent_angles(self.spec, positions, lengths, tables)
            dtype = q.dtype
            cos = (self._expand(angles.cos()) * attention_factor).to(dtype)
            sin = (self._expand(angles.sin()) * attention_factor).to(dtype)
            rows = torch.arange(positions.shape[0], device=positions.device)
            return self._rotate(rows, q, k, cos, sin)
        return self._rotate(positions, q, k, self.cos, self.sin)

    def _rotate(self, index, q, k, cos_table, sin_table):
        if self._kernel is not None:
            return self._kernel(index, q, k, cos_table, sin_table)
        cos, sin = cos_table[index][:, None, :], sin_table[index][:, None, :]
        dim = self.spec.rotary_dim
        if dim == self.spec.head_dim:
            return self._rotation(q, cos, sin), self._rotation(k, cos, sin)
        return (
            torch.cat([self._rotation(q[..., :dim], cos, sin), q[..., dim:]], dim=-1),
            torch.cat([self._rotation(k[..., :dim], cos, sin), k[..., dim:]], dim=-1),
        )

    def _rotation(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if self.spec.interleaved:  # Cohere rotates in fp32
            x32 = x.float()
            rotated = torch.stack([-x32[..., 1::2], x32[..., ::2]], dim=-1).flatten(-2)
            return (x32 * cos.float() + rotated * sin.float()).to(x.dtype)
        half = x.shape[-1] // 2
        return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin
