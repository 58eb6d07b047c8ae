"""Grouping decode tokens by slot (kvrun.punica.metadata) on CPU tensors."""

from __future__ import annotations

import torch

from kvrun.punica.metadata import LoRAKernelMeta, SlotGroups, group_tokens


def test_group_tokens_sorts_by_slot_and_skips_base_tokens() -> None:
    meta = LoRAKernelMeta(max_tokens=16, num_slots=5, device="cpu")
    token_slots = torch.tensor([3, -1, 0, 3, 4, -1, 0, 3], dtype=torch.int32)
    groups = meta.group_tokens(token_slots)

    assert groups.token_order.tolist() == [1, 5, 2, 6, 0, 3, 7, 4]  # stable: batch order within a slot
    assert groups.group_starts.tolist() == [2, 4, 4, 4, 7, 8]  # slot s: token_order[starts[s]:starts[s+1]]
    assert groups.group_slots.tolist() == [0, 1, 2, 3, 4]
    for slot in range(5):
        rows = groups.token_order[groups.group_starts[slot] : groups.group_starts[slot + 1]]
        assert (token_slots[rows] == slot).all()


def test_group_tokens_reuses_its_buffers() -> None:
    meta = LoRAKernelMeta(max_tokens=8, num_slots=3, device="cpu")
    first = meta.group_tokens(torch.tensor([2, 1, 0], dtype=torch.int32))
    second = meta.group_tokens(torch.tensor([0, 0, 2, 1, -1], dtype=torch.int32))

    assert first.group_starts.data_ptr() == second.group_starts.data_ptr() == meta.group_starts.data_ptr()
    assert second.token_order.data_ptr() == meta.token_order.data_ptr()
    assert second.token_order.tolist() == [4, 0, 1, 3, 2]
    assert second.group_starts.tolist() == [1, 3, 4, 5]


def test_segments_pass_through() -> None:
    seg_indptr = torch.tensor([0, 3, 4], dtype=torch.int32)
    seg_slots = torch.tensor([1, -1], dtype=torch.int32)
    groups = SlotGroups.from_segments(seg_indptr, seg_slots)
    assert groups.token_order is None and groups.num_groups == 2
    assert groups.group_starts is seg_indptr and groups.group_slots is seg_slots


def test_one_off_grouping_matches_the_preallocated_one() -> None:
    token_slots = torch.tensor([2, 2, -1, 0, 1, 2, 0], dtype=torch.int32)
    fresh = group_tokens(token_slots, num_slots=4)
    kept = LoRAKernelMeta(max_tokens=7, num_slots=4, device="cpu").group_tokens(token_slots)
    assert fresh.token_order.tolist() == kept.token_order.tolist() == [2, 3, 6, 4, 0, 1, 5]
    assert fresh.group_starts.tolist() == kept.group_starts.tolist() == [1, 3, 4, 7, 7]
    assert fresh.group_slots.tolist() == kept.group_slots.tolist() == [0, 1, 2, 3]
