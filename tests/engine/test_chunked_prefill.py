"""Chunked prefill and mixed steps: same results as whole prompts, running streams never stall, bounded memory."""

from __future__ import annotations

import pytest
import torch

from kvrun import LLM, SamplingParams
from kvrun.config import SchedulerConfig
from tests.factories import HFReference

GREEDY_LOGPROBS = SamplingParams(max_tokens=6, temperature=0.0, logprobs=3, ignore_eos=True)
LOGPROB_RTOL = 1e-4  # against HF + PEFT, as in test_parity
CHUNKED_ATOL = 1e-5  # chunked against whole prompts: fp32 matmuls of other row counts round differently (~1e-6)


def make_llm(model, **options) -> LLM:
    base, adapters = model
    llm = LLM(str(base), max_loras=4, max_lora_rank=16, block_size=4, **{"num_blocks": 128, **options})
    for name, directory in adapters.items():
        llm.load_adapter(name, directory)
    return llm


def random_prompt(length: int, seed: int) -> list[int]:
    return torch.randint(3, 250, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def mixed_rows(adapter_names: list[str]) -> list[tuple[list[int], str | None]]:
    names = [*adapter_names, None, *adapter_names[:2], None]
    return [(random_prompt(5 + 9 * index % 37, seed=index), name) for index, name in enumerate(names)]


def generate(llm: LLM, rows, params: SamplingParams = GREEDY_LOGPROBS):
    return llm.generate([prompt for prompt, _ in rows], params, adapters=[adapter for _, adapter in rows])


def assert_same_logprobs(ours: list[dict[int, float]], theirs: list[dict[int, float]]) -> None:
    for step, (mine, other) in enumerate(zip(ours, theirs, strict=True)):
        assert mine.keys() == other.keys(), step
        for token_id, value in mine.items():
            assert abs(value - other[token_id]) <= CHUNKED_ATOL, (step, token_id)


def test_chunked_prefill_matches_whole_prompts_and_hf_peft(tiny_model):
    """A budget of 8 tokens splits every prompt (5..41 tokens) and mixes its chunks with other rows' decodes."""
    rows = mixed_rows(list(tiny_model[1]))
    chunked_llm = make_llm(tiny_model, max_num_seqs=8, max_num_batched_tokens=8)
    steps = []
    original_schedule = chunked_llm.engine.scheduler.schedule

    def recording_schedule():
        batch = original_schedule()
        if batch is not None:
            steps.append(batch)
        return batch

    chunked_llm.engine.scheduler.schedule = recording_schedule
    chunked = generate(chunked_llm, rows)
    whole = generate(make_llm(tiny_model, enable_chunked_prefill=False), rows)

    assert all(batch.num_tokens <= 8 for batch in steps)
    assert any(not row.samples for batch in steps for row in batch.requests), "no prompt was split"
    mixed = [batch for batch in steps if {len(row.token_ids) for row in batch.requests} - {1}
             and any(len(row.token_ids) == 1 for row in batch.requests)]  # fmt: skip
    assert mixed, "no step mixed a prompt chunk with decodes"
    reference = HFReference(*tiny_model)
    for chunked_output, whole_output, (prompt, adapter) in zip(chunked, whole, rows):
        assert chunked_output.token_ids == whole_output.token_ids, adapter
        assert_same_logprobs(chunked_output.logprobs, whole_output.logprobs)
        tokens, logprobs = reference.greedy(prompt, adapter, GREEDY_LOGPROBS.max_tokens)
        assert chunked_output.token_ids == tokens, adapter
        for step, expected in enumerate(logprobs):
            for token_id, value in chunked_output.logprobs[step].items():
                want = float(expected[token_id])
                assert abs(value - want) <= LOGPROB_RTOL * max(1.0, abs(want)), (adapter, step, token_id)


def test_partial_chunks_draw_no_random_numbers(tiny_gqa):
    """A seeded request samples the same tokens whether its prompt ran in one step or in many chunks."""
    prompt = random_prompt(60, seed=1)
    params = SamplingParams(max_tokens=10, temperature=1.0, top_k=40, seed=7, ignore_eos=True)
    chunked = make_llm(tiny_gqa, max_num_seqs=4, max_num_batched_tokens=4).generate([prompt], params)[0]
    whole = make_llm(tiny_gqa).generate([prompt], params)[0]
    assert chunked.token_ids == whole.token_ids


def test_long_prompt_lets_running_streams_produce_every_step(tiny_gqa):
    budget = 16
    llm = make_llm(tiny_gqa, max_num_seqs=8, max_num_batched_tokens=budget)
    engine = llm.engine
    names = list(tiny_gqa[1])
    streams = [engine.add_request(random_prompt(6, seed=i), SamplingParams(max_tokens=80, temperature=0.0,
                                                                          ignore_eos=True), names[i])
               for i in range(3)]  # fmt: skip
    for _ in range(3):
        engine.step()
    long_prompt = random_prompt(200, seed=9)
    long_params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    expected_long = make_llm(tiny_gqa).generate([long_prompt], long_params, adapters=[names[3]])[0].token_ids
    long_request = engine.add_request(long_prompt, long_params, names[3])
    steps_until_first_token = 0
    while not long_request.output_token_ids:
        before = [len(stream.output_token_ids) for stream in streams]
        engine.step()
        steps_until_first_token += 1
        assert [len(stream.output_token_ids) for stream in streams] == [count + 1 for count in before]
        # The long prompt holds blocks only for what it has computed: memory grows chunk by chunk.
        assert len(long_request.block_table) == engine.blocks.blocks_for(long_request.num_computed_tokens)
    # Each step gives the three streams one token each and the long prompt the remaining 13 tokens of the budget.
    assert steps_until_first_token == -(-200 // (budget - len(streams)))
    while engine.has_unfinished():
        engine.step()
    assert long_request.output_token_ids == expected_long
    assert engine.blocks.num_free == engine.blocks.num_blocks


def test_chunks_under_kv_pressure_preempt_and_still_match(tiny_gqa):
    """A pool too small for everyone at once: chunked prompts and decodes preempt each other, results unchanged."""
    names = [*tiny_gqa[1], None]
    rows = [(random_prompt(12 + 7 * index, seed=20 + index), name) for index, name in enumerate(names)]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    expected = [output.token_ids for output in generate(make_llm(tiny_gqa), rows, params)]
    llm = make_llm(tiny_gqa, num_blocks=16, max_num_seqs=4, max_num_batched_tokens=8)
    engine = llm.engine
    requests = [engine.add_request(prompt, params, adapter) for prompt, adapter in rows]
    done = {}
    while engine.has_unfinished():
        for output in engine.step():
            if output.finished:
                done[output.request_id] = output.token_ids
        held = sum(len(request.block_table) for request in engine.scheduler.running)
        assert held + engine.blocks.num_free == engine.blocks.num_blocks
    assert any(request.num_preemptions for request in requests)
    assert [done[request.request_id] for request in requests] == expected
    assert engine.blocks.num_free == engine.blocks.num_blocks
    assert all(engine.adapters.slots.pins(ref) == 0 for ref in engine.adapters.slots.resident())


def test_budget_must_hold_a_token_per_running_request():
    with pytest.raises(ValueError, match=r"max_num_batched_tokens \(8\) must be >= max_num_seqs \(16\)"):
        SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=8)
