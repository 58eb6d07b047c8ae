"""Triton LoRA kernels vs the torch reference on CUDA, at Llama-3-8B shapes (hidden 4096; q/k/v slices 4096/1024/1024).

Cases: Punica's popularity patterns x ranks (8, 16, 64, mixed, uneven) x batch sizes (1, 8, 32, 128 requests), as SGMV
prefill segments (1-16 tokens per request) and BGMV decode (one token per request, unsorted), with base rows, a
spare slot, rank-0 slices, a rank and scaling per slice of each slot (PEFT's rank_pattern / alpha_pattern) and
padding past each rank filled with a large value (reading it fails loudly).

Tolerance (bf16): the truth is the reference run in fp32 on the same bf16 values. Every output must satisfy
    max |triton - truth| <= 2^-6 * max |truth|
bf16 keeps 8 significant bits (rounding error 2^-9); the kernels accumulate in fp32 and round the shrink output
and the expanded output once each, so a few roundings stay well inside 2^-6. fp16 (11 bits): 2^-8. fp32 inputs
(the kernels use IEEE fp32 dots): 1e-4. Rows outside every segment must match exactly: zero after shrink,
untouched after expand.
"""

from __future__ import annotations

import pytest
import torch

from kvrun.punica import REFERENCE_OPS
from kvrun.punica.metadata import LoRAKernelMeta
from tests.punica.checks import MODES, random_base, run_expand, run_shrink
from tests.punica.patterns import PATTERNS, RANK_SETTINGS, LoRACase, make_case

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

HIDDEN = 4096
QKV = [4096, 1024, 1024]
RELATIVE_TOLERANCE = {torch.bfloat16: 2**-6, torch.float16: 2**-8, torch.float32: 1e-4}


@pytest.fixture(scope="module")
def triton_module():
    import kvrun.punica.triton as module

    return module


def _case(
    pattern: str, rank_setting: str, num_requests: int, mode: str, dtype=torch.bfloat16, epilogue=False, **shape
) -> LoRACase:
    return make_case(
        pattern,
        rank_setting,
        num_requests,
        in_features=shape.get("in_features", HIDDEN),
        out_features=shape.get("out_features", QKV),
        max_segment=16 if mode == "sgmv" else 1,
        dtype=dtype,
        device="cuda",
        seed=num_requests,
        epilogue=epilogue,
    )


def _assert_close(actual: torch.Tensor, truth: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    error = (actual.float() - truth).abs().max().item()
    scale = truth.abs().max().item()
    assert error <= RELATIVE_TOLERANCE[dtype] * max(scale, 1e-6), f"{what}: max error {error:.3g}, scale {scale:.3g}"


def _check(ops, case: LoRACase, mode: str, shrink_dtype: torch.dtype) -> None:
    dtype = case.x.dtype
    exact = case.to(torch.float32)
    base_rows = case.token_slots < 0

    truth_shrunk = run_shrink(REFERENCE_OPS, exact, mode)
    shrunk = run_shrink(ops, case, mode, shrink_dtype)
    _assert_close(shrunk, truth_shrunk, dtype, "shrink")
    assert (shrunk[:, base_rows] == 0).all(), "base rows must be zero after shrink"

    y = truth_shrunk.to(shrink_dtype)
    base = random_base(case)
    truth_out = run_expand(REFERENCE_OPS, exact, mode, y.float(), base.float())
    out = run_expand(ops, case, mode, y, base)
    _assert_close(out, truth_out, dtype, "expand")
    assert torch.equal(out[base_rows], base[base_rows]), "base rows must be untouched by expand"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("num_requests", [1, 8, 32, 128])
@pytest.mark.parametrize("rank_setting", list(RANK_SETTINGS))
@pytest.mark.parametrize("pattern", PATTERNS)
def test_qkv_bf16_matches_reference(triton_module, pattern, rank_setting, num_requests, mode) -> None:
    case = _case(pattern, rank_setting, num_requests, mode)
    # Decode shrinks into fp32 (split-K with atomics), prefill into bf16 (plain stores): both paths get covered.
    _check(triton_module.TRITON_OPS, case, mode, torch.float32 if mode == "bgmv" else torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("mode", MODES)
def test_other_dtypes(triton_module, dtype, mode) -> None:
    case = _case("zipf", "mixed", 32, mode, dtype=dtype)
    _check(triton_module.TRITON_OPS, case, mode, torch.float32)


@pytest.mark.parametrize(
    "shape", [dict(out_features=[14336, 14336]), dict(in_features=14336, out_features=[4096])], ids=["gate_up", "down"]
)
@pytest.mark.parametrize("mode", MODES)
def test_mlp_shapes(triton_module, shape, mode) -> None:
    case = _case("uniform", "16", 32, mode, **shape)
    _check(triton_module.TRITON_OPS, case, mode, torch.float32)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("num_requests", [1, 8, 32, 128])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_epilogue_bf16_matches_reference(triton_module, pattern, num_requests, mode) -> None:
    """lora_bias (a shift) and DoRA (a per-feature scale and shift) slots beside plain LoRA slots, q/k/v shapes."""
    case = _case(pattern, "mixed", num_requests, mode, epilogue=True)
    _check(triton_module.TRITON_OPS, case, mode, torch.float32 if mode == "bgmv" else torch.bfloat16)


@pytest.mark.parametrize("mode", MODES)
def test_epilogue_mlp_shapes(triton_module, mode) -> None:
    case = _case("zipf", "uneven", 32, mode, epilogue=True, out_features=[14336, 14336])
    _check(triton_module.TRITON_OPS, case, mode, torch.float32)


def test_cuda_graph_replays_new_batches(triton_module) -> None:
    """Group, shrink and expand captured once; replays follow new slots and inputs written into the same buffers."""
    first = _case("zipf", "mixed", 32, "bgmv")
    num_slots = first.ranks.shape[1]
    meta = LoRAKernelMeta(max_tokens=64, num_slots=num_slots, device="cuda")
    token_slots = first.token_slots.clone()
    x = first.x.clone()
    shrunk = torch.zeros(first.num_slices, first.num_tokens, first.max_rank, device="cuda")
    out = torch.zeros(first.num_tokens, first.out_features, dtype=x.dtype, device="cuda")

    def step() -> None:
        groups = meta.group_tokens(token_slots)
        triton_module.shrink(x, first.lora_a, groups, first.ranks, first.scalings, shrunk)
        triton_module.expand(shrunk, first.lora_b, groups, first.ranks, out, first.slice_offsets)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # compiles the kernels outside capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()

    generator = torch.Generator().manual_seed(7)
    for _ in range(3):
        new_slots = torch.randint(-1, num_slots, (first.num_tokens,), generator=generator, dtype=torch.int32)
        token_slots.copy_(new_slots)
        x.normal_()
        out.zero_()
        graph.replay()
        case = LoRACase(
            x,
            first.lora_a,
            first.lora_b,
            first.ranks,
            first.scalings,
            first.slice_offsets,
            token_slots.clone(),
            first.seg_indptr,
            first.seg_slots,
        )
        exact = case.to(torch.float32)
        truth_shrunk = run_shrink(REFERENCE_OPS, exact, "bgmv")
        _assert_close(shrunk, truth_shrunk, x.dtype, "graph shrink")
        truth_out = run_expand(REFERENCE_OPS, exact, "bgmv", shrunk, torch.zeros_like(out, dtype=torch.float32))
        _assert_close(out, truth_out, x.dtype, "graph expand")


def test_torch_compile_fullgraph(triton_module) -> None:
    case = _case("skewed", "16", 32, "bgmv")
    groups = LoRAKernelMeta(64, case.ranks.shape[1], "cuda").group_tokens(case.token_slots)

    def lora(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        shrunk = torch.empty(case.num_slices, x.shape[0], case.max_rank, device=x.device)
        triton_module.shrink(x, case.lora_a, groups, case.ranks, case.scalings, shrunk)
        triton_module.expand(shrunk, case.lora_b, groups, case.ranks, out, case.slice_offsets)
        return out

    base = random_base(case)
    eager = lora(case.x, base.clone())
    compiled = torch.compile(lora, fullgraph=True)(case.x, base.clone())
    # Not bit-exact: split-K partial sums land in a different order from run to run.
    _assert_close(compiled, eager.float(), case.x.dtype, "compiled")


def test_custom_ops_pass_opcheck(triton_module) -> None:
    case = _case("uniform", "mixed", 8, "bgmv")
    groups = LoRAKernelMeta(16, case.ranks.shape[1], "cuda").group_tokens(case.token_slots)
    shrunk = torch.zeros(case.num_slices, case.num_tokens, case.max_rank, device="cuda")
    grouping = (groups.token_order, groups.group_starts, groups.group_slots)
    torch.library.opcheck(
        torch.ops.kvrun.lora_shrink.default, (case.x, case.lora_a, *grouping, case.ranks, case.scalings, shrunk)
    )
    out = random_base(case)
    expand_args = (shrunk, case.lora_b, *grouping, case.ranks, out, case.slice_offsets)
    torch.library.opcheck(torch.ops.kvrun.lora_expand.default, (*expand_args, None, [], []))
    epilogue = _case("uniform", "mixed", 8, "bgmv", epilogue=True).epilogue
    torch.library.opcheck(
        torch.ops.kvrun.lora_expand.default, (*expand_args, epilogue.modes, list(epilogue.scale), list(epilogue.shift))
    )
