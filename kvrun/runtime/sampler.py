"""Next-token choice for the rows of a step, vectorised over the batch.

What happens to one row's logits, in order (the order HF transformers' processors and warpers run in):

    raw logits ─────────────────────────────────────────────→ logprobs (the model's own distribution, untouched)
      → + logit_bias
      → EOS and stop ids masked while fewer than min_tokens tokens were generated
      → repetition penalty (HF: over prompt + output tokens, logit < 0 ? × p : ÷ p)
      → presence / frequency penalties (OpenAI: over output tokens, − frequency·count − presence·[count > 0])
      → allowed-token bitmask (structured output)
      → temperature < GREEDY_BELOW: argmax
        otherwise: ÷ temperature → top-k → top-p → min-p → one draw from the row's generator

Each stage touches only the rows that use it, so a batch that uses none of the extras pays for one copy and one
argmax. The draw is an exponential race (argmax of p / E with E ~ Exp(1)), which samples exactly from p and lets one
kernel serve every row that has no generator of its own; a row with a seed draws its noise from its own generator,
so its tokens do not depend on what else shares the batch.

Sampling is total: a row whose logits are not finite, whose every token is masked, or whose generator fails gets a
SamplingFailure, and every other row of the batch still gets the token it would have got alone.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

logger = logging.getLogger(__name__)

GREEDY_BELOW = 1e-5  # a temperature below this is greedy: dividing by it would overflow float32 for no real change


class SamplingOptions(Protocol):
    """What the sampler reads of a request's parameters (kvrun.engine.SamplingParams has these fields)."""

    temperature: float
    top_p: float
    top_k: int
    min_p: float
    min_tokens: int
    repetition_penalty: float
    presence_penalty: float
    frequency_penalty: float
    logit_bias: Mapping[int, float] | None
    logprobs: int | None


@dataclass(slots=True)
class SamplingRow:
    """One request as the sampler sees it. The token lists are the request's own (read, never written)."""

    options: SamplingOptions
    generator: torch.Generator | None  # None: the device's default generator (unseeded requests)
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]
    held_token_ids: Sequence[int] = ()  # masked while len(output_token_ids) < options.min_tokens (EOS, stop ids)


@dataclass(slots=True)
class TokenBitmask:
    """Allowed tokens for some rows of a step: bit j of word i of a row allows token 32·i + j."""

    rows: list[int]  # which rows of the batch the masks belong to
    bits: torch.Tensor  # [len(rows), ceil(vocab / 32)] int32, on the host


@dataclass(slots=True)
class SampledToken:
    token_id: int
    logprob: float | None  # log-probability of token_id under the model's raw distribution, when asked for
    top_logprobs: dict[int, float] | None  # the requested top-N alternatives, from the same distribution


@dataclass(slots=True)
class SamplingFailure:
    """This row produced no token; its request ends with this reason. The batch's other rows are unaffected."""

    reason: str


@torch.inference_mode()
def sample(
    logits: torch.Tensor, rows: list[SamplingRow], allowed: TokenBitmask | None = None
) -> list[SampledToken | SamplingFailure]:
    """logits: [len(rows), vocab], one row per SamplingRow in order. One host sync for the whole batch."""
    try:
        return _sample(logits, rows, allowed)
    except Exception:  # noqa: BLE001 - a fault in one row must not cost the others their token
        logger.exception("sampling a batch of %d rows failed; sampling each row alone", len(rows))
        return [_sample_alone(logits, rows, allowed, index) for index in range(len(rows))]


def _sample_alone(
    logits: torch.Tensor, rows: list[SamplingRow], allowed: TokenBitmask | None, index: int
) -> SampledToken | SamplingFailure:
    own = None
    if allowed is not None and index in allowed.rows:
        own = TokenBitmask([0], allowed.bits[allowed.rows.index(index)].unsqueeze(0))
    try:
        return _sample(logits[index : index + 1], [rows[index]], own)[0]
    except Exception as error:  # noqa: BLE001 - reported as this row's failure
        return SamplingFailure(f"sampling failed: {type(error).__name__}: {error}")


def _sample(
    logits: torch.Tensor, rows: list[SamplingRow], allowed: TokenBitmask | None
) -> list[SampledToken | SamplingFailure]:
    options = [row.options for row in rows]
    want_logprobs = [index for index, option in enumerate(options) if option.logprobs is not None]
    raw_logprobs = None
    if want_logprobs:
        raw_logprobs = torch.log_softmax(logits[_index(want_logprobs, logits.device)].float(), dim=-1)
    scores = logits.to(torch.float32, copy=True)
    _add_logit_bias(scores, options)
    _hold_until_min_tokens(scores, rows)
    _apply_repetition_penalty(scores, rows)
    _apply_presence_frequency(scores, rows)
    if allowed is not None:
        apply_token_bitmask(scores, allowed)
    best, tokens = scores.max(dim=-1)
    failures: dict[int, str] = {}
    drawn = [index for index, option in enumerate(options) if option.temperature >= GREEDY_BELOW]
    if drawn:
        index = _index(drawn, scores.device)
        choice = _draw(scores[index], [options[row] for row in drawn], [rows[row].generator for row in drawn])
        for position, error in choice[1].items():
            failures[drawn[position]] = error
        tokens = tokens.index_copy(0, index, choice[0])
    chosen_logprobs = top = None
    if raw_logprobs is not None:
        own_tokens = tokens[_index(want_logprobs, tokens.device)]
        chosen_logprobs = raw_logprobs.gather(1, own_tokens.unsqueeze(1)).squeeze(1).tolist()
        most = max(options[row].logprobs for row in want_logprobs)
        top = raw_logprobs.topk(most, dim=-1) if most else None
        top = (top.values.tolist(), top.indices.tolist()) if top is not None else None
    results: list[SampledToken | SamplingFailure] = []
    token_ids, best_values = tokens.tolist(), best.tolist()
    logprob_position = {row: position for position, row in enumerate(want_logprobs)}
    for row, option in enumerate(options):
        reason = failures.get(row) or _failure(best_values[row])
        if reason is not None:
            results.append(SamplingFailure(reason))
            continue
        position = logprob_position.get(row)
        if position is None:
            results.append(SampledToken(token_ids[row], None, None))
            continue
        alternatives = None
        if option.logprobs:
            values, indices = top[0][position][: option.logprobs], top[1][position][: option.logprobs]
            alternatives = dict(zip(indices, values))
        results.append(SampledToken(token_ids[row], chosen_logprobs[position], alternatives))
    return results


def _failure(best: float) -> str | None:
    if math.isnan(best) or best == math.inf:
        return "the model produced non-finite logits (NaN or +inf) for this request"
    if best == -math.inf:
        return "no token is allowed here: the request's constraints (grammar, min_tokens) exclude every token"
    return None


def _index(rows: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.int64, device=device)


# -- the draw ----------------------------------------------------------------------------------------------------------
def _draw(
    scores: torch.Tensor, options: list[SamplingOptions], generators: list[torch.Generator | None]
) -> tuple[torch.Tensor, dict[int, str]]:
    """scores: [n, vocab] of the rows that sample. Returns ([n] token ids, {row: why its draw failed})."""
    device = scores.device
    temperatures = torch.tensor([option.temperature for option in options], dtype=torch.float32, device=device)
    # Huge logits over a small temperature can overflow: +inf would make softmax NaN, so cap at the largest float.
    scaled = scores.div_(temperatures.unsqueeze(1)).nan_to_num_(
        nan=-math.inf, posinf=torch.finfo(torch.float32).max, neginf=-math.inf
    )
    scaled = _truncate(scaled, options)
    probs = torch.softmax(scaled, dim=-1)
    noise = torch.empty_like(probs)
    failures: dict[int, str] = {}
    shared = [row for row, generator in enumerate(generators) if generator is None]
    if shared:
        noise[_index(shared, device)] = torch.empty((len(shared), probs.shape[1]), device=device).exponential_()
    for row, generator in enumerate(generators):
        if generator is None:
            continue
        try:
            noise[row].exponential_(generator=generator)
        except Exception as error:  # noqa: BLE001 - this row's generator, this row's failure
            failures[row] = f"the request's random generator failed: {type(error).__name__}: {error}"
            noise[row] = 1.0
    # E can be exactly 0; clamping keeps p / E finite so a zero-probability token can never win.
    return probs.div_(noise.clamp_min_(torch.finfo(torch.float32).tiny)).argmax(dim=-1), failures


def _truncate(scaled: torch.Tensor, options: list[SamplingOptions]) -> torch.Tensor:
    """top-k (ties at the k-th value kept), top-p (smallest head whose mass reaches p), min-p, as HF's warpers."""
    vocab = scaled.shape[1]
    device = scaled.device
    top_k = [option.top_k if 0 < option.top_k < vocab else vocab for option in options]
    top_p = [option.top_p for option in options]
    min_p = [option.min_p for option in options]
    cut_k = any(k < vocab for k in top_k)
    if any(p < 1.0 for p in top_p):
        ordered, order = scaled.sort(dim=-1, descending=True)
        if cut_k:
            kth = ordered.gather(1, torch.tensor(top_k, device=device).sub_(1).unsqueeze(1))
            ordered.masked_fill_(ordered < kth, -math.inf)
        probs = torch.softmax(ordered, dim=-1)
        # Cut a token when the mass strictly above it reaches p. A row with top_p = 1 uses 2, so rounding near 1.0
        # never cuts its tail; the most likely token always stays (a p below float32's range rounds to 0).
        thresholds = torch.tensor([p if p < 1.0 else 2.0 for p in top_p], device=device).unsqueeze(1)
        outside = probs.cumsum(dim=-1).sub_(probs) >= thresholds
        outside[:, 0] = False
        ordered.masked_fill_(outside, -math.inf)
        scaled = torch.empty_like(scaled).scatter_(1, order, ordered)
    elif cut_k:
        largest = scaled.topk(max(k for k in top_k if k < vocab), dim=-1).values
        ks = torch.tensor([min(k, largest.shape[1]) for k in top_k], device=device).sub_(1).unsqueeze(1)
        kth = largest.gather(1, ks)
        kth.masked_fill_(torch.tensor([k >= vocab for k in top_k], device=device).unsqueeze(1), -math.inf)
        scaled.masked_fill_(scaled < kth, -math.inf)
    if any(p > 0.0 for p in min_p):
        # probs < min_p · max(probs)  ⇔  logit < max(logit) + log(min_p); log(0) = -inf cuts nothing.
        floors = torch.tensor([math.log(p) if p > 0.0 else -math.inf for p in min_p], device=device)
        scaled.masked_fill_(scaled < scaled.amax(dim=-1, keepdim=True) + floors.unsqueeze(1), -math.inf)
    return scaled


# -- logits processors -------------------------------------------------------------------------------------------------
def _add_logit_bias(scores: torch.Tensor, options: list[SamplingOptions]) -> None:
    rows, tokens, values = [], [], []
    for row, option in enumerate(options):
        if option.logit_bias:
            rows.extend([row] * len(option.logit_bias))
            tokens.extend(option.logit_bias.keys())
            values.extend(option.logit_bias.values())
    if rows:
        device = scores.device
        bias = torch.tensor(values, dtype=torch.float32, device=device)
        scores.index_put_((_index(rows, device), _index(tokens, device)), bias, accumulate=True)


def _hold_until_min_tokens(scores: torch.Tensor, rows: list[SamplingRow]) -> None:
    held_rows, held_tokens = [], []
    for index, row in enumerate(rows):
        if row.held_token_ids and len(row.output_token_ids) < row.options.min_tokens:
            held_rows.extend([index] * len(row.held_token_ids))
            held_tokens.extend(row.held_token_ids)
    if held_rows:
        device = scores.device
        where = (_index(held_rows, device), _index(held_tokens, device))
        scores.index_put_(where, torch.tensor(-math.inf, device=device))


def _apply_repetition_penalty(scores: torch.Tensor, rows: list[SamplingRow]) -> None:
    chosen = [index for index, row in enumerate(rows) if row.options.repetition_penalty != 1.0]
    if not chosen:
        return
    device = scores.device
    index = _index(chosen, device)
    history = [list(rows[row].prompt_token_ids) + list(rows[row].output_token_ids) for row in chosen]
    seen = _token_counts(history, scores.shape[1], device) > 0
    penalty = torch.tensor([rows[row].options.repetition_penalty for row in chosen], device=device).unsqueeze(1)
    block = scores[index]
    penalised = torch.where(block < 0, block * penalty, block / penalty)
    # A huge penalty must not turn a finite logit into -inf (a row could lose every token): floor at the lowest float.
    penalised = torch.where(penalised.isinf() & block.isfinite(), torch.finfo(torch.float32).min, penalised)
    scores[index] = torch.where(seen, penalised, block)


def _apply_presence_frequency(scores: torch.Tensor, rows: list[SamplingRow]) -> None:
    chosen = [
        index
        for index, row in enumerate(rows)
        if (row.options.presence_penalty or row.options.frequency_penalty) and row.output_token_ids
    ]
    if not chosen:
        return
    device = scores.device
    index = _index(chosen, device)
    counts = _token_counts([rows[row].output_token_ids for row in chosen], scores.shape[1], device)
    presence = torch.tensor([rows[row].options.presence_penalty for row in chosen], device=device).unsqueeze(1)
    frequency = torch.tensor([rows[row].options.frequency_penalty for row in chosen], device=device).unsqueeze(1)
    scores[index] -= counts * frequency + (counts > 0) * presence


def _token_counts(histories: list[Sequence[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """[len(histories), vocab] float32: how often each token occurs in each history."""
    width = max(len(history) for history in histories)
    # Pad with an id one past the vocabulary; its column is dropped after counting.
    padded = torch.full((len(histories), width), vocab, dtype=torch.int64)
    for row, history in enumerate(histories):
        padded[row, : len(history)] = torch.as_tensor(history, dtype=torch.int64)
    counts = torch.zeros((len(histories), vocab + 1), dtype=torch.float32, device=device)
    counts.scatter_add_(1, padded.to(device), torch.ones_like(padded, dtype=torch.float32, device=device))
    return counts[:, :vocab]


# -- structured output -------------------------------------------------------------------------------------------------
def apply_token_bitmask(scores: torch.Tensor, allowed: TokenBitmask) -> None:
    """Set every token a row's bitmask does not allow to -inf, in place, on the scores' device."""
    device = scores.device
    vocab = scores.shape[1]
    bits = allowed.bits.to(device, non_blocking=True)
    shifts = torch.arange(32, dtype=torch.int32, device=device)
    unpacked = ((bits.unsqueeze(-1) >> shifts) & 1).flatten(1).bool()
    permitted = torch.zeros((len(allowed.rows), vocab), dtype=torch.bool, device=device)
    width = min(vocab, unpacked.shape[1])
    permitted[:, :width] = unpacked[:, :width]  # tokens past the mask's vocabulary are never allowed
    index = _index(allowed.rows, device)
    scores[index] = scores[index].masked_fill_(~permitted, -math.inf)
