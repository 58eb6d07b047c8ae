"""Async scheduling (each step launched before the previous step's tokens reach the host) gives exactly what steps in
order give: the same tokens, logprobs and finish reasons, through chunked prompts, stops, preemption, aborts, prefix
caching and structured output. On CPU it is off by default; these tests turn it on (the forward pass then runs at
launch, but the bookkeeping is the GPU's: every decode row's last token comes from the previous step's sampled tokens
on the device, and the outputs of a step come back with the next)."""

from __future__ import annotations

import pytest

from kvrun import LLM, SamplingParams
from kvrun.engine.sampling_params import StructuredOutputParams
from tests.engine.test_engine import make_llm, prompts


def params_for(rows: int, stop_ids: dict[int, int] | None = None) -> list[SamplingParams]:
    """A mix of what the sampler and the stop checks read: greedy, seeded draws, penalties, min_tokens, logprobs,
    different lengths, and stop token ids where given (row → id)."""
    stop_ids = stop_ids or {}
    mixes = [
        dict(temperature=0.0),
        dict(temperature=0.9, top_k=20, seed=7),
        dict(temperature=0.0, repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.4),
        dict(temperature=0.8, top_p=0.9, seed=11, logprobs=2),
        dict(temperature=0.0, min_tokens=4, logprobs=0),
    ]
    return [
        SamplingParams(max_tokens=5 + 3 * (row % 4), ignore_eos=True,
                       stop_token_ids=[stop_ids[row]] if row in stop_ids else [], **mixes[row % len(mixes)])
        for row in range(rows)
    ]  # fmt: skip


def generate(tiny_gqa, async_scheduling: bool, rows, params, **kwargs):
    llm = make_llm(tiny_gqa, async_scheduling=async_scheduling, **kwargs)
    seen = []
    execute = llm.engine.runner.execute

    def counting(batch, previous=None):  # rows whose last token was still on its way to the host
        seen.append(sum(request.previous_row >= 0 for request in batch.requests))
        return execute(batch, previous)

    llm.engine.runner.execute = counting
    outputs = llm.generate([prompt for prompt, _ in rows], params, adapters=[adapter for _, adapter in rows])
    engine = llm.engine
    assert not engine.has_unfinished() and engine.blocks.num_free == engine.blocks.num_blocks
    return outputs, engine, sum(seen)


def summary(outputs):
    """What must match exactly. Logprobs are compared apart: a step's rows differ between the modes (a row that ended
    with the previous token still runs once), so prompt chunks split differently and fp32 sums round differently."""
    return [(output.token_ids, output.finish_reason, output.stop_reason,
             [list(step) for step in output.logprobs or ()]) for output in outputs]  # fmt: skip


def assert_same_logprobs(ours, theirs) -> None:
    for mine, other in zip(ours, theirs):
        for step, values in zip(mine.logprobs or (), other.logprobs or ()):
            assert all(abs(values[token] - step[token]) <= 1e-4 for token in values)


def test_async_steps_give_the_outputs_of_steps_in_order(tiny_gqa):
    adapters = [*tiny_gqa[1], None]
    rows = [(prompt, adapters[index % len(adapters)]) for index, prompt in enumerate(prompts(10, seed=21))]
    # A small step budget: prompts are chunked and run beside decodes; stops at tokens the first run produced.
    first, _, _ = generate(tiny_gqa, False, rows, params_for(len(rows)), max_num_batched_tokens=16)
    stop_ids = {row: first[row].token_ids[3] for row in (0, 2, 5)}
    params = params_for(len(rows), stop_ids)
    in_order, _, pending = generate(tiny_gqa, False, rows, params, max_num_batched_tokens=16)
    assert pending == 0
    overlapped, _, pending = generate(tiny_gqa, True, rows, params, max_num_batched_tokens=16)
    assert pending > 0  # decode rows did read their token on the device
    assert summary(overlapped) == summary(in_order)
    assert_same_logprobs(overlapped, in_order)
    assert any(output.stop_reason is not None for output in in_order)  # the stops were met, in both


def test_async_steps_survive_preemption_and_match(tiny_gqa):
    # 12 blocks of 4 tokens for six requests of up to 16 tokens: rows are preempted while their token is in flight.
    adapters = [*tiny_gqa[1], None, None]
    rows = [(prompt[:6], adapter) for prompt, adapter in zip(prompts(6, seed=9), adapters)]
    params = [SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)] * len(rows)
    in_order, _, _ = generate(tiny_gqa, False, rows, params, num_blocks=12)
    overlapped, engine, _ = generate(tiny_gqa, True, rows, params, num_blocks=12)
    assert engine.scheduler.stats.num_preemptions > 0
    assert summary(overlapped) == summary(in_order)


def test_an_abort_while_its_token_is_in_flight_ends_it_alone(tiny_gqa):
    llm = make_llm(tiny_gqa, async_scheduling=True)
    engine = llm.engine
    rows = prompts(3, seed=4)
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    expected = [output.token_ids for output in make_llm(tiny_gqa).generate(rows, params)]
    requests = [engine.add_request(prompt, params) for prompt in rows]
    for _ in range(4):
        engine.step()
    assert requests[1].pending_row >= 0  # its next token is on its way
    aborted = engine.abort_request(requests[1].request_id)
    assert aborted.finish_reason == "abort" and aborted.finished
    done = {}
    while engine.has_unfinished():
        for output in engine.step():
            assert output.request_id != requests[1].request_id  # nothing more comes for it
            if output.finished:
                done[output.request_id] = output.token_ids
    assert [done[requests[0].request_id], done[requests[2].request_id]] == [expected[0], expected[2]]
    assert engine.blocks.num_free == engine.blocks.num_blocks


@pytest.mark.parametrize("poison", ["nan logits", "every token excluded"])
def test_a_row_that_fails_sampling_ends_alone_while_the_next_step_is_in_flight(tiny_gqa, poison):
    """A failed row's draw may be no token at all (one past the vocabulary). The next step is launched before the
    host sees the failure and reads that row's token on the device: it must still be a valid id, so the failed
    request ends alone with its error and the others finish as with steps in order."""
    rows = prompts(3, seed=4)
    greedy = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    if poison == "nan logits":
        failing = SamplingParams(max_tokens=8, temperature=0.8, seed=3, ignore_eos=True)
    else:  # min_tokens holds back the stop ids, and they are the whole vocabulary
        failing = SamplingParams(max_tokens=8, temperature=1.0, seed=1, min_tokens=2, stop_token_ids=list(range(256)))
    results = {}
    for async_scheduling in (False, True):
        llm = make_llm(tiny_gqa, async_scheduling=async_scheduling)
        engine, calls = llm.engine, []
        execute = engine.runner.execute

        def poisoned(batch, previous=None, engine=engine, calls=calls, execute=execute):
            logits = execute(batch, previous)
            calls.append(batch)
            ids = [row.request_id for row in batch.sampling_requests()]
            if poison == "nan logits" and len(calls) == 3 and "req-1" in ids:
                logits = logits.clone()
                logits[ids.index("req-1")] = float("nan")
            return logits

        engine.runner.execute = poisoned
        outputs = llm.generate(rows, [greedy, failing, greedy])
        results[async_scheduling] = [(o.token_ids, o.finish_reason, o.error) for o in outputs]
        assert not engine.has_unfinished() and engine.blocks.num_free == engine.blocks.num_blocks
    assert results[True] == results[False]
    assert results[True][1][1] == "error" and [row[1] for row in results[True]] == ["length", "error", "length"]


def test_an_abort_of_the_last_request_leaves_nothing_unfinished(tiny_gqa):
    llm = make_llm(tiny_gqa, async_scheduling=True)
    engine = llm.engine
    request = engine.add_request(prompts(1, seed=8)[0], SamplingParams(max_tokens=12, temperature=0.0))
    for _ in range(3):
        engine.step()
    assert request.pending_row >= 0
    engine.abort_request(request.request_id)
    assert not engine.has_unfinished()  # its token in flight is dropped, nothing is left to step for
    assert engine.blocks.num_free == engine.blocks.num_blocks


def test_blocks_that_end_in_a_token_in_flight_are_still_cached(tiny_gqa):
    """A second turn whose prompt is the first turn's prompt and answer hits the same cached blocks, generated ones
    included, as with steps in order (a block that ends in a token still on its way is offered a step later)."""
    prompt = prompts(1, seed=12)[0] + list(range(40, 50))
    params = SamplingParams(max_tokens=14, temperature=0.0, ignore_eos=True)
    hits = {}
    for async_scheduling in (False, True):
        llm = make_llm(tiny_gqa, async_scheduling=async_scheduling)
        first = llm.generate([prompt], params)[0]
        before = llm.engine.scheduler.stats.prefix_cache_hits
        second = llm.generate([prompt + first.token_ids + [7, 8, 9]], params)[0]
        hit = llm.engine.scheduler.stats.prefix_cache_hits - before
        hits[async_scheduling] = (first.token_ids, second.token_ids, hit)
    assert hits[True] == hits[False]
    assert hits[True][2] >= len(prompt) + 8  # blocks of the answer were hit too (block_size 4)


def test_async_steps_follow_grammars_as_steps_in_order(bundled_llm):
    rows = [
        ("A JSON object about a cat:", SamplingParams(max_tokens=24, temperature=0.0,
                                                       structured_output=StructuredOutputParams(json_object=True))),
        ("Is the sky blue?", SamplingParams(max_tokens=8, temperature=0.0,
                                            structured_output=StructuredOutputParams(choice=("yes", "no")))),
        ("Once upon a time", SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)),
    ]  # fmt: skip
    in_order = bundled_llm.generate([prompt for prompt, _ in rows], [params for _, params in rows])
    overlapped = LLM(max_loras=1, num_blocks=256, async_scheduling=True).generate(
        [prompt for prompt, _ in rows], [params for _, params in rows]
    )
    assert [(o.token_ids, o.text, o.finish_reason) for o in overlapped] == [
        (o.token_ids, o.text, o.finish_reason) for o in in_order
    ]
    assert in_order[1].text in ("yes", "no")


def test_async_scheduling_is_on_by_default_for_one_gpu_only():
    from kvrun.config import EngineConfig

    assert EngineConfig(device="cuda", tensor_parallel_size=2, async_scheduling=True).resolved_async_scheduling()
    assert EngineConfig(device="cpu").resolved_async_scheduling() is False
    assert EngineConfig(device="cuda", tensor_parallel_size=2).resolved_async_scheduling() is False
    assert EngineConfig(device="cuda").resolved_async_scheduling() is True
