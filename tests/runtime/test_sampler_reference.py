"""The sampler's processors and warpers against HF transformers' and OpenAI's definitions, on random logits."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import (
    MinNewTokensLengthLogitsProcessor,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from kvrun import SamplingParams
from kvrun.runtime.sampler import SamplingRow, process_logits, sample, warp_logits

VOCAB = 500


def random_logits(rows: int, seed: int, vocab: int = VOCAB, scale: float = 4.0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * scale


def random_history(length: int, seed: int) -> list[int]:
    return torch.randint(0, VOCAB, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def openai_penalties(logits: torch.Tensor, output: list[int], presence: float, frequency: float) -> torch.Tensor:
    """OpenAI's formula, one token at a time: mu[j] - c[j] * frequency - (c[j] > 0) * presence."""
    result = logits.clone()
    for token in set(output):
        count = output.count(token)
        result[token] = logits[token] - count * frequency - (1.0 if count > 0 else 0.0) * presence
    return result


@pytest.mark.parametrize("penalty", [0.5, 1.3, 2.0, 7.0])
def test_repetition_penalty_is_hf_over_prompt_and_output(penalty):
    scores = random_logits(3, seed=1)
    rows, expected = [], []
    for index in range(3):
        prompt, output = random_history(40, seed=10 + index), random_history(5 * index, seed=20 + index)
        rows.append(SamplingRow(SamplingParams(repetition_penalty=penalty), None, prompt, output))
        ids = torch.tensor([prompt + output])
        expected.append(RepetitionPenaltyLogitsProcessor(penalty)(ids, scores[index : index + 1].clone())[0])
    processed = process_logits(scores.clone(), rows)
    torch.testing.assert_close(processed, torch.stack(expected), rtol=0, atol=0)


@pytest.mark.parametrize(("presence", "frequency"), [(0.5, 0.0), (0.0, 0.7), (1.5, -0.4), (-2.0, 2.0)])
def test_presence_and_frequency_penalties_are_openai_over_output_only(presence, frequency):
    scores = random_logits(3, seed=2)
    rows, expected = [], []
    for index in range(3):
        prompt, output = random_history(30, seed=30 + index), random_history(12 * index, seed=40 + index)
        params = SamplingParams(presence_penalty=presence, frequency_penalty=frequency)
        rows.append(SamplingRow(params, None, prompt, output))
        expected.append(openai_penalties(scores[index], output, presence, frequency))
    processed = process_logits(scores.clone(), rows)
    torch.testing.assert_close(processed, torch.stack(expected), rtol=1e-6, atol=1e-5)


def test_logit_bias_min_tokens_and_penalties_compose_per_row_and_spare_plain_rows():
    scores = random_logits(4, seed=3)
    eos, stop = 7, 11
    prompt, output = random_history(20, seed=50), random_history(6, seed=51)
    rows = [
        SamplingRow(SamplingParams(), None, prompt, output),  # untouched
        SamplingRow(SamplingParams(logit_bias={3: 5.5, 9: -100.0}), None, prompt, output),
        SamplingRow(SamplingParams(min_tokens=10, max_tokens=20), None, prompt, output, (eos, stop)),
        SamplingRow(SamplingParams(min_tokens=6, max_tokens=20), None, prompt, output, (eos, stop)),  # reached
    ]
    processed = process_logits(scores.clone(), rows)
    assert torch.equal(processed[0], scores[0]) and torch.equal(processed[3], scores[3])
    biased = scores[1].clone()
    biased[3] += 5.5
    biased[9] -= 100.0
    torch.testing.assert_close(processed[1], biased, rtol=0, atol=0)
    hf = MinNewTokensLengthLogitsProcessor(len(prompt), 10, [eos, stop])
    expected = hf(torch.tensor([prompt + output]), scores[2:3].clone())[0]
    assert torch.equal(processed[2], expected) and processed[2, eos] == -math.inf


@pytest.mark.parametrize(
    "settings",
    [
        {"temperature": 0.7},
        {"temperature": 1.0, "top_k": 5},
        {"temperature": 1.3, "top_p": 0.8},
        {"temperature": 0.9, "min_p": 0.1},
        {"temperature": 0.6, "top_k": 40, "top_p": 0.9, "min_p": 0.05},
        {"temperature": 2.0, "top_k": 1},
        {"temperature": 1.0, "top_p": 1e-9},
        {"temperature": 1.0, "top_k": 2000, "top_p": 0.97},
    ],
)
@pytest.mark.parametrize(
    ("vocab", "scale"),
    [(VOCAB, 4.0), (6000, 4.0), (6000, 0.3)],  # small; large and peaked (the head holds p); large and flat
)
def test_warpers_keep_what_hf_keeps_in_hf_order(settings, vocab, scale):
    scores = random_logits(6, seed=4, vocab=vocab, scale=scale)
    params = SamplingParams(**settings)
    warped = warp_logits(scores.clone(), [params] * 6)
    expected = TemperatureLogitsWarper(params.temperature)(None, scores.clone())
    if params.top_k:
        expected = TopKLogitsWarper(params.top_k)(None, expected)
    if params.top_p < 1.0:
        expected = TopPLogitsWarper(params.top_p)(None, expected)
    if params.min_p:
        expected = MinPLogitsWarper(params.min_p)(None, expected)
    assert torch.equal(warped == -math.inf, expected == -math.inf)
    kept = expected != -math.inf
    torch.testing.assert_close(warped[kept], expected[kept], rtol=1e-6, atol=1e-6)


def test_rows_with_different_warpers_in_one_batch_match_each_alone():
    scores = random_logits(5, seed=5)
    options = [
        SamplingParams(temperature=0.5, top_k=3),
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.8, top_p=0.6),
        SamplingParams(temperature=1.1, min_p=0.2),
        SamplingParams(temperature=0.9, top_k=50, top_p=0.95),
    ]
    batch = warp_logits(scores.clone(), options)
    for index, option in enumerate(options):
        assert torch.equal(batch[index], warp_logits(scores[index : index + 1].clone(), [option])[0])


def test_the_draw_follows_the_warped_distribution():
    """20,000 draws of one row (no seed: one batched draw) against softmax of its warped logits."""
    torch.manual_seed(0)
    base = torch.tensor([[2.0, 1.5, 1.0, 0.0, -1.0, -3.0, 0.5, 1.2]])
    params = SamplingParams(temperature=0.8, top_k=6, min_p=0.05, max_tokens=1)
    draws = 20_000
    rows = [SamplingRow(params, None, [0], []) for _ in range(draws)]
    tokens = torch.tensor([result.token_id for result in sample(base.expand(draws, -1).clone(), rows)])
    expected = torch.softmax(warp_logits(base.clone(), [params])[0], dim=-1)
    observed = torch.bincount(tokens, minlength=base.shape[1]).float() / draws
    assert observed[expected == 0].sum() == 0  # a cut token is never drawn
    torch.testing.assert_close(observed, expected, rtol=0, atol=0.015)


def test_a_seeded_row_is_reproducible_and_its_seed_matters():
    scores = random_logits(1, seed=6).expand(3, -1).clone()
    params = SamplingParams(temperature=5.0, max_tokens=1)
    rows = [SamplingRow(params, torch.Generator().manual_seed(seed), [0], []) for seed in (1, 1, 2)]
    first = [result.token_id for result in sample(scores.clone(), rows)]
    again = [result.token_id for result in sample(scores.clone(), rows)]
    assert first[0] == first[1]  # same seed, same draw
    assert again[0] == again[1]
    assert (first[0], again[0]) != (first[2], again[2])  # another seed draws otherwise
