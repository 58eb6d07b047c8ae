"""kvrun.punica.ref against LoRA computed row by row (fp32, within 1e-5) over Punica's popularity patterns."""

from __future__ import annotations

import pytest
import torch

from kvrun.punica import REFERENCE_OPS
from tests.punica.checks import MODES, random_base, run_expand, run_shrink
from tests.punica.naive import naive_expand, naive_lora, row_slots_from_segments
from tests.punica.patterns import PATTERNS, RANK_SETTINGS, make_case

TOLERANCE = dict(rtol=1e-5, atol=1e-5)


def _check(case, mode: str) -> None:
    shrunk, delta = naive_lora(case, row_slots_from_segments(case))
    assert case.token_slots.tolist() == row_slots_from_segments(case)  # the BGMV and SGMV views agree

    out = run_shrink(REFERENCE_OPS, case, mode)
    torch.testing.assert_close(out, shrunk, **TOLERANCE)

    base = random_base(case)
    expanded = run_expand(REFERENCE_OPS, case, mode, shrunk, base)
    torch.testing.assert_close(expanded, naive_expand(case, row_slots_from_segments(case), base, delta), **TOLERANCE)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("num_requests", [1, 8, 33])
@pytest.mark.parametrize("rank_setting", list(RANK_SETTINGS))
@pytest.mark.parametrize("pattern", PATTERNS)
def test_reference_matches_row_by_row(pattern: str, rank_setting: str, num_requests: int, mode: str) -> None:
    case = make_case(
        pattern,
        rank_setting,
        num_requests,
        in_features=64,
        out_features=[48, 16, 16],
        max_segment=4 if mode == "sgmv" else 1,
        seed=num_requests,
    )
    _check(case, mode)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("out_features", [[40], [24, 24]])
def test_reference_single_and_pair_slices(out_features: list[int], mode: str) -> None:
    case = make_case("zipf", "mixed", 12, in_features=32, out_features=out_features, max_segment=3)
    _check(case, mode)


def test_patterns_cover_base_rows_and_rank_zero_slices() -> None:
    case = make_case("uniform", "mixed", 16, in_features=8, out_features=[8, 8, 8])
    used = sorted({slot for slot in case.token_slots.tolist() if slot >= 0})
    assert -1 in case.token_slots.tolist()
    assert (case.ranks[:, used] == 0).any()
    assert set(case.ranks.flatten().tolist()) >= {8, 16, 32, 64}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("pattern", PATTERNS)
def test_reference_epilogue_matches_row_by_row(pattern: str, mode: str) -> None:
    """lora_bias (a shift) and DoRA (a scale and a shift) slots beside plain ones, rank-0 slices and base rows."""
    case = make_case(pattern, "mixed", 20, in_features=32, out_features=[24, 8, 8],
                     max_segment=4 if mode == "sgmv" else 1, seed=3, epilogue=True)  # fmt: skip
    used = sorted({slot for slot in case.token_slots.tolist() if slot >= 0})
    active = case.ranks[:, used] > 0
    assert set(case.epilogue.modes[:, used][active].tolist()) == {0, 1, 2}
    _check(case, mode)
