"""The torch-free safetensors reader agrees with torch/safetensors on headers and on NaN/Inf."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save

from adapters_registry.safetensors_format import decode, describe_element, find_at_least, find_non_finite, parse_header

DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}


def raw_bytes(tensor: torch.Tensor) -> bytes:
    data = save({"t": tensor.contiguous()})
    info = parse_header(data)["t"]
    return data[info.begin : info.end]


def test_header_matches_torch() -> None:
    tensors = {
        "a": torch.zeros(3, 5, dtype=torch.float16),
        "b": torch.ones(7, dtype=torch.bfloat16),
        "c": torch.zeros(2, 2),
    }
    parsed = parse_header(save(tensors))
    assert {key: (info.dtype, info.shape) for key, info in parsed.items()} == {
        "a": ("F16", (3, 5)), "b": ("BF16", (7,)), "c": ("F32", (2, 2)),
    }  # fmt: skip


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_finds_the_first_non_finite_element(dtype: str, value: float) -> None:
    tensor = torch.randn(1000, generator=torch.Generator().manual_seed(1)).to(DTYPES[dtype])
    tensor[[417, 900]] = value
    payload = raw_bytes(tensor)
    assert find_non_finite(dtype, payload) == 417
    assert describe_element(dtype, payload, 417) == repr(value)


@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_extreme_finite_values_pass(dtype: str) -> None:
    info = torch.finfo(DTYPES[dtype])
    # Largest finite values and 2**127-ish ones share the high byte pattern of Inf in BF16/F32.
    values = [info.max, -info.max, info.tiny, 0.0, -0.0, 2.0**127 if dtype != "F16" else 65504.0, 1e-45]
    tensor = torch.tensor(values, dtype=torch.float32).to(DTYPES[dtype])
    assert torch.isfinite(tensor).all()
    assert find_non_finite(dtype, raw_bytes(tensor)) is None


@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_agrees_with_torch_on_random_bit_patterns(dtype: str) -> None:
    width = {"F16": torch.int16, "BF16": torch.int16, "F32": torch.int32}[dtype]
    generator = torch.Generator().manual_seed(7)
    for _ in range(20):
        bits = torch.randint(-(2**15), 2**15, (4096,), generator=generator).to(width)
        if width is torch.int32:
            bits = bits * 65536 + torch.randint(0, 2**15, (4096,), generator=generator)
        tensor = bits.view(DTYPES[dtype])
        bad = (~torch.isfinite(tensor)).nonzero()
        expected = int(bad[0]) if len(bad) else None
        assert find_non_finite(dtype, raw_bytes(tensor)) == expected


def random_bit_patterns(dtype: str, seed: int) -> torch.Tensor:
    """Every exponent, sign and mantissa is as likely as any other: NaN, Inf, subnormals, huge and tiny."""
    width = {"F16": torch.int16, "BF16": torch.int16, "F32": torch.int32}[dtype]
    generator = torch.Generator().manual_seed(seed)
    bits = torch.randint(-(2**15), 2**15, (4096,), generator=generator).to(width)
    if width is torch.int32:
        bits = (bits * 65536 + torch.randint(0, 2**15, (4096,), generator=generator)).to(width)
    return bits.view(DTYPES[dtype])


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("power", [0, 9, 10, 11, 15])
def test_magnitude_scan_agrees_with_torch(dtype: str, power: int) -> None:
    for seed in range(10):
        tensor = random_bit_patterns(dtype, seed)
        # Sparse enough that the first hit is not always element 0: keep 1 in 64 elements.
        tensor = torch.where(torch.arange(4096) % 64 == 0, tensor, torch.zeros((), dtype=tensor.dtype))
        large = (tensor.float().abs() >= 2.0**power) | ~torch.isfinite(tensor)
        hits = large.nonzero()
        assert find_at_least(dtype, raw_bytes(tensor), power) == (int(hits[0]) if len(hits) else None)


@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_bound_edges(dtype: str) -> None:
    bound = torch.tensor(1024.0, dtype=DTYPES[dtype])
    below = torch.nextafter(bound, torch.zeros((), dtype=bound.dtype))
    tensor = torch.stack([below, -below, bound.new_zeros(()), -bound, bound])
    assert find_at_least(dtype, raw_bytes(tensor), 10) == 3


@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_decode_matches_torch(dtype: str) -> None:
    tensor = random_bit_patterns(dtype, 3)
    decoded = torch.tensor(decode(dtype, raw_bytes(tensor)), dtype=torch.float64)
    assert torch.equal(decoded.isnan(), tensor.isnan())
    finite = ~tensor.isnan()
    assert torch.equal(decoded[finite], tensor.double()[finite])
