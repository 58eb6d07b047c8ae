"""vLLM's sampling extras through the engine on the bundled SmolLM2, against HF transformers + a plain reference.

Every row is greedy, so its tokens are a function of the processed logits alone: the reference recomputes the full
sequence with HF transformers each step, applies HF's processor (or OpenAI's penalty formula, written out) and takes
the argmax. All rows share one batch with a plain row, which must produce exactly its solo tokens.
"""

from __future__ import annotations

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    MinNewTokensLengthLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
)

from kvrun import SamplingParams
from kvrun.runtime.loader import resolve_model
from tests.runtime.test_sampler_reference import openai_penalties

MAX_TOKENS = 14


@pytest.fixture(scope="module")
def hf_model():
    return AutoModelForCausalLM.from_pretrained(resolve_model(None), dtype=torch.float32).eval()


def reference(model, prompt: list[int], max_tokens: int, process, eos: set[int] | None = None) -> list[int]:
    """Greedy decoding with HF transformers, process(ids so far, output so far, logits) applied before the argmax."""
    ids, output, past, step_ids = list(prompt), [], None, list(prompt)
    for _ in range(max_tokens):
        with torch.no_grad():
            result = model(torch.tensor([step_ids]), past_key_values=past, use_cache=True)
        logits, past = result.logits[0, -1].float(), result.past_key_values
        token = int(process(ids, output, logits).argmax())
        step_ids = [token]
        ids.append(token)
        output.append(token)
        if eos is not None and token in eos:
            break
    return output


def hf_processor(processor):
    return lambda ids, output, logits: processor(torch.tensor([ids]), logits.unsqueeze(0).clone())[0]


def test_penalties_bias_and_min_tokens_match_their_references_in_one_mixed_batch(bundled_llm, hf_model):
    tokenizer = bundled_llm.tokenizer
    engine = bundled_llm.engine
    eos = {engine.tokenizer.eos_token_id, *engine.model_config.eos_token_ids}
    story = tokenizer.encode("The cat sat on the mat. The cat sat on the mat. The cat")
    counting = tokenizer.encode("1, 2, 3, 4, 5, 6,")
    chat = tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": "Say hi."}], tokenize=False,
                                                          add_generation_prompt=True))  # fmt: skip
    favourite, banned = tokenizer.encode(" dog")[0], tokenizer.encode(" cat")[0]
    greedy = {"max_tokens": MAX_TOKENS, "temperature": 0.0, "ignore_eos": True}
    rows = [
        (story, SamplingParams(**greedy, repetition_penalty=1.4), hf_processor(RepetitionPenaltyLogitsProcessor(1.4))),
        (story, SamplingParams(**greedy, repetition_penalty=0.7), hf_processor(RepetitionPenaltyLogitsProcessor(0.7))),
        (
            counting,
            SamplingParams(**greedy, presence_penalty=1.2, frequency_penalty=0.9),
            lambda ids, output, logits: openai_penalties(logits, output, 1.2, 0.9),
        ),
        (story, SamplingParams(**greedy, logit_bias={favourite: 9.0, banned: -100.0}), None),
        (story, SamplingParams(**greedy), lambda ids, output, logits: logits),
    ]
    plain = bundled_llm.generate(story, SamplingParams(**greedy))[0].token_ids
    outputs = bundled_llm.generate([prompt for prompt, _, _ in rows], [params for _, params, _ in rows])
    for (prompt, params, process), output in zip(rows, outputs):
        assert output.finish_reason == "length" and output.error is None
        if process is not None:
            assert output.token_ids == reference(hf_model, prompt, MAX_TOKENS, process), params
    assert outputs[-1].token_ids == plain
    assert outputs[0].token_ids != plain and outputs[2].token_ids != reference(
        hf_model, counting, MAX_TOKENS, lambda ids, output, logits: logits
    )  # the penalties change what the model says here
    biased = outputs[3].token_ids
    assert banned not in biased and biased.count(favourite) >= MAX_TOKENS // 2

    # min_tokens: the chat reply ends at EOS on its own; held back, EOS may come only from token min_tokens on.
    free = bundled_llm.generate(chat, SamplingParams(max_tokens=40, temperature=0.0))[0]
    assert free.finish_reason == "stop" and free.token_ids[-1] in eos
    least = len(free.token_ids) + 4
    held = bundled_llm.generate(chat, SamplingParams(max_tokens=least + 8, temperature=0.0, min_tokens=least))[0]
    hold_eos = hf_processor(MinNewTokensLengthLogitsProcessor(len(chat), least, sorted(eos)))
    assert held.token_ids == reference(hf_model, chat, least + 8, hold_eos, eos)
    assert len(held.token_ids) >= least and not eos & set(held.token_ids[: least - 1])


def test_logit_bias_outside_the_vocabulary_is_refused_at_add_request(bundled_llm):
    vocab_size = bundled_llm.engine.model_config.vocab_size
    with pytest.raises(ValueError, match="logit_bias"):
        bundled_llm.generate("hi", SamplingParams(max_tokens=2, logit_bias={vocab_size: 1.0}))
    assert not bundled_llm.engine.has_unfinished()


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("min_p", 1.5),
        ("min_p", -0.1),
        ("min_tokens", 17),
        ("min_tokens", -1),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", float("inf")),
        ("presence_penalty", 2.5),
        ("frequency_penalty", -2.01),
        ("frequency_penalty", float("nan")),
        ("logit_bias", {5: 101.0}),
        ("logit_bias", {-1: 1.0}),
        ("logit_bias", {"5": 1.0}),
    ],
)
def test_out_of_range_extras_are_refused_with_the_field_named(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(max_tokens=16, **{field: value})


def test_extras_at_their_bounds_are_served(bundled_llm):
    bounds = [
        SamplingParams(max_tokens=4, temperature=0.8, min_p=1.0, seed=1),
        SamplingParams(max_tokens=4, min_tokens=4, seed=2),
        SamplingParams(max_tokens=4, repetition_penalty=1e30, temperature=0.0),
        SamplingParams(max_tokens=4, presence_penalty=-2.0, frequency_penalty=2.0, seed=3),
        SamplingParams(max_tokens=4, logit_bias={0: 100.0, 1: -100.0}, temperature=0.0),
    ]
    outputs = bundled_llm.generate(["Hello there"] * len(bounds), bounds)
    for output in outputs:
        assert output.error is None and len(output.token_ids) >= 1
    assert outputs[1].finish_reason == "length" and len(outputs[1].token_ids) == 4
    assert outputs[4].token_ids == [0] * 4
