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
argmax. The draw inverts each row's cumulative distribution at one uniform number: rows without a seed share one
draw from the device's generator; a row with a seed draws from its own generator, so its tokens do not depend on
what else shares the batch. Top-p looks at a short head of the most likely tokens and sorts a whole row only when
the nucleus may lie beyond it.

Sampling is total: a row whose logits are not finite, whose every token is masked, or whose generator fails gets a
SamplingFailure, and every other row of the batch still gets the token it would have got alone.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from kvrun.runtime.step_layout import to_device

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
    failed: dict[int, str] = field(default_factory=dict)  # rows whose mask could not be made: they fail, alone


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
    return launch_sample(logits, rows, allowed).results()


@torch.inference_mode()
def launch_sample(
    logits: torch.Tensor, rows: list[SamplingRow], allowed: TokenBitmask | None = None, overlap: bool = False
) -> SampledBatch:
    """Queue the batch's sampling on the device: `SampledBatch.tokens` is on the device at once, `results()` brings
    them to the host. overlap: also queue the copies to the host now, so that results() waits for them alone and not
    for work launched on the device after this call (the next step); without it results() copies and waits then."""
    try:
        sampled = _sample(logits, rows, allowed, overlap)
    except Exception:  # noqa: BLE001 - a fault in one row must not cost the others their token
        logger.exception("sampling a batch of %d rows failed; sampling each row alone", len(rows))
        sampled = SampledBatch.of([_sample_alone(logits, rows, allowed, index) for index in range(len(rows))], logits)
    if allowed is not None:
        sampled.fail(allowed.failed)
    return sampled


class SampledBatch:
    """One step's sampled tokens: on the device at once (`tokens`, [rows] int64, for the next step's input), on the
    host through `results()`. overlap: the copies to the host are queued right after the sampling (pinned memory),
    so results() waits for them alone, not for work queued on the device since."""

    def __init__(self, tokens: torch.Tensor, best: torch.Tensor, logprobs: _DeviceLogprobs | None,
                 failures: dict[int, str], overlap: bool = False) -> None:  # fmt: skip
        self.tokens = tokens
        self.failures = failures
        self._logprobs = logprobs
        self._host = [tokens, best] + (logprobs.tensors() if logprobs is not None else [])
        self._copied = None
        if overlap and tokens.is_cuda:
            self._host = [_to_host(tensor) for tensor in self._host]
            self._copied = torch.cuda.Event()
            self._copied.record(torch.cuda.current_stream(tokens.device))
        self._results: list[SampledToken | SamplingFailure] | None = None

    @classmethod
    def of(cls, results: list[SampledToken | SamplingFailure], logits: torch.Tensor) -> SampledBatch:
        """Results already on the host (rows sampled one by one)."""
        ids = [result.token_id if isinstance(result, SampledToken) else 0 for result in results]
        batch = cls(to_device(ids, torch.int64, logits.device), torch.zeros(len(ids)), None, {})
        batch._results = results
        return batch

    def fail(self, reasons: dict[int, str]) -> None:
        """These rows get no token (their grammar's mask could not be made), whatever was drawn for them."""
        self.failures.update(reasons)
        if self._results is not None:
            for row, reason in reasons.items():
                self._results[row] = SamplingFailure(reason)

    def results(self) -> list[SampledToken | SamplingFailure]:
        if self._results is None:
            if self._copied is not None:
                self._copied.synchronize()
            tokens, best, *logprobs = (tensor.tolist() for tensor in self._host)
            chosen = self._logprobs.collect(*logprobs) if self._logprobs is not None else {}
            self._results = []
            for row, (token_id, best_value) in enumerate(zip(tokens, best)):
                reason = self.failures.get(row) or _failure(best_value)
                if reason is not None:
                    self._results.append(SamplingFailure(reason))
                else:
                    self._results.append(SampledToken(token_id, *chosen.get(row, (None, None))))
        return self._results


def _to_host(tensor: torch.Tensor) -> torch.Tensor:
    """A copy on the host, queued on the current stream (pinned memory, so the copy does not block the host)."""
    if not tensor.is_cuda:
        return tensor
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    return host.copy_(tensor, non_blocking=True)


def _sample_alone(
    logits: torch.Tensor, rows: list[SamplingRow], allowed: TokenBitmask | None, index: int
) -> SampledToken | SamplingFailure:
    own = None
    if allowed is not None and index in allowed.rows:
        own = TokenBitmask([0], allowed.bits[allowed.rows.index(index)].unsqueeze(0))
    try:
        return _sample(logits[index : index + 1], [rows[index]], own, False).results()[0]
    except Exception as error:  # noqa: BLE001 - reported as this row's failure
        return SamplingFailure(f"sampling failed: {type(error).__name__}: {error}")


def _sample(
    logits: torch.Tensor, rows: list[SamplingRow], allowed: TokenBitmask | None, overlap: bool
) -> SampledBatch:
    options = [row.options for row in rows]
    want_logprobs = [index for index, option in enumerate(options) if option.logprobs is not None]
    raw_logprobs = None
    if want_logprobs:
        raw_logprobs = torch.log_softmax(logits[_index(want_logprobs, logits.device)].float(), dim=-1)
    scores = process_logits(logits.to(torch.float32, copy=True), rows, allowed)
    best, tokens = scores.max(dim=-1)
    failures: dict[int, str] = {}
    drawn = [index for index, option in enumerate(options) if option.temperature >= GREEDY_BELOW]
    if drawn:
        index = _index(drawn, scores.device)
        warped = warp_logits(scores[index], [options[row] for row in drawn])
        choice, draw_failures = _draw(warped, [rows[row].generator for row in drawn])
        failures.update((drawn[position], reason) for position, reason in draw_failures.items())
        tokens = tokens.index_copy(0, index, choice)
    # A row that fails (non-finite logits, every token masked) may draw the id one past the vocabulary. The host
    # reports its failure; on the device its id stays a valid token, which a next step launched before the host has
    # seen the failure may read (its row is then dropped).
    tokens = tokens.clamp_(0, logits.shape[-1] - 1)
    logprobs = _DeviceLogprobs(raw_logprobs, tokens, want_logprobs, options) if raw_logprobs is not None else None
    return SampledBatch(tokens, best, logprobs, failures, overlap)


class _DeviceLogprobs:
    """The logprobs the rows in want asked for (raw_logprobs' rows), computed on the device; `collect` builds
    {row: (logprob of its token, its top-N alternatives)} from their host copies."""

    def __init__(self, raw_logprobs: torch.Tensor, tokens: torch.Tensor, want: list[int],
                 options: list[SamplingOptions]) -> None:  # fmt: skip
        own_tokens = tokens[_index(want, tokens.device)]
        self.chosen = raw_logprobs.gather(1, own_tokens.unsqueeze(1)).squeeze(1)
        self.want, self.counts = want, [options[row].logprobs for row in want]
        most = max(self.counts)
        self.top = raw_logprobs.topk(most, dim=-1) if most else None

    def tensors(self) -> list[torch.Tensor]:
        return [self.chosen] + ([self.top.values, self.top.indices] if self.top is not None else [])

    def collect(self, chosen: list[float], values: list | None = None, indices: list | None = None) -> dict:
        result = {}
        for position, (row, count) in enumerate(zip(self.want, self.counts)):
            alternatives = dict(zip(indices[position][:count], values[position][:count])) if count else None
            result[row] = (chosen[position], alternatives)
        return result


def _failure(best: float) -> str | None:
    if math.isnan(best) or best == math.inf:
        return "the model produced non-finite logits (NaN or +inf) for this request"
    if best == -math.inf:
        return "no token is allowed here: the request's constraints (grammar, min_tokens) exclude every token"
    return None


def _index(rows: list[int], device: torch.device) -> torch.Tensor:
    return to_device(rows, torch.int64, device)


# -- warpers and the draw ----------------------------------------------------------------------------------------------
def warp_logits(scores: torch.Tensor, options: list[SamplingOptions]) -> torch.Tensor:
    """scores: [n, vocab] processed logits of rows that draw (in place). Temperature, then top-k (ties at the k-th
    value kept), top-p (the smallest head whose mass reaches p), min-p: HF's warpers, in HF's order."""
    device = scores.device
    temperatures = to_device([option.temperature for option in options], torch.float32, device)
    # Huge logits over a small temperature can overflow: +inf would make softmax NaN, so cap at the largest float.
    scaled = scores.div_(temperatures.unsqueeze(1)).nan_to_num_(
        nan=-math.inf, posinf=torch.finfo(torch.float32).max, neginf=-math.inf
    )
    vocab = scaled.shape[1]
    top_k = [option.top_k if 0 < option.top_k < vocab else vocab for option in options]
    nucleus = [row for row, option in enumerate(options) if option.top_p < 1.0]
    if nucleus:
        index = _index(nucleus, device)
        top_p = [options[row].top_p for row in nucleus]
        scaled[index] = _top_k_top_p(scaled[index], [top_k[row] for row in nucleus], top_p)
    only_k = [row for row, option in enumerate(options) if option.top_p >= 1.0 and top_k[row] < vocab]
    if only_k:
        index = _index(only_k, device)
        scaled[index] = _top_k(scaled[index], [top_k[row] for row in only_k])
    if any(option.min_p > 0.0 for option in options):
        # probs < min_p · max(probs)  ⇔  logit < max(logit) + log(min_p); log(0) = -inf cuts nothing.
        floors = [math.log(option.min_p) if option.min_p > 0.0 else -math.inf for option in options]
        floor = scaled.amax(dim=-1, keepdim=True) + to_device(floors, torch.float32, device).unsqueeze(1)
        scaled.masked_fill_(scaled < floor, -math.inf)
    return scaled


def _top_k(scaled: torch.Tensor, top_k: list[int]) -> torch.Tensor:
    largest = scaled.topk(max(top_k), dim=-1).values
    kth = largest.gather(1, to_device(top_k, torch.int64, scaled.device).sub_(1).unsqueeze(1))
    return scaled.masked_fill_(scaled < kth, -math.inf)


NUCLEUS_HEADS = (128, 2048)  # top-p looks at this many most likely tokens first, then the whole row if it must


def _top_k_top_p(scaled: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    """Every row has top_p < 1. Sorting a 50k-token row costs more than the rest of a CPU step, and the nucleus
    almost always lies among the first hundred tokens: take the most likely few (topk), and look further only while
    some row's head holds less than its p (the cut may lie beyond it)."""
    vocab = scaled.shape[1]
    device = scaled.device
    cut_k = to_device([k < vocab for k in top_k], torch.bool, device).unsqueeze(1)
    kept_by_k = max((k for k in top_k if k < vocab), default=0)
    thresholds = to_device(top_p, torch.float32, device).unsqueeze(1)
    # Log of each row's total mass (after top-k, all of a top-k row's mass lies in a head of at least k tokens).
    total_all = scaled.logsumexp(dim=-1)
    for head in [size for size in NUCLEUS_HEADS if kept_by_k <= size < vocab] + [vocab]:
        values, order = scaled.topk(head, dim=-1)  # descending
        if kept_by_k:
            kth = values.gather(1, to_device([min(k, head) for k in top_k], torch.int64, device).sub_(1).unsqueeze(1))
            values.masked_fill_(cut_k & (values < kth), -math.inf)
        total = torch.where(cut_k.squeeze(1), values.logsumexp(dim=-1), total_all)
        probs = (values - total.unsqueeze(1)).exp_()
        if head == vocab or not bool((probs.sum(dim=-1, keepdim=True) < thresholds).any()):
            break
    # Cut a token when the mass strictly above it reaches p; the most likely token always stays (a p below
    # float32's range rounds to 0).
    outside = probs.cumsum(dim=-1).sub_(probs) >= thresholds
    outside[:, 0] = False
    values.masked_fill_(outside, -math.inf)
    return torch.full_like(scaled, -math.inf).scatter_(1, order, values)


def _draw(warped: torch.Tensor, generators: list[torch.Generator | None]) -> tuple[torch.Tensor, dict[int, str]]:
    """warped: [n, vocab]. Returns ([n] token ids, {row: why its draw failed}).

    Inverse CDF: one uniform number per row picks the first token whose cumulative probability exceeds it. The sum
    runs in float64 so even a token of probability 1e-12 keeps its share; a zero-probability token can never be
    picked (its cumulative value equals its predecessor's)."""
    device = warped.device
    cumulative = torch.softmax(warped, dim=-1).to(torch.float64).cumsum_(dim=-1)
    uniform = torch.empty(len(generators), dtype=torch.float64, device=device)
    failures: dict[int, str] = {}
    shared = [row for row, generator in enumerate(generators) if generator is None]
    if shared:
        uniform[_index(shared, device)] = torch.rand(len(shared), dtype=torch.float64, device=device)
    for row, generator in enumerate(generators):
        if generator is None:
            continue
        try:
            uniform[row : row + 1].uniform_(generator=generator)
        except Exception as error:  # noqa: BLE001 - this row's generator, this row's failure
            failures[row] = f"the request's random generator failed: {type(error).__name__}: {error}"
            uniform[row] = 0.0
    # Scaled by each row's total and kept below it, so rounding never sends the target past the last likely token.
    totals = cumulative[:, -1]
    targets = torch.minimum(uniform.mul_(totals), torch.nextafter(totals, torch.zeros_like(totals))).unsqueeze(1)
    return torch.searchsorted(cumulative, targets, right=True).squeeze(1), failures


# -- logits processors -------------------------------------------------------------------------------------------------
def process_logits(scores: torch.Tensor, rows: list[SamplingRow], allowed: TokenBitmask | None = None) -> torch.Tensor:
    """scores: [len(rows), vocab] float32, in place: logit_bias, min_tokens, repetition, presence and frequency
    penalties, then the allowed-token bitmask. Rows that use none of them are left as they are."""
    _add_logit_bias(scores, [row.options for row in rows])
    _hold_until_min_tokens(scores, rows)
    _apply_repetition_penalty(scores, rows)
    _apply_presence_frequency(scores, rows)
    if allowed is not None:
        apply_token_bitmask(scores, allowed)
    return scores


def _add_logit_bias(scores: torch.Tensor, options: list[SamplingOptions]) -> None:
    rows, tokens, values = [], [], []
    for row, option in enumerate(options):
        if option.logit_bias:
            rows.extend([row] * len(option.logit_bias))
            tokens.extend(option.logit_bias.keys())
            values.extend(option.logit_bias.values())
    if rows:
        device = scores.device
        bias = to_device(values, torch.float32, device)
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
        scores.index_put_(where, scores.new_full((), -math.inf))


def _apply_repetition_penalty(scores: torch.Tensor, rows: list[SamplingRow]) -> None:
    chosen = [index for index, row in enumerate(rows) if row.options.repetition_penalty != 1.0]
    if not chosen:
        return
    device = scores.device
    index = _index(chosen, device)
    history = [list(rows[row].prompt_token_ids) + list(rows[row].output_token_ids) for row in chosen]
    seen = _token_counts(history, scores.shape[1], device) > 0
    penalty = to_device([rows[row].options.repetition_penalty for row in chosen], torch.float32, device).unsqueeze(1)
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
    presence = to_device([rows[row].options.presence_penalty for row in chosen], torch.float32, device).unsqueeze(1)
    frequency = to_device([rows[row].options.frequency_penalty for row in chosen], torch.float32, device).unsqueeze(1)
    scores[index] -= counts * frequency + (counts > 0) * presence


def _token_counts(histories: list[Sequence[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """[len(histories), vocab] float32: how often each token occurs in each history."""
    width = max(len(history) for history in histories)
    # Pad with an id one past the vocabulary; its column is dropped after counting.
    padded = torch.full((len(histories), width), vocab, dtype=torch.int64)
    for row, history in enumerate(histories):
        padded[row, : len(history)] = torch.as_tensor(history, dtype=torch.int64)
    counts = torch.zeros((len(histories), vocab + 1), dtype=torch.float32, device=device)
    counts.scatter_add_(1, to_device(padded, torch.int64, device), torch.ones(padded.shape, device=device))
    return counts[:, :vocab]


# -- structured output -------------------------------------------------------------------------------------------------
def apply_token_bitmask(scores: torch.Tensor, allowed: TokenBitmask) -> None:
    """Set every token a row's bitmask does not allow to -inf, in place, on the scores' device.

    The words are read as little-endian bytes (bit j of word i is bit j % 8 of byte 4i + j // 8), and each byte
    looks up its eight forbidden flags in a 256-entry table: one gather on the device, no per-bit arithmetic."""
    device = scores.device
    num_rows, vocab = len(allowed.rows), scores.shape[1]
    if not num_rows:
        return
    data = allowed.bits.to(device, non_blocking=True).contiguous().view(torch.uint8)
    forbidden = _forbidden_by_byte(device)[data.long()].view(num_rows, -1)
    if forbidden.shape[1] < vocab:  # a mask narrower than the logits: the tokens past it are never allowed
        forbidden = torch.nn.functional.pad(forbidden, (0, vocab - forbidden.shape[1]), value=True)
    forbidden = forbidden[:, :vocab]
    if allowed.rows == list(range(scores.shape[0])):
        scores.masked_fill_(forbidden, -math.inf)
    else:
        index = _index(allowed.rows, device)
        scores[index] = scores[index].masked_fill_(forbidden, -math.inf)


_FORBIDDEN_BY_BYTE: dict[torch.device, torch.Tensor] = {}


def _forbidden_by_byte(device: torch.device) -> torch.Tensor:
    """[256, 8] bool: entry [v, b] is True when bit b of the byte value v is 0 (that token is not allowed)."""
    table = _FORBIDDEN_BY_BYTE.get(device)
    if table is None:
        table = ((torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1).eq(0).to(device)
        _FORBIDDEN_BY_BYTE[device] = table
    return table
