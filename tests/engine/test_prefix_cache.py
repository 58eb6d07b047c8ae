"""Prefix caching keyed by adapter identity: shared prefixes run once per adapter, never across adapters."""

from __future__ import annotations

import pytest
import torch

from kvrun import LLM, SamplingParams
from kvrun.engine.block_manager import BlockManager, block_key, root_key

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, logprobs=2, ignore_eos=True)
BLOCK = 4
LOGPROB_ATOL = 1e-5  # cached prefixes only change how many rows one matmul sees (fp32 rounding ~1e-6)


def make_llm(model, **options) -> LLM:
    base, adapters = model
    llm = LLM(str(base), max_loras=4, max_lora_rank=16, block_size=BLOCK, **{"num_blocks": 128, **options})
    for name, directory in adapters.items():
        llm.load_adapter(name, directory)
    return llm


def random_prompt(length: int, seed: int) -> list[int]:
    return torch.randint(3, 250, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def assert_same(output, expected) -> None:
    assert output.token_ids == expected.token_ids
    for mine, theirs in zip(output.logprobs, expected.logprobs, strict=True):
        assert mine.keys() == theirs.keys()
        assert all(abs(mine[token] - theirs[token]) <= LOGPROB_ATOL for token in mine)


def assert_pool_is_whole(blocks: BlockManager) -> None:
    """No request holds a block, and the cache's two maps agree."""
    assert blocks.num_free == blocks.num_blocks
    assert all(blocks.refcount(block) == 0 for block in range(blocks.num_blocks))
    assert all(blocks._key_of[block] == key for key, block in blocks._cached.items())
    assert sum(key is not None for key in blocks._key_of) == blocks.num_cached


def test_same_prompt_on_two_adapters_equals_each_solo_run(tiny_gqa):
    first, second = list(tiny_gqa[1])[:2]
    prompt = random_prompt(30, seed=1)
    uncached = make_llm(tiny_gqa, enable_prefix_caching=False)
    solo = {name: uncached.generate([prompt], GREEDY, adapters=[name])[0] for name in (first, second, None)}
    llm = make_llm(tiny_gqa)
    stats = llm.engine.scheduler.stats
    assert_same(llm.generate([prompt], GREEDY, adapters=[first])[0], solo[first])
    assert stats.prefix_cache_hits == 0
    # The same tokens under another adapter (or none) have other K/V: no hit may cross.
    assert_same(llm.generate([prompt], GREEDY, adapters=[second])[0], solo[second])
    assert_same(llm.generate([prompt], GREEDY, adapters=[None])[0], solo[None])
    assert stats.prefix_cache_hits == 0
    again = llm.generate([prompt], GREEDY, adapters=[first])[0]
    assert_same(again, solo[first])
    assert stats.prefix_cache_hits == (len(prompt) - 1) // BLOCK * BLOCK == 28
    # All at once: each row still equals its solo run, and only same-adapter rows share.
    before = stats.prefix_cache_hits
    together = llm.generate([prompt] * 4, GREEDY, adapters=[first, second, None, second])
    for output, name in zip(together, [first, second, None, second]):
        assert_same(output, solo[name])
    assert stats.prefix_cache_hits - before == 4 * 28
    assert_pool_is_whole(llm.engine.blocks)


def test_shared_system_prompt_is_prefilled_once_per_adapter(tiny_gqa):
    names = list(tiny_gqa[1])[:2]
    system = random_prompt(40, seed=2)  # ten full blocks
    rows = [(system + random_prompt(5 + index, seed=10 + index), name) for index, name in enumerate(names * 3)]
    uncached = make_llm(tiny_gqa, enable_prefix_caching=False)
    expected = uncached.generate([prompt for prompt, _ in rows], GREEDY, adapters=[name for _, name in rows])
    llm = make_llm(tiny_gqa, max_num_batched_tokens=64)
    requests = [llm.engine.add_request(prompt, GREEDY, name) for prompt, name in rows]
    done = {}
    while llm.engine.has_unfinished():
        done.update({output.request_id: output for output in llm.engine.step() if output.finished})
    for request, want in zip(requests, expected):
        assert_same(done[request.request_id], want)
    # The first request of each adapter computes its whole prompt; the others only what follows the system prompt.
    total = sum(len(prompt) for prompt, _ in rows)
    stats = llm.engine.scheduler.stats
    assert stats.computed_prompt_tokens == total - 4 * len(system)
    assert stats.prefix_cache_hits == 4 * len(system)
    assert [request.num_cached_tokens for request in requests] == [0, 0] + [len(system)] * 4
    assert_pool_is_whole(llm.engine.blocks)


def test_generated_tokens_are_cached_for_the_next_turn(tiny_gqa):
    llm = make_llm(tiny_gqa)
    prompt = random_prompt(9, seed=3)
    first = llm.generate([prompt], SamplingParams(max_tokens=15, temperature=0.0, ignore_eos=True))[0]
    follow_up = prompt + first.token_ids + random_prompt(6, seed=4)
    hits = llm.engine.scheduler.stats.prefix_cache_hits
    llm.generate([follow_up], GREEDY)
    # Prompt and answer are 24 tokens; 23 have K/V (the last sampled token never ran): 5 full blocks to reuse.
    assert llm.engine.scheduler.stats.prefix_cache_hits - hits == 5 * BLOCK


def test_preemption_and_aborts_keep_counts_exact(tiny_gqa):
    names = [*tiny_gqa[1], None]
    system = random_prompt(16, seed=5)
    rows = [(system + random_prompt(6 + 3 * index, seed=20 + index), names[index % 2]) for index in range(6)]
    params = SamplingParams(max_tokens=14, temperature=0.0, ignore_eos=True)
    uncached = make_llm(tiny_gqa, enable_prefix_caching=False)
    expected = [output.token_ids for output in uncached.generate([p for p, _ in rows], params, [n for _, n in rows])]
    llm = make_llm(tiny_gqa, num_blocks=20, max_num_seqs=4, max_num_batched_tokens=12)
    engine = llm.engine
    requests = [engine.add_request(prompt, params, name) for prompt, name in rows]
    aborted = engine.add_request(system + [7, 8, 9], params, names[0])
    done, steps = {}, 0
    while engine.has_unfinished():
        done.update({output.request_id: output.token_ids for output in engine.step() if output.finished})
        steps += 1
        if steps == 6:
            engine.abort_request(aborted.request_id)
        held = {block for request in engine.scheduler.running for block in request.block_table}
        assert len(held) + engine.blocks.num_free == engine.blocks.num_blocks
        for block in held:
            users = sum(request.block_table.count(block) for request in engine.scheduler.running)
            assert engine.blocks.refcount(block) == users
    assert engine.scheduler.stats.num_preemptions > 0
    assert engine.scheduler.stats.prefix_cache_hits > 0
    assert [done[request.request_id] for request in requests] == expected
    assert_pool_is_whole(engine.blocks)
    assert all(engine.adapters.slots.pins(ref) == 0 for ref in engine.adapters.slots.resident())


def test_a_failed_step_leaves_nothing_to_reuse(tiny_gqa):
    llm = make_llm(tiny_gqa)
    engine = llm.engine
    prompt = random_prompt(20, seed=6)
    request = engine.add_request(prompt, GREEDY)
    execute = engine.runner.execute

    def broken(batch, previous=None):
        raise RuntimeError("device lost")

    engine.runner.execute = broken
    with pytest.raises(RuntimeError, match="device lost"):
        engine.step()
    engine.runner.execute = execute
    engine.abort_request(request.request_id)
    assert engine.blocks.num_cached == 0
    llm.generate([prompt], GREEDY)
    assert engine.scheduler.stats.prefix_cache_hits == 0
    assert_pool_is_whole(engine.blocks)


def test_caching_off_shares_nothing(tiny_gqa):
    llm = make_llm(tiny_gqa, enable_prefix_caching=False)
    prompt = random_prompt(20, seed=7)
    llm.generate([prompt, prompt], GREEDY)
    llm.generate([prompt], GREEDY)
    assert llm.engine.scheduler.stats.prefix_cache_hits == 0
    assert llm.engine.blocks.num_cached == 0


def chain(tokens: list[int], identity: bytes = b"") -> list[bytes]:
    keys, parent = [], root_key(identity)
    for start in range(0, len(tokens) - len(tokens) % BLOCK, BLOCK):
        parent = block_key(parent, tokens[start : start + BLOCK])
        keys.append(parent)
    return keys


def test_keys_chain_tokens_and_adapter_identity():
    tokens = list(range(12))
    assert chain(tokens) == chain(tokens)
    assert chain(tokens, b"adapter-a") != chain(tokens, b"adapter-b")
    assert chain(tokens, b"adapter-a")[0] != chain(tokens)[0]
    changed = chain([99, *tokens[1:]])
    assert all(mine != other for mine, other in zip(changed, chain(tokens)))  # a change reaches every later block
    assert chain(tokens[:8]) == chain(tokens)[:2]


def test_evictable_blocks_are_reused_then_evicted_least_recently_freed_first():
    blocks = BlockManager(num_blocks=6, block_size=BLOCK)
    first, second = chain(list(range(8)), b"x"), chain(list(range(100, 108)), b"x")
    tables = [[], []]
    for table, keys in zip(tables, (first, second)):
        blocks.grow(table, 8)
        for block, key in zip(table, keys):
            assert blocks.cache(block, key)
    first_blocks = list(tables[0])
    blocks.free(tables[0])
    blocks.free(tables[1])
    assert blocks.num_free == 6 and blocks.num_cached == 4
    # Two empty blocks go first; the third block evicts the least recently freed cached one (first's tail).
    other: list[int] = []
    blocks.grow(other, 12)
    assert blocks.num_cached == 3
    assert blocks.match(first) == first_blocks[:1]
    assert len(blocks.match(second)) == 2
    # Sharing takes a reference; a shared block is not free until every user lets go.
    table: list[int] = []
    blocks.share(table, blocks.match(second))
    reader: list[int] = []
    blocks.share(reader, blocks.match(second))
    assert [blocks.refcount(block) for block in table] == [2, 2]
    blocks.free(table)
    assert blocks.num_free == 1  # first's head stays evictable; second's two blocks are still read
    blocks.free(reader)
    blocks.free(other)
    assert blocks.num_free == 6
    with pytest.raises(RuntimeError, match="freed twice"):
        blocks.free([first_blocks[0]])
