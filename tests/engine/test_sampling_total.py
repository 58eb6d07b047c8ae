"""Sampling is total, and failure is per row: every valid SamplingParams yields tokens; a row that breaks ends alone."""

from __future__ import annotations

import math

import pytest

from kvrun import SamplingParams
from tests.engine.test_engine import GREEDY, alone, make_llm, prompts


class BrokenGenerator:
    """Stands in for a request's torch.Generator and fails when drawn from."""


class BrokenDetokenizer:
    def step(self, token_ids):
        raise RuntimeError("detokenizer exploded")


def run(engine, requests, on_step=None) -> dict:
    finals, step = {}, 0
    while engine.has_unfinished():
        for output in engine.step():
            if output.finished:
                finals[output.request_id] = output
        step += 1
        if on_step is not None:
            on_step(step)
    return {request.request_id: finals[request.request_id] for request in requests}


@pytest.mark.parametrize("temperature", [1e-38, 5e-324, 1e-7, 9.9e-6])
def test_temperatures_too_small_to_divide_by_are_greedy(tiny_gqa, temperature):
    llm = make_llm(tiny_gqa)
    prompt = prompts(1)[0]
    greedy = alone(llm, prompt, "all-r8")
    params = SamplingParams(max_tokens=10, temperature=temperature, ignore_eos=True, logprobs=3)
    output = llm.generate([prompt], params, adapters=["all-r8"])[0]
    assert output.finish_reason == "length" and output.error is None
    assert output.token_ids == greedy
    assert all(math.isfinite(value) for step in output.logprobs for value in step.values())


def test_extreme_valid_parameters_all_yield_tokens_in_one_batch(tiny_gqa):
    llm = make_llm(tiny_gqa)
    prompt = prompts(1)[0]
    greedy = alone(llm, prompt, None)
    extremes = [
        SamplingParams(max_tokens=10, temperature=100.0, seed=1, ignore_eos=True),
        SamplingParams(max_tokens=10, temperature=1e-5, seed=2, ignore_eos=True),
        SamplingParams(max_tokens=10, temperature=1.0, top_p=5e-324, seed=3, ignore_eos=True),
        SamplingParams(max_tokens=10, temperature=2.0, top_k=1, seed=4, ignore_eos=True),
        SamplingParams(max_tokens=10, temperature=1.0, top_k=10**9, top_p=1.0, seed=5, ignore_eos=True),
        SamplingParams(max_tokens=10, temperature=0.7, top_k=3, top_p=0.5, seed=6, ignore_eos=True, logprobs=20),
        SamplingParams(max_tokens=10, temperature=1e-38, top_p=1e-300, logprobs=0, ignore_eos=True),
    ]
    outputs = llm.generate([prompt] * len(extremes), extremes)
    for output in outputs:
        assert output.finish_reason == "length" and output.error is None
        assert len(output.token_ids) == 10
    # Only the most likely token survives a top_p this small or top_k = 1, whatever the temperature.
    assert outputs[2].token_ids == greedy and outputs[3].token_ids == greedy and outputs[6].token_ids == greedy


@pytest.mark.parametrize(
    "bad",
    [
        {"temperature": math.nan},
        {"temperature": math.inf},
        {"temperature": -1e-9},
        {"temperature": 101.0},
        {"temperature": "0.5"},
        {"top_p": math.nan},
        {"top_p": 0.0},
        {"top_k": 1.5},
        {"top_k": True},
        {"max_tokens": 2.0},
        {"seed": 1.0},
        {"stop_token_ids": [-1]},
        {"logprobs": 21},
    ],
)
def test_values_that_cannot_be_served_are_refused_with_the_field_named(bad):
    (name,) = bad
    with pytest.raises(ValueError, match=name):
        SamplingParams(**bad)


def test_a_row_whose_generator_fails_ends_alone_and_the_batch_is_unchanged(tiny_gqa):
    llm = make_llm(tiny_gqa)
    engine = llm.engine
    texts = prompts(3, seed=5)
    rows = [
        (texts[0], None, GREEDY),
        (texts[1], "all-r8", SamplingParams(max_tokens=10, temperature=0.9, top_k=40, seed=7, ignore_eos=True)),
        (texts[2], "mlp-r16-rs", GREEDY),
        (prompts(1)[0], "all-r8", SamplingParams(max_tokens=10, temperature=1.0, seed=11, ignore_eos=True)),
    ]
    solo = [alone(llm, prompt, adapter, params) for prompt, adapter, params in rows]
    requests = [engine.add_request(prompt, params, adapter) for prompt, adapter, params in rows]
    broken = requests[3]

    def break_after_three_tokens(step: int) -> None:
        if step == 3:
            broken.sampling.generator = BrokenGenerator()

    finals = run(engine, requests, break_after_three_tokens)
    failed = finals[broken.request_id]
    assert failed.finished and failed.finish_reason == "error"
    assert "generator" in failed.error
    assert failed.token_ids == solo[3][:3]  # what it had before the failing step, nothing after
    assert failed.new_token_ids == [] and failed.new_text == ""
    for request, expected in zip(requests[:3], solo[:3]):
        assert finals[request.request_id].finish_reason == "length"
        assert finals[request.request_id].error is None
        assert finals[request.request_id].token_ids == expected
    assert not engine.has_unfinished() and engine.blocks.num_free == engine.blocks.num_blocks
    assert engine.adapters.slots.pins(broken.adapter) == 0


def test_a_row_whose_text_fails_ends_alone_and_the_batch_is_unchanged(bundled_llm):
    engine = bundled_llm.engine
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    texts = ["The capital of France is", "1, 2, 3, 4,", "Once upon a time"]
    solo = [bundled_llm.generate(text, params)[0] for text in texts]
    requests = [engine.add_request(text, params) for text in texts]
    requests[1].detokenizer = BrokenDetokenizer()
    finals = run(engine, requests)
    failed = finals[requests[1].request_id]
    assert failed.finish_reason == "error" and "detokenizer exploded" in failed.error
    assert failed.token_ids == [] and failed.text == ""
    for index in (0, 2):
        output = finals[requests[index].request_id]
        assert output.error is None
        assert (output.token_ids, output.text) == (solo[index].token_ids, solo[index].text)
