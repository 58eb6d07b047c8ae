"""Next-token choice per request: greedy, or temperature / top-k / top-p sampling with a per-request generator."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvrun.runtime.forward_batch import ScheduledRequest


@dataclass(slots=True)
class SampledToken:
    token_id: int
    logprob: float | None  # log-probability of token_id under the untempered distribution, when asked for
    top_logprobs: dict[int, float] | None  # the requested top-N alternatives


def sample(logits: torch.Tensor, requests: list[ScheduledRequest]) -> list[SampledToken]:
    """logits: [batch, vocab], one row per request in order. One host sync for the greedy rows."""
    logits = logits.float()
    greedy = logits.argmax(dim=-1).tolist()
    wants_logprobs = any(request.num_logprobs is not None for request in requests)
    logprobs = torch.log_softmax(logits, dim=-1) if wants_logprobs else None
    results = []
    for row, request in enumerate(requests):
        token = greedy[row] if request.temperature == 0.0 else _sample_row(logits[row], request)
        if request.num_logprobs is None:
            results.append(SampledToken(token, None, None))
            continue
        top = None
        if request.num_logprobs:
            values, indices = logprobs[row].topk(request.num_logprobs)
            top = dict(zip(indices.tolist(), values.tolist()))
        results.append(SampledToken(token, float(logprobs[row, token]), top))
    return results


def _sample_row(logits: torch.Tensor, request: ScheduledRequest) -> int:
    scaled = logits / request.temperature
    if 0 < request.top_k < scaled.shape[-1]:
        threshold = scaled.topk(request.top_k).values[-1]
        scaled = scaled.masked_fill(scaled < threshold, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    if request.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        outside = sorted_probs.cumsum(-1) - sorted_probs >= request.top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=request.generator))
