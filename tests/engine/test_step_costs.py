"""Step-time-aware prompt chunks: the cost model's arithmetic, and the scheduler sizing chunks by it."""

from __future__ import annotations

import pytest

from kvrun import LLM, SamplingParams
from kvrun.config import SchedulerConfig
from kvrun.engine.step_costs import MIN_PROMPT_TOKENS, StepCosts
from kvrun.runtime.memory_profile import resolve_scheduler_defaults
from tests.engine.test_chunked_prefill import make_llm, random_prompt


def test_no_limit_until_both_costs_are_measured():
    costs = StepCosts(1.5)
    assert costs.prompt_tokens(8) is None
    costs.observe(8, 0, 0.010)  # a decode-only step of 8 rows
    assert costs.prompt_tokens(8) is None  # the cost of a prompt token is still unknown
    costs.observe(8, 400, 0.030)  # 400 prompt tokens added 20 ms: 50 µs each
    # 1.5 decode steps = 15 ms, so 5 ms of prompt tokens: 100
    assert costs.prompt_tokens(8) == 100
    assert costs.prompt_tokens(0) is None  # no stream waits on a step without decodes: the budget alone


def test_costs_follow_the_steps_and_keep_a_floor():
    costs = StepCosts(2.0)
    costs.observe(128, 0, 0.012)
    costs.observe(128, 200, 0.032)  # 100 µs per prompt token
    assert costs.prompt_tokens(100) == 120  # 1 × 12 ms / 100 µs; 100 rows fall in the 128 bucket
    for _ in range(40):  # prompt tokens get much dearer: the average follows
        costs.observe(128, 100, 0.112)
    assert costs.prompt_tokens(128) == MIN_PROMPT_TOKENS  # never below the floor: prompts always progress
    assert costs.decode_time(2) == pytest.approx(0.012)  # the nearest measured bucket stands in for unmeasured ones
    assert StepCosts(0).prompt_tokens(128) is None  # ratio 0: off


def test_steps_beside_decodes_take_the_measured_share_and_tokens_do_not_change(tiny_gqa):
    """With costs that allow 32 prompt tokens beside decodes, a 64-token budget carries at most 32 prompt tokens
    while streams decode, the whole budget when none does, and every row's tokens equal the uncapped run's."""
    names = [*tiny_gqa[1], None]
    rows = [(random_prompt(60 + 13 * index, seed=40 + index), name) for index, name in enumerate(names)]
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    expected = make_llm(tiny_gqa, max_num_seqs=8, max_num_batched_tokens=64).generate(
        [prompt for prompt, _ in rows], params, adapters=[name for _, name in rows])
    llm = make_llm(tiny_gqa, max_num_seqs=8, max_num_batched_tokens=64, step_time_ratio=1.5)
    engine = llm.engine
    costs = engine.scheduler.costs
    costs.observe(4, 0, 0.010)
    costs.observe(4, 50, 0.060)  # 1 ms per prompt token: 5 ms allowed → the floor, 32 tokens
    costs.observe = lambda *args: None  # hold the costs still (CPU step times would move them)
    requests, steps = [], []
    for prompt, name in rows:
        requests.append(engine.add_request(prompt, params, name))
        for _ in range(2):  # the next request arrives while these decode
            steps.append(_step(engine))
    while engine.has_unfinished():
        steps.append(_step(engine))
    capped = [tokens for decodes, tokens in steps if decodes]
    assert capped and max(capped) <= MIN_PROMPT_TOKENS and MIN_PROMPT_TOKENS in capped
    assert any(tokens > MIN_PROMPT_TOKENS for decodes, tokens in steps if not decodes)  # alone: the whole budget
    assert [request.output_token_ids for request in requests] == [output.token_ids for output in expected]


def _step(engine) -> tuple[int, int]:
    """Run one step; (its decode rows, its prompt tokens)."""
    seen = []
    schedule = engine.scheduler.schedule

    def recording():
        batch = schedule()
        if batch is not None:
            decodes = sum(len(row.token_ids) == 1 and row.samples for row in batch.requests)
            seen.append((decodes, batch.num_tokens - decodes))
        return batch

    engine.scheduler.schedule = recording
    try:
        engine.step()
    finally:
        del engine.scheduler.schedule
    return seen[0] if seen else (0, 0)


def test_defaults_and_bounds():
    online = SchedulerConfig(online=True)
    from kvrun.config import EngineConfig

    assert resolve_scheduler_defaults(EngineConfig(scheduler=online), on_gpu=True).scheduler.step_time_ratio == 1.5
    assert resolve_scheduler_defaults(EngineConfig(scheduler=online), on_gpu=False).scheduler.step_time_ratio == 0
    assert resolve_scheduler_defaults(EngineConfig(), on_gpu=True).scheduler.step_time_ratio == 0  # offline
    explicit = EngineConfig(scheduler=SchedulerConfig(online=True, step_time_ratio=3.0))
    assert resolve_scheduler_defaults(explicit, on_gpu=True).scheduler.step_time_ratio == 3.0
    for bad in (0.5, -1.0, 1000.0):
        with pytest.raises(ValueError, match="step_time_ratio must be 0"):
            SchedulerConfig(step_time_ratio=bad)
    with pytest.raises(ValueError, match="step_time_ratio"):
        LLM(None, step_time_ratio=0.9)
