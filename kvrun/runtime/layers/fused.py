"""Fused Triton kernels for the elementwise work around the decode GEMMs: one launch each instead of 3-10 torch ops.

Imported only on CUDA (and by tests, which may run it under TRITON_INTERPRET=1 on CPU), so triton is imported at
module level here and nowhere else in the runtime. Every wrapper sizes its grid from tensor shapes and never reads
device memory on the host, so all of them are safe inside CUDA-graph capture; outputs are allocated per call (during
capture they come from the graph's pool). Arithmetic is fp32 on values loaded in their storage dtype (bf16, fp16 or
fp32); the rounding points are stated per op against the torch reference each one replaces.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def _row_warps(block: int) -> int:
    # One program per row; wide rows (H up to 16384) get more warps so each thread holds at most ~32 values.
    return max(1, min(16, block // 512))


@triton.jit
def _rms_norm_kernel(
    x_ptr, residual_ptr, weight_ptr, out_ptr, residual_out_ptr,
    x_row_stride, residual_row_stride, hidden, eps, weight_offset,
    HAS_RESIDUAL: tl.constexpr, SCALE_IN_FP32: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        residual = tl.load(residual_ptr + row * residual_row_stride + cols, mask=mask, other=0.0)
        # Round the sum to the storage dtype first, as torch's `x + residual` does; the norm reads the rounded sum.
        x = (x.to(tl.float32) + residual.to(tl.float32)).to(x.dtype)
        tl.store(residual_out_ptr + row * hidden + cols, x, mask=mask)
    x32 = x.to(tl.float32)
    variance = tl.sum(x32 * x32, axis=0) / hidden
    normed = x32 * tl.rsqrt(variance + eps)
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32) + weight_offset
    if SCALE_IN_FP32:  # Gemma: (normed * (offset + w)) in fp32, rounded once
        out = normed * weight
    else:  # Llama: round the normalised value to the input dtype, then scale
        out = weight * normed.to(x.dtype).to(tl.float32)
    tl.store(out_ptr + row * hidden + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def _launch_rms_norm(x, residual, weight, eps, weight_offset, scale_in_fp32):
    num_tokens, hidden = x.shape
    assert x.stride(1) == 1 and weight.shape == (hidden,) and weight.is_contiguous()
    out_dtype = x.dtype if scale_in_fp32 else torch.promote_types(x.dtype, weight.dtype)
    out = torch.empty((num_tokens, hidden), dtype=out_dtype, device=x.device)
    residual_out = torch.empty_like(x, memory_format=torch.contiguous_format) if residual is not None else out
    if residual is not None:
        assert residual.shape == x.shape and residual.dtype == x.dtype and residual.stride(1) == 1
    block = triton.next_power_of_2(hidden)
    _rms_norm_kernel[(num_tokens,)](
        x, residual if residual is not None else x, weight, out, residual_out,
        x.stride(0), residual.stride(0) if residual is not None else 0, hidden, eps, float(weight_offset),
        HAS_RESIDUAL=residual is not None, SCALE_IN_FP32=scale_in_fp32, BLOCK=block, num_warps=_row_warps(block),
    )
    return out, residual_out


def rms_norm(
    x: torch.Tensor,  # [num_tokens, hidden], last dim contiguous
    weight: torch.Tensor,  # [hidden]
    eps: float,
    weight_offset: float = 0.0,
    scale_in_fp32: bool = False,
) -> torch.Tensor:  # [num_tokens, hidden]
    """RMSNorm in one launch, rounding exactly where layers.norm.RMSNorm does.

    Semantics:
        x32 = x.float(); normed = x32 * rsqrt(mean(x32 ** 2, -1) + eps)
        scale_in_fp32=False (Llama): out = ((w + offset).float() * normed.to(x.dtype).float()).to(promote(x, w))
        scale_in_fp32=True (Gemma):  out = (normed * (offset + w.float())).to(x.dtype)
    """
    return _launch_rms_norm(x, None, weight, eps, weight_offset, scale_in_fp32)[0]


def add_rms_norm(
    x: torch.Tensor,  # [num_tokens, hidden], last dim contiguous
    residual: torch.Tensor,  # [num_tokens, hidden], same dtype as x
    weight: torch.Tensor,  # [hidden]
    eps: float,
    weight_offset: float = 0.0,
    scale_in_fp32: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:  # (normed, new_residual), both [num_tokens, hidden]
    """Residual add then RMSNorm in one launch; both results are new tensors.

    Semantics:
        new_residual = (x.float() + residual.float()).to(x.dtype)
        normed = rms_norm(new_residual, weight, eps, weight_offset, scale_in_fp32)
    """
    return _launch_rms_norm(x, residual, weight, eps, weight_offset, scale_in_fp32)


@triton.jit
def _rotate_heads(src_ptr, dst_ptr, row, row_stride, head_stride, num_heads, cos1, cos2, sin1, sin2,
                  HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_HEADS: tl.constexpr,
                  HEAD_DIM: tl.constexpr, BLOCK_PASS: tl.constexpr):
    heads = tl.arange(0, BLOCK_HEADS)[:, None]
    dims = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (heads < num_heads) & (dims < HALF)
    src = src_ptr + row * row_stride + heads * head_stride + dims
    first = tl.load(src, mask=mask, other=0.0)
    second = tl.load(src + HALF, mask=mask, other=0.0)
    first32, second32 = first.to(tl.float32), second.to(tl.float32)
    dst = dst_ptr + row * num_heads * HEAD_DIM + heads * HEAD_DIM + dims
    tl.store(dst, (first32 * cos1 - second32 * sin1).to(first.dtype), mask=mask)
    tl.store(dst + HALF, (second32 * cos2 + first32 * sin2).to(first.dtype), mask=mask)
    if HEAD_DIM > 2 * HALF:  # partial rotary: the features past the rotary ones are copied as they are
        rest = tl.arange(0, BLOCK_PASS)[None, :]
        rest_mask = (heads < num_heads) & (rest < HEAD_DIM - 2 * HALF)
        kept = tl.load(src_ptr + row * row_stride + heads * head_stride + 2 * HALF + rest, mask=rest_mask, other=0.0)
        tl.store(dst_ptr + row * num_heads * HEAD_DIM + heads * HEAD_DIM + 2 * HALF + rest, kept, mask=rest_mask)


@triton.jit
def _rotary_kernel(
    positions_ptr, q_ptr, k_ptr, cos_ptr, sin_ptr, q_out_ptr, k_out_ptr,
    q_row_stride, q_head_stride, k_row_stride, k_head_stride, cos_row_stride, sin_row_stride,
    num_q_heads, num_kv_heads,
    HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_Q_HEADS: tl.constexpr, BLOCK_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_PASS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    position = tl.load(positions_ptr + row).to(tl.int64)
    dims = tl.arange(0, BLOCK_HALF)[None, :]
    mask = dims < HALF
    # cos/sin are cat([freqs, freqs]); both halves are read so the kernel does not depend on that.
    cos1 = tl.load(cos_ptr + position * cos_row_stride + dims, mask=mask, other=0.0).to(tl.float32)
    cos2 = tl.load(cos_ptr + position * cos_row_stride + HALF + dims, mask=mask, other=0.0).to(tl.float32)
    sin1 = tl.load(sin_ptr + position * sin_row_stride + dims, mask=mask, other=0.0).to(tl.float32)
    sin2 = tl.load(sin_ptr + position * sin_row_stride + HALF + dims, mask=mask, other=0.0).to(tl.float32)
    _rotate_heads(q_ptr, q_out_ptr, row, q_row_stride, q_head_stride, num_q_heads, cos1, cos2, sin1, sin2,
                  HALF, BLOCK_HALF, BLOCK_Q_HEADS, HEAD_DIM, BLOCK_PASS)
    _rotate_heads(k_ptr, k_out_ptr, row, k_row_stride, k_head_stride, num_kv_heads, cos1, cos2, sin1, sin2,
                  HALF, BLOCK_HALF, BLOCK_KV_HEADS, HEAD_DIM, BLOCK_PASS)


def rotary(
    positions: torch.Tensor,  # [num_tokens] int64
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim], any row/head stride, last dim contiguous
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim], same
    cos: torch.Tensor,  # [max_positions, rotary_dim], model dtype (rotary_dim <= head_dim, even)
    sin: torch.Tensor,  # [max_positions, rotary_dim], model dtype
) -> tuple[torch.Tensor, torch.Tensor]:  # contiguous (q_out, k_out)
    """Rotate-half (NeoX) rotary embedding of q and k in one launch (layers.rotary.RotaryEmbedding.forward), over
    the first rotary_dim features of each head (all of them, or a part: NeoX rotary_pct, Phi partial_rotary_factor).

    Semantics, with half = rotary_dim / 2, x1, x2 = x[..., :half], x[..., half:rotary_dim] and c, s = cos[positions],
    sin[positions]:
        out[..., :half] = x1 * c[:half] - x2 * s[:half]
        out[..., half:rotary_dim] = x2 * c[half:] + x1 * s[half:]
        out[..., rotary_dim:] = x[..., rotary_dim:]
    computed in fp32 from the stored values and rounded once. Torch rounds each product and the sum to the model
    dtype, so in bf16/fp16 the two differ by at most 1 ulp; in fp32 they agree to fp32 rounding.
    """
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    rotary_dim = cos.shape[1]
    assert rotary_dim % 2 == 0 and rotary_dim <= head_dim, "rotate-half needs an even rotary_dim <= head_dim"
    assert q.stride(2) == 1 and k.stride(2) == 1 and cos.stride(1) == 1 and sin.stride(1) == 1
    q_out = torch.empty((num_tokens, num_q_heads, head_dim), dtype=q.dtype, device=q.device)
    k_out = torch.empty((num_tokens, num_kv_heads, head_dim), dtype=k.dtype, device=k.device)
    _rotary_kernel[(num_tokens,)](
        positions, q, k, cos, sin, q_out, k_out,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos.stride(0), sin.stride(0),
        num_q_heads, num_kv_heads,
        HALF=rotary_dim // 2, BLOCK_HALF=triton.next_power_of_2(rotary_dim // 2),
        BLOCK_Q_HEADS=triton.next_power_of_2(num_q_heads),
        BLOCK_KV_HEADS=triton.next_power_of_2(num_kv_heads),
        HEAD_DIM=head_dim, BLOCK_PASS=triton.next_power_of_2(max(1, head_dim - rotary_dim)),
        num_warps=4,
    )
    return q_out, k_out


@triton.jit
def _silu_and_mul_kernel(gate_up_ptr, out_ptr, row_stride, intermediate, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < intermediate
    gate = tl.load(gate_up_ptr + row * row_stride + cols, mask=mask, other=0.0)
    up = tl.load(gate_up_ptr + row * row_stride + intermediate + cols, mask=mask, other=0.0).to(tl.float32)
    gate32 = gate.to(tl.float32)
    result = gate32 / (1.0 + tl.exp(-gate32)) * up
    tl.store(out_ptr + row * intermediate + cols, result.to(gate.dtype), mask=mask)


def silu_and_mul(
    gate_up: torch.Tensor,  # [num_tokens, 2 * intermediate], last dim contiguous (gate first, then up)
) -> torch.Tensor:  # [num_tokens, intermediate]
    """SwiGLU activation in one launch (LlamaMLP's `F.silu(gate) * up`).

    Semantics:
        gate, up = gate_up.float().chunk(2, -1)
        out = (gate * sigmoid(gate) * up).to(gate_up.dtype)
    Rounded once; torch rounds silu(gate) before the multiply, so bf16/fp16 results may differ by 1 ulp.
    """
    num_tokens, width = gate_up.shape
    assert width % 2 == 0 and gate_up.stride(1) == 1
    intermediate = width // 2
    out = torch.empty((num_tokens, intermediate), dtype=gate_up.dtype, device=gate_up.device)
    block = min(1024, triton.next_power_of_2(intermediate))
    grid = (num_tokens, triton.cdiv(intermediate, block))
    _silu_and_mul_kernel[grid](gate_up, out, gate_up.stride(0), intermediate, BLOCK=block, num_warps=4)
    return out


@triton.jit
def _write_kv_kernel(
    cache_ptr, k_ptr, v_ptr, slot_mapping_ptr,
    k_row_stride, k_head_stride, v_row_stride, v_head_stride,
    cache_page_stride, cache_kv_stride, cache_offset_stride, cache_head_stride,
    page_size, num_kv_heads, head_dim,
    BLOCK_HEADS: tl.constexpr, BLOCK_DIM: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + row).to(tl.int64)
    heads = tl.arange(0, BLOCK_HEADS)[:, None]
    dims = tl.arange(0, BLOCK_DIM)[None, :]
    # Negative slots are skipped (never written) rather than wrapped as torch indexing would. The slot test is
    # broadcast to the tile because Triton's interpreter rejects a scalar bool inside a mask.
    mask = (heads < num_kv_heads) & (dims < head_dim) & (heads * 0 + slot >= 0)
    page = slot // page_size
    destination = cache_ptr + page * cache_page_stride + (slot - page * page_size) * cache_offset_stride
    destination += heads * cache_head_stride + dims
    k = tl.load(k_ptr + row * k_row_stride + heads * k_head_stride + dims, mask=mask, other=0.0)
    v = tl.load(v_ptr + row * v_row_stride + heads * v_head_stride + dims, mask=mask, other=0.0)
    tl.store(destination, k.to(cache_ptr.dtype.element_ty), mask=mask)
    tl.store(destination + cache_kv_stride, v.to(cache_ptr.dtype.element_ty), mask=mask)


def write_kv(
    kv_cache: torch.Tensor,  # [num_pages, 2, page_size, num_kv_heads, head_dim], last dim contiguous
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim], any row/head stride, last dim contiguous
    v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim], same
    slot_mapping: torch.Tensor,  # [num_tokens] int64, page * page_size + offset; < 0 = skip
) -> None:
    """Scatter this step's K/V into their pages in one launch (attention.base.write_kv).

    Semantics:
        page, offset = slot // page_size, slot % page_size
        kv_cache[page, 0, offset] = k.to(kv_cache.dtype); kv_cache[page, 1, offset] = v.to(kv_cache.dtype)
    """
    num_tokens, num_kv_heads, head_dim = k.shape
    assert v.shape == k.shape and kv_cache.shape[3:] == (num_kv_heads, head_dim)
    assert k.stride(2) == 1 and v.stride(2) == 1 and kv_cache.stride(4) == 1
    _write_kv_kernel[(num_tokens,)](
        kv_cache, k, v, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        kv_cache.shape[2], num_kv_heads, head_dim,
        BLOCK_HEADS=triton.next_power_of_2(num_kv_heads), BLOCK_DIM=triton.next_power_of_2(head_dim),
        num_warps=4,
    )
