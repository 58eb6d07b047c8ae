"""How tensor parallelism splits a run of rows (kvrun.runtime.layers.linear.Split), and the models it refuses."""

from __future__ import annotations

import pytest

from kvrun.runtime.distributed.group import check_shardable
from kvrun.runtime.layers.linear import Split
from kvrun.runtime.models.registry import read_model_config

HEAD = 2  # rows per head


def test_units_split_evenly_or_are_replicated_whole():
    assert [Split(8, HEAD).local(rank, 2) for rank in range(2)] == [[(0, 8)], [(8, 8)]]
    # One K/V head on four ranks: every rank holds all of it.
    assert [Split(1, HEAD).local(rank, 4) for rank in range(4)] == [[(0, HEAD)]] * 4
    with pytest.raises(ValueError, match="do not split evenly"):
        Split(3, HEAD).local(0, 2)
    with pytest.raises(ValueError, match="cannot be replicated evenly"):
        Split(2, HEAD).local(0, 3)


def test_a_shared_group_splits_its_queries_and_copies_its_key_and_value():
    """Fused per-K/V-head q/k/v: two groups of [4 query heads, k, v] over four ranks. Ranks 0 and 1 share group 0,
    each with two of its query heads (rank r holds query heads 2r, 2r+1 of the model, as the o projection expects)
    and its key and value."""
    group = (Split(4, HEAD), Split(1, HEAD), Split(1, HEAD))
    layout = Split(2, 6 * HEAD, group)
    assert layout.local(0, 4) == [(0, 4), (8, 2), (10, 2)]
    assert layout.local(1, 4) == [(4, 4), (8, 2), (10, 2)]
    assert layout.local(3, 4) == [(16, 4), (20, 2), (22, 2)]
    assert layout.local(1, 2) == [(12, 12)]  # as many groups as ranks: whole groups
    with pytest.raises(ValueError, match="do not add up"):
        Split(2, 5 * HEAD, group)


def test_a_model_that_does_not_split_evenly_is_refused_with_the_reason():
    config = {"architectures": ["LlamaForCausalLM"], "vocab_size": 256, "hidden_size": 96, "intermediate_size": 102,
              "num_hidden_layers": 1, "num_attention_heads": 6, "num_key_value_heads": 3}  # fmt: skip
    with pytest.raises(ValueError) as refused:
        check_shardable(read_model_config(config, "tiny"), 4)
    message = str(refused.value)
    assert "tensor_parallel_size=4" in message and "num_attention_heads 6" in message
    assert "num_key_value_heads 3" in message and "intermediate_size 102" in message
