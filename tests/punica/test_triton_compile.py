"""The Triton LoRA kernels compile for an H100 (sm_90) without a GPU, with vectorized, pipelined weight loads.

Catches what the interpreter cannot: type errors of the real compiler, and a layout change that would turn the
16-byte asynchronous weight loads into scalar ones (a 5-10x bandwidth loss). Skipped when triton is not installed.
"""

from __future__ import annotations

import importlib.util
import os
import re

import pytest

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="compiles real kernels"),
]


def _compile(kernel, pointers: dict[str, str], constexprs: dict):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = kernel.arg_names
    signature = {n: "constexpr" if n in constexprs else pointers.get(n, "i32") for n in names}
    # What the launcher's specialization sees at real shapes: aligned pointers, strides and widths divisible by 16.
    prefixes = ("stride", "features", "offset", "in_features", "k_per")
    aligned = [n for n in names if n in pointers or n.startswith(prefixes)]
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    source = ASTSource(kernel, signature, constexprs, attrs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": 3})


def _global_loads(ptx: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    pattern = r"(cp\.async\.c[ag]\.shared\.global) \[[^\]]*\], \[[^\]]*\], (\w+)|(ld\.global[.\w]*)"
    for match in re.finditer(pattern, ptx):
        key = f"{match.group(1)} {match.group(2)}" if match.group(1) else match.group(3)
        counts[key] = counts.get(key, 0) + 1
    return counts


# (weight dtype, max rank): bf16 at the smallest and largest rank, and fp32 for the IEEE dot path.
VARIANTS = [("bf16", 8), ("bf16", 64), ("fp32", 16)]


@pytest.mark.parametrize(("dtype", "max_rank"), VARIANTS)
def test_shrink_compiles_with_16_byte_async_weight_loads(dtype: str, max_rank: int) -> None:
    from kvrun.punica.triton.shrink import _shrink_kernel

    pointers = dict.fromkeys(["x_ptr", "a0_ptr", "a1_ptr", "a2_ptr"], f"*{dtype}")
    pointers |= {"out_ptr": "*fp32", "token_order_ptr": "*i64", "scalings_ptr": "*fp32"}
    pointers |= dict.fromkeys(["group_starts_ptr", "group_slots_ptr", "ranks_ptr"], "*i32")
    constexprs = dict(NUM_SLICES=3, MAX_RANK=max_rank, RANK_PROGRAMS=1, BLOCK_M=16, BLOCK_R=16)
    constexprs |= dict(BLOCK_K=256, BLOCK_GROUPS=64, SORTED=True, ATOMIC=True, IEEE_FP32=dtype == "fp32")
    loads = _global_loads(_compile(_shrink_kernel, pointers, constexprs).asm["ptx"])
    assert loads.get("cp.async.cg.shared.global 0x10", 0) > 0, loads
    assert not any(kind.startswith("ld.global.b16") for kind in loads), loads


@pytest.mark.parametrize("epilogue", [False, True], ids=["plain", "epilogue"])
@pytest.mark.parametrize(("dtype", "max_rank"), VARIANTS)
def test_expand_compiles_with_16_byte_async_weight_loads(dtype: str, max_rank: int, epilogue: bool) -> None:
    from kvrun.punica.triton.expand import _expand_kernel

    pointers = dict.fromkeys(["b0_ptr", "b1_ptr", "b2_ptr", "out_ptr"], f"*{dtype}")
    pointers |= {"y_ptr": "*fp32", "token_order_ptr": "*i64"}
    pointers |= dict.fromkeys(["group_starts_ptr", "group_slots_ptr", "ranks_ptr", "modes_ptr"], "*i32")
    pointers |= dict.fromkeys(["scale0_ptr", "scale1_ptr", "scale2_ptr"], "*fp32")
    pointers |= dict.fromkeys(["shift0_ptr", "shift1_ptr", "shift2_ptr"], f"*{dtype}")
    constexprs = dict(NUM_SLICES=3, MAX_RANK=max_rank, BLOCK_M=16, BLOCK_N=256, BLOCK_R=16, BLOCK_GROUPS=64)
    constexprs |= dict(SORTED=True, IEEE_FP32=dtype == "fp32", EPILOGUE=epilogue)
    loads = _global_loads(_compile(_expand_kernel, pointers, constexprs).asm["ptx"])
    assert loads.get("cp.async.cg.shared.global 0x10", 0) > 0, loads
    assert not any(kind.startswith("ld.global.b16") for kind in loads), loads
