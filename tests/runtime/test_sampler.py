"""The sampler on random logits: rows are independent, and a row that cannot be sampled fails alone."""

from __future__ import annotations

import math

import torch

from kvrun import SamplingParams
from kvrun.runtime.sampler import SampledToken, SamplingFailure, SamplingRow, TokenBitmask, sample

VOCAB = 300


def logits(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3


def row(params: SamplingParams, seed: int | None = None, output: list[int] | None = None) -> SamplingRow:
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    return SamplingRow(params, generator, [1, 2, 3], output or [])


def mixed_rows() -> list[SamplingRow]:
    return [
        row(SamplingParams(temperature=0.0, logprobs=2)),
        row(SamplingParams(temperature=0.8, top_k=20, top_p=0.9), seed=5),
        row(SamplingParams(temperature=1.3, logprobs=0), seed=6),
        row(SamplingParams(temperature=0.5, top_p=0.3), seed=7),
    ]


def alone(scores: torch.Tensor, index: int, fresh: list[SamplingRow]) -> SampledToken | SamplingFailure:
    return sample(scores[index : index + 1].clone(), [fresh[index]])[0]


def test_every_row_gets_what_it_would_get_alone():
    scores = logits(4)
    batch = sample(scores.clone(), mixed_rows())
    fresh = mixed_rows()
    assert batch == [alone(scores, index, fresh) for index in range(4)]
    assert batch[0].token_id == int(scores[0].argmax())
    expected = torch.log_softmax(scores[0], -1)
    assert math.isclose(batch[0].logprob, float(expected[batch[0].token_id]), rel_tol=1e-6)
    assert list(batch[0].top_logprobs) == expected.topk(2).indices.tolist()
    assert batch[2].top_logprobs is None and batch[1].logprob is None


def test_a_row_of_nan_or_inf_logits_fails_alone():
    scores = logits(4)
    scores[1, 17] = math.nan
    scores[3, 5] = math.inf
    results = sample(scores.clone(), mixed_rows())
    assert isinstance(results[1], SamplingFailure) and "non-finite" in results[1].reason
    assert isinstance(results[3], SamplingFailure)
    fresh = mixed_rows()
    assert results[0] == alone(scores, 0, fresh) and results[2] == alone(scores, 2, fresh)


def test_a_row_with_every_token_masked_fails_alone_and_masks_bind_on_the_others():
    scores = logits(4)
    bits = torch.zeros(2, (VOCAB + 31) // 32, dtype=torch.int32)
    bits[1, 2] = 1 << 5  # row 2 may only produce token 69
    results = sample(scores.clone(), mixed_rows(), TokenBitmask([0, 2], bits))
    assert isinstance(results[0], SamplingFailure) and "no token is allowed" in results[0].reason
    assert results[2].token_id == 69
    fresh = mixed_rows()
    assert results[1] == alone(scores, 1, fresh) and results[3] == alone(scores, 3, fresh)


def test_a_fault_that_breaks_the_batched_path_costs_only_its_own_row():
    """A token id outside the vocabulary (which add_request refuses) makes the batched bias fail: the rows are then
    sampled one by one and only the faulty one fails."""
    scores = logits(4)
    rows = mixed_rows()
    rows[2].options = SimpleOptions(rows[2].options, logit_bias={VOCAB + 7: 1.0})
    results = sample(scores.clone(), rows)
    assert isinstance(results[2], SamplingFailure) and "sampling failed" in results[2].reason
    fresh = mixed_rows()
    assert [results[index] for index in (0, 1, 3)] == [alone(scores, index, fresh) for index in (0, 1, 3)]


def test_a_broken_generator_fails_its_row_only():
    scores = logits(4)
    rows = mixed_rows()
    rows[1].generator = object()
    results = sample(scores.clone(), rows)
    assert isinstance(results[1], SamplingFailure) and "generator" in results[1].reason
    fresh = mixed_rows()
    assert [results[index] for index in (0, 2, 3)] == [alone(scores, index, fresh) for index in (0, 2, 3)]


class SimpleOptions:
    """A SamplingParams copy with fields that SamplingParams itself would refuse."""

    def __init__(self, params: SamplingParams, **changes) -> None:
        for name in SamplingParams.__dataclass_fields__:
            setattr(self, name, changes.get(name, getattr(params, name)))
