"""Start-up compilation of the LoRA kernels: the warm-up step shapes reach every kernel variant a live step can."""

from __future__ import annotations

import pytest
import torch

from kvrun.punica.triton.configs import _block_m, warm_up_shapes
from kvrun.punica.triton.tiles import groups_block


def _variant(tokens: int, segments: int) -> tuple[int, int]:
    return _block_m(tokens, segments), groups_block(segments)


@pytest.mark.parametrize(("max_tokens", "max_segments"), [(512, 256), (8192, 256), (256, 64), (2048, 1024)])
def test_warm_up_shapes_reach_every_row_tile_and_group_table_variant(max_tokens, max_segments):
    shapes = warm_up_shapes(max_tokens, max_segments)
    assert all(segments * rows <= max_tokens and segments <= max_segments for segments, rows in shapes)
    warmed = {_variant(segments * rows, segments) for segments, rows in shapes}
    reachable = {
        _variant(tokens, segments)
        for tokens in range(1, max_tokens + 1, 7)
        for segments in (1, 2, 17, 33, 64, 65, 100, 129, 200, 256, 257, 600, 1024)
        if segments <= min(tokens, max_segments)
    }
    assert reachable <= warmed, sorted(reachable - warmed)


def test_segment_shapes_run_leave_the_slots_alone():
    from kvrun.adapters.layers import LinearWithLoRA
    from kvrun.punica import REFERENCE_OPS
    from kvrun.runtime.layers.linear import Projection

    base = Projection(32, {"q": 16, "k": 8, "v": 8}, bias=False)
    wrapper = LinearWithLoRA(base, num_slots=2, max_rank=8, ops=REFERENCE_OPS)
    before = [tensor.clone() for tensor in (*wrapper.lora_a, *wrapper.lora_b, wrapper.ranks)]
    wrapper.run_segment_shapes(warm_up_shapes(64, 4))
    after = (*wrapper.lora_a, *wrapper.lora_b, wrapper.ranks)
    assert all(torch.equal(old, new) for old, new in zip(before, after, strict=True))
    assert wrapper.shape_key() == LinearWithLoRA(base, 2, 8, REFERENCE_OPS).shape_key()
