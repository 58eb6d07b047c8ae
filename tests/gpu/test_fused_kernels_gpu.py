"""The fused Triton kernels (kvrun.runtime.layers.fused) on CUDA in bf16 at Llama-3-8B decode shapes, against the
torch code they replace (RMSNorm, RotaryEmbedding, `F.silu(gate) * up`, attention.base.write_kv); plus one CUDA-graph
capture and replay of all five.

Shapes: T=32 tokens, hidden 4096, intermediate 14336, 32 query heads and 8 KV heads of 128, q/k/v as strided views
of one fused qkv output. Tolerance (bf16, unit-scale data): the kernels round where torch rounds (norms) or round
once where torch rounds each op (rotary, silu*up), so results may differ by 1-2 bf16 ulps: rtol 2^-6, atol 1e-2.
write_kv and the residual sum must match exactly. Nothing is timed here.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

NUM_TOKENS, HIDDEN, INTERMEDIATE, NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = 32, 4096, 14336, 32, 8, 128
DTYPE = torch.bfloat16
TOLERANCE = dict(rtol=2**-6, atol=1e-2)


@pytest.fixture(scope="module")
def fused():
    from kvrun.runtime.layers import fused

    return fused


def strided_qkv() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q_size, kv_size = NUM_HEADS * HEAD_DIM, NUM_KV_HEADS * HEAD_DIM
    qkv = torch.randn(NUM_TOKENS, q_size + 2 * kv_size, dtype=DTYPE, device="cuda")
    q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
    shape = (NUM_TOKENS, -1, HEAD_DIM)
    return q.view(shape), k.view(shape), v.view(shape)


def make_norm():
    from kvrun.runtime.layers.norm import NormSpec, RMSNorm

    norm = RMSNorm(HIDDEN, NormSpec("rms", 1e-5)).to(device="cuda", dtype=DTYPE)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(HIDDEN))
    return norm


def make_rotary():
    from kvrun.runtime.layers.rotary import RopeSpec, RotaryEmbedding

    scaling = {"factor": 8.0, "original_max_position_embeddings": 8192}
    spec = RopeSpec(500000.0, HEAD_DIM, HEAD_DIM, 131072, "llama3", scaling)
    return RotaryEmbedding(spec, max_positions=4096).to("cuda", DTYPE)


@torch.no_grad()
def test_rms_norm_and_add_rms_norm(fused):
    torch.manual_seed(0)
    norm = make_norm()
    x = torch.randn(NUM_TOKENS, HIDDEN, dtype=DTYPE, device="cuda")
    residual = torch.randn(NUM_TOKENS, HIDDEN, dtype=DTYPE, device="cuda")
    torch.testing.assert_close(fused.rms_norm(x, norm.weight, norm.eps), norm(x), **TOLERANCE)
    normed, new_residual = fused.add_rms_norm(x, residual, norm.weight, norm.eps)
    torch.testing.assert_close(new_residual, x + residual, rtol=0, atol=0)
    torch.testing.assert_close(normed, norm(x + residual), **TOLERANCE)


def test_rotary(fused):
    torch.manual_seed(1)
    rotary = make_rotary()
    positions = torch.randint(0, 4096, (NUM_TOKENS,), device="cuda")
    q, k, _ = strided_qkv()
    q_out, k_out = fused.rotary(positions, q, k, rotary.cos, rotary.sin)
    q_expected, k_expected = rotary(positions, q, k)
    torch.testing.assert_close(q_out, q_expected, **TOLERANCE)
    torch.testing.assert_close(k_out, k_expected, **TOLERANCE)


@pytest.mark.parametrize("rotary_dim", [32, 48, 64])  # NeoX rotary_pct 0.25, a non-power-of-two half, Phi 0.5
def test_partial_rotary(fused, rotary_dim):
    from kvrun.runtime.layers.rotary import RopeSpec, RotaryEmbedding

    torch.manual_seed(4)
    rotary = RotaryEmbedding(RopeSpec(10000.0, HEAD_DIM, rotary_dim, 4096), max_positions=4096).to("cuda", DTYPE)
    positions = torch.randint(0, 4096, (NUM_TOKENS,), device="cuda")
    q, k, _ = strided_qkv()
    q_out, k_out = fused.rotary(positions, q, k, rotary.cos, rotary.sin)
    q_expected, k_expected = rotary(positions, q, k)  # built without fused=True: the torch path
    torch.testing.assert_close(q_out, q_expected, **TOLERANCE)
    torch.testing.assert_close(k_out, k_expected, **TOLERANCE)
    torch.testing.assert_close(q_out[..., rotary_dim:], q[..., rotary_dim:], rtol=0, atol=0)


def test_silu_and_mul(fused):
    torch.manual_seed(2)
    gate_up = torch.randn(NUM_TOKENS, 2 * INTERMEDIATE, dtype=DTYPE, device="cuda")
    gate, up = gate_up.chunk(2, dim=-1)
    torch.testing.assert_close(fused.silu_and_mul(gate_up), F.silu(gate) * up, **TOLERANCE)


def test_write_kv(fused):
    from kvrun.runtime.attention.base import write_kv

    torch.manual_seed(3)
    num_pages, page_size = 16, 16
    cache = torch.randn(num_pages, 2, page_size, NUM_KV_HEADS, HEAD_DIM, dtype=DTYPE, device="cuda")
    expected = cache.clone()
    _, k, v = strided_qkv()
    slot_mapping = torch.randperm(num_pages * page_size, device="cuda")[:NUM_TOKENS]
    fused.write_kv(cache, k, v, slot_mapping)
    write_kv(expected, k, v, slot_mapping)
    torch.testing.assert_close(cache, expected, rtol=0, atol=0)


@torch.no_grad()
def test_all_kernels_replay_in_a_cuda_graph(fused):
    """Captured once on static inputs, replayed after the inputs change in place, as the decode graph runs them."""
    torch.manual_seed(4)
    norm, rotary = make_norm(), make_rotary()
    x = torch.randn(NUM_TOKENS, HIDDEN, dtype=DTYPE, device="cuda")
    residual = torch.randn_like(x)
    gate_up = torch.randn(NUM_TOKENS, 2 * INTERMEDIATE, dtype=DTYPE, device="cuda")
    positions = torch.zeros(NUM_TOKENS, dtype=torch.int64, device="cuda")
    q, k, v = strided_qkv()
    cache = torch.zeros(4, 2, 16, NUM_KV_HEADS, HEAD_DIM, dtype=DTYPE, device="cuda")
    slot_mapping = torch.zeros(NUM_TOKENS, dtype=torch.int64, device="cuda")

    def step():
        normed, new_residual = fused.add_rms_norm(x, residual, norm.weight, norm.eps)
        q_out, k_out = fused.rotary(positions, q, k, rotary.cos, rotary.sin)
        fused.write_kv(cache, k_out, v, slot_mapping)
        return fused.rms_norm(new_residual, norm.weight, norm.eps), normed, q_out, fused.silu_and_mul(gate_up)

    step()  # compile every kernel outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = step()

    for tensor in (x, residual, gate_up, q, k, v):
        tensor.copy_(torch.randn_like(tensor))
    positions.copy_(torch.randint(0, 4096, (NUM_TOKENS,), device="cuda"))
    slot_mapping.copy_(torch.randperm(64, device="cuda")[:NUM_TOKENS])
    cache.zero_()  # drop what the warm-up call wrote
    graph.replay()
    replayed_cache = cache.clone()
    cache.zero_()
    expected = step()
    for got, want in zip(outputs, expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(replayed_cache, cache, rtol=0, atol=0)
