"""The Triton kernels under TRITON_INTERPRET=1 on CPU tensors, against the torch reference (fp32, within 1e-5).

Run in its own process (test_triton_interpret.py does): the interpreter is chosen when triton.jit decorates the
kernels, so the variable must be set before kvrun.punica.triton is first imported, and must not leak into a process
that runs the real GPU kernels.  Usage: TRITON_INTERPRET=1 python -m tests.punica.interpret_check [--extended]
"""

from __future__ import annotations

import os
import sys
import time

import torch

from kvrun.punica import REFERENCE_OPS
from kvrun.punica.metadata import LoRAKernelMeta
from tests.punica.checks import random_base, run_expand, run_shrink
from tests.punica.patterns import make_case

# (pattern, ranks, requests, mode, tokens per request, output slices, shrink output dtype).
# Together: every pattern and rank setting, both modes, 1-4 slices (4 = two launches), split-K atomics (fp32 out)
# and plain stores (fp16 out), 16- and 32-row tiles.
CASES = [
    ("distinct", "mixed", 5, "bgmv", 1, [16, 16], torch.float32),
    ("zipf", "64", 6, "sgmv", 3, [32], torch.float32),
    ("uniform", "16", 9, "bgmv", 1, [24, 16, 8], torch.float32),
    ("identical", "8", 40, "bgmv", 1, [16, 32], torch.float32),
    ("skewed", "mixed", 8, "sgmv", 2, [40], torch.float16),
    ("uniform", "8", 6, "sgmv", 3, [16, 16, 16, 16], torch.float32),
    ("zipf", "uneven", 7, "sgmv", 3, [24, 16], torch.float32),
    ("uniform", "uneven", 9, "bgmv", 1, [16, 8, 8], torch.float32),
]
# The lora_bias / DoRA expand epilogue (a shift; a scale and a shift) beside plain slots, over 1-4 slices.
EPILOGUE_CASES = [
    ("zipf", "mixed", 9, "sgmv", 3, [24, 16, 8], torch.float32),
    ("skewed", "uneven", 8, "bgmv", 1, [16, 16, 16, 8], torch.float32),
    ("uniform", "16", 6, "sgmv", 2, [40], torch.float16),
]
# --extended (a slow test): wider inputs (several K blocks and split-K programs), more rows than one tile, up to
# six slices (two launches of three), fp16 shrink outputs over mixed ranks.
EXTENDED_CASES = [
    ("distinct", "mixed", 24, "bgmv", 1, [64, 32, 32], torch.float32, 200),
    ("zipf", "64", 12, "sgmv", 6, [48, 48], torch.float32, 200),
    ("skewed", "uneven", 16, "bgmv", 1, [16, 16, 16, 16, 16, 16], torch.float16, 96),
    ("identical", "16", 70, "bgmv", 1, [32], torch.float32, 160),
]


def check_case(
    triton_ops, pattern, rank_setting, num_requests, mode, max_segment, out_features, out_dtype, in_features=48,
    epilogue=False,
) -> str:
    case = make_case(
        pattern, rank_setting, num_requests, in_features=in_features, out_features=out_features, max_segment=max_segment,
        epilogue=epilogue,
    )  # fmt: skip
    tolerance = dict(rtol=1e-5, atol=1e-5) if out_dtype == torch.float32 else dict(rtol=1e-3, atol=1e-3)
    expected = run_shrink(REFERENCE_OPS, case, mode, out_dtype)
    torch.testing.assert_close(run_shrink(triton_ops, case, mode, out_dtype), expected, **tolerance)

    y = expected.to(case.x.dtype)
    base = random_base(case)
    torch.testing.assert_close(
        run_expand(triton_ops, case, mode, y, base),
        run_expand(REFERENCE_OPS, case, mode, y, base),
        rtol=1e-5,
        atol=1e-5,
    )
    return f"{pattern}/{rank_setting}/{num_requests}/{mode}/{len(out_features)} slices{' +epilogue' * epilogue}"


def check_shared_groups(triton_ops_module) -> str:
    """One LoRAKernelMeta grouping reused by shrink and expand, as an engine step would."""
    case = make_case("zipf", "16", 10, in_features=48, out_features=[16, 16])
    meta = LoRAKernelMeta(max_tokens=32, num_slots=case.ranks.shape[1], device="cpu")
    groups = meta.group_tokens(case.token_slots)
    shrunk = torch.empty(case.num_slices, case.num_tokens, case.max_rank)
    triton_ops_module.shrink(case.x, case.lora_a, groups, case.ranks, case.scalings, shrunk)
    expected = run_shrink(REFERENCE_OPS, case, "bgmv")
    torch.testing.assert_close(shrunk, expected, rtol=1e-5, atol=1e-5)
    base = random_base(case)
    out = base.clone()
    triton_ops_module.expand(shrunk, case.lora_b, groups, case.ranks, out, case.slice_offsets)
    torch.testing.assert_close(out, run_expand(REFERENCE_OPS, case, "bgmv", shrunk, base), rtol=1e-5, atol=1e-5)
    return "shared LoRAKernelMeta groups"


def main() -> int:
    if os.environ.get("TRITON_INTERPRET") != "1":
        print("set TRITON_INTERPRET=1", file=sys.stderr)
        return 2
    import kvrun.punica.triton as triton_ops_module

    started = time.perf_counter()
    for case in EXTENDED_CASES if "--extended" in sys.argv[1:] else CASES:
        case_started = time.perf_counter()
        name = check_case(triton_ops_module.TRITON_OPS, *case)
        print(f"ok {name} ({time.perf_counter() - case_started:.1f} s)", flush=True)
    if "--extended" not in sys.argv[1:]:
        for case in EPILOGUE_CASES:
            case_started = time.perf_counter()
            name = check_case(triton_ops_module.TRITON_OPS, *case, epilogue=True)
            print(f"ok {name} ({time.perf_counter() - case_started:.1f} s)", flush=True)
        print("ok", check_shared_groups(triton_ops_module), flush=True)
    print(f"interpreter checks took {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
