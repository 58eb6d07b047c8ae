"""The fused Triton kernels (kvrun.runtime.layers.fused) on CPU through Triton's interpreter, against the torch code
they replace: RMSNorm, RotaryEmbedding (full and partial), `F.silu(gate) * up` and attention.base.write_kv.

The checks run in a child process with TRITON_INTERPRET=1, which must be set before triton is first imported (and
must not leak into this process); the child runs this file as a script. fp32 and fp16 only: the interpreter computes
through numpy, which has no bf16. Tolerances: fp32 1e-5; fp16 1e-3 (rtol and atol), i.e. about 1 fp16 ulp, since the
kernels round rotary and silu*up once where torch rounds each op. write_kv is a copy and must match exactly.
Shapes are tiny (T=5, H=64 and 96, Hq=4, Hk=2, D=16) with q/k/v as strided views of one fused qkv row.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
NUM_TOKENS, NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = 5, 4, 2, 16
TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=1e-3, atol=1e-3)}


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed (pip install triton)")
def test_fused_kernels_match_torch_in_interpreter() -> None:
    python_path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=python_path)
    result = subprocess.run(
        [sys.executable, str(Path(__file__).resolve())],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def strided_qkv(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v as the model gets them: views into one [T, (Hq + 2 Hk) * D] projection output."""
    q_size, kv_size = NUM_HEADS * HEAD_DIM, NUM_KV_HEADS * HEAD_DIM
    qkv = torch.randn(NUM_TOKENS, q_size + 2 * kv_size, dtype=dtype)
    q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
    shape = (NUM_TOKENS, -1, HEAD_DIM)
    return q.view(shape), k.view(shape), v.view(shape)


def check_norms(fused, dtype: torch.dtype, hidden: int) -> None:
    from kvrun.runtime.layers.norm import NormSpec, RMSNorm

    # Llama's form (scale after rounding) and Gemma's ((1 + w) applied in fp32).
    for spec in (NormSpec("rms", 1e-5), NormSpec("rms", 1e-5, weight_offset=1.0, scale_in_fp32=True)):
        norm = RMSNorm(hidden, spec).to(dtype)
        with torch.no_grad():
            norm.weight.copy_(torch.randn(hidden))
        args = (norm.weight, norm.eps, spec.weight_offset, spec.scale_in_fp32)
        # Rows with stride > hidden: the kernel must not assume contiguous input.
        x = torch.randn(NUM_TOKENS, hidden + 8, dtype=dtype)[:, :hidden] * 3
        residual = torch.randn(NUM_TOKENS, hidden, dtype=dtype)
        with torch.no_grad():
            torch.testing.assert_close(fused.rms_norm(x, *args), norm(x), **TOLERANCE[dtype])
            normed, new_residual = fused.add_rms_norm(x, residual, *args)
            torch.testing.assert_close(new_residual, x + residual, rtol=0, atol=0)
            torch.testing.assert_close(normed, norm(x + residual), **TOLERANCE[dtype])


def check_rotary(fused, dtype: torch.dtype) -> None:
    from kvrun.runtime.layers.rotary import RopeSpec, RotaryEmbedding

    # Full width, and partial (NeoX rotary_pct, Phi partial_rotary_factor): 12 has a non-power-of-two half.
    for rotary_dim in (HEAD_DIM, 12, 8):
        spec = RopeSpec(10000.0, HEAD_DIM, rotary_dim, 64)
        rotary = RotaryEmbedding(spec, max_positions=64).to(dtype)
        positions = torch.tensor([0, 7, 63, 3, 3], dtype=torch.int64)
        q, k, _ = strided_qkv(dtype)
        q_out, k_out = fused.rotary(positions, q, k, rotary.cos, rotary.sin)
        q_expected, k_expected = rotary(positions, q, k)
        torch.testing.assert_close(q_out, q_expected, **TOLERANCE[dtype])
        torch.testing.assert_close(k_out, k_expected, **TOLERANCE[dtype])
        torch.testing.assert_close(k_out[..., rotary_dim:], k[..., rotary_dim:], rtol=0, atol=0)


def check_silu_and_mul(fused, dtype: torch.dtype, intermediate: int) -> None:
    gate_up = torch.randn(NUM_TOKENS, 2 * intermediate + 4, dtype=dtype)[:, : 2 * intermediate] * 4
    gate, up = gate_up.chunk(2, dim=-1)
    torch.testing.assert_close(fused.silu_and_mul(gate_up), F.silu(gate) * up, **TOLERANCE[dtype])


def check_write_kv(fused, dtype: torch.dtype) -> None:
    from kvrun.runtime.attention.base import write_kv

    num_pages, page_size = 4, 4
    cache = torch.randn(num_pages, 2, page_size, NUM_KV_HEADS, HEAD_DIM, dtype=dtype)
    expected = cache.clone()
    _, k, v = strided_qkv(dtype)
    # Distinct slots across pages, unsorted, including a page's first and last offsets.
    slot_mapping = torch.tensor([13, 0, 7, 4, 15], dtype=torch.int64)
    fused.write_kv(cache, k, v, slot_mapping)
    write_kv(expected, k, v, slot_mapping)
    torch.testing.assert_close(cache, expected, rtol=0, atol=0)
    # A negative slot is skipped (torch indexing would wrap it to the last page).
    fused.write_kv(cache, k, v, torch.tensor([-1, 1, -1, -1, -1], dtype=torch.int64))
    write_kv(expected, k[1:2], v[1:2], torch.tensor([1], dtype=torch.int64))
    torch.testing.assert_close(cache, expected, rtol=0, atol=0)


def main() -> int:
    if os.environ.get("TRITON_INTERPRET") != "1":
        print("set TRITON_INTERPRET=1", file=sys.stderr)
        return 2
    from kvrun.runtime.layers import fused

    torch.manual_seed(0)
    started = time.perf_counter()
    for dtype in (torch.float32, torch.float16):
        for hidden in (64, 96):
            check_norms(fused, dtype, hidden)
            check_silu_and_mul(fused, dtype, hidden)
        check_rotary(fused, dtype)
        check_write_kv(fused, dtype)
        print(f"ok {dtype}", flush=True)
    print(f"interpreter checks took {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
