from __future__ import annotations

import math
from dataclasses import dataclass, field

from kvrun.structured.spec import StructuredOutputParams

__all__ = ["SamplingParams", "StructuredOutputParams"]


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How one request generates (vLLM's names, meanings and ranges). Every value that passes these checks is served.

    - max_tokens: tokens to generate at most (>= 1).
    - temperature: in [0, 100]. Below 1e-5 the choice is greedy (argmax); 0 is the usual way to ask for it.
    - top_p: in (0, 1]; keep the smallest set of most likely tokens whose probability reaches top_p.
    - top_k: 0 = off; else keep the k most likely tokens (tokens tied with the k-th stay).
    - min_p: in [0, 1]; drop tokens less likely than min_p × the most likely token's probability.
    - seed: same seed, prompt, adapter and parameters → same tokens, whatever else shares the batch.
    - stop: strings; generation ends before the first one (which is cut from the text).
    - stop_token_ids: generation ends after one of these tokens (kept in token_ids, not in the text).
    - ignore_eos: keep generating past the model's end-of-sequence token.
    - min_tokens: in [0, max_tokens]; EOS and stop_token_ids are masked until this many tokens were generated.
    - repetition_penalty: > 0 (1 = off); HF/vLLM: the logit of every token of the prompt or the output is divided
      by it when positive and multiplied by it when negative (> 1 discourages repeats).
    - presence_penalty, frequency_penalty: in [-2, 2]; OpenAI: logit -= frequency_penalty × count + presence_penalty
      × (count > 0), count = occurrences among the generated tokens.
    - logit_bias: {token id: bias in [-100, 100]} added to the logits (ids checked against the model's vocabulary
      when the request is added).
    - structured_output: constrain the output to a JSON schema, any JSON object, a regex, a choice or a grammar
      (StructuredOutputParams); refused here when it cannot be parsed. The request ends ("stop") once its grammar
      is complete and the model chose to end it; ignore_eos does not extend a complete grammar.
    - logprobs: None = none; N in [0, 20] = the chosen token's logprob plus the N most likely alternatives. Logprobs
      are always those of the model's raw distribution: before penalties, biases, masks and temperature.
    - skip_special_tokens: leave special tokens out of the text.

    Order in the sampler: logit_bias, min_tokens mask, repetition penalty, presence/frequency penalties, structured
    output mask, then temperature, top_k, top_p, min_p and the draw.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k cut
    min_p: float = 0.0  # drop tokens whose probability is below min_p × the top token's
    seed: int | None = None  # same seed, same prompt, same adapter → same tokens
    stop: tuple[str, ...] = field(default=())  # generation ends before the first of these strings
    stop_token_ids: tuple[int, ...] = field(default=())
    ignore_eos: bool = False
    min_tokens: int = 0  # EOS and stop token ids are masked until this many tokens are generated
    repetition_penalty: float = 1.0  # HF/vLLM multiplicative penalty on prompt + generated tokens (> 1 discourages)
    presence_penalty: float = 0.0  # OpenAI: subtracted once from every generated token's logit
    frequency_penalty: float = 0.0  # OpenAI: subtracted per occurrence among generated tokens
    logit_bias: dict[int, float] | None = None  # token id → added to its logit
    structured_output: StructuredOutputParams | None = None
    logprobs: int | None = None  # return the top-N logprobs with every generated token
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        if not _is_int(self.max_tokens) or not 1 <= self.max_tokens <= MAX_ID:
            raise ValueError(f"max_tokens must be an integer in [1, 2**63 - 1], got {self.max_tokens!r}")
        _check_range("temperature", self.temperature, 0.0, 100.0)
        if not (_is_number(self.top_p) and 0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not _is_int(self.top_k) or not 0 <= self.top_k <= MAX_ID:
            raise ValueError(f"top_k must be an integer in [0, 2**63 - 1] (0 = off), got {self.top_k!r}")
        _check_range("min_p", self.min_p, 0.0, 1.0)
        if self.seed is not None and not (_is_int(self.seed) and -(2**63) <= self.seed < 2**64):
            raise ValueError(f"seed must be an integer in [-2**63, 2**64 - 1], got {self.seed!r}")
        if any(not isinstance(text, str) or not text for text in self.stop):
            raise ValueError("stop strings must be non-empty strings")
        if any(not _is_int(token) or not 0 <= token <= MAX_ID for token in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be integers in [0, 2**63 - 1], got {list(self.stop_token_ids)!r}")
        if not _is_int(self.min_tokens) or not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(
                f"min_tokens must be an integer in [0, max_tokens={self.max_tokens}], got {self.min_tokens!r}"
            )
        if not (_is_number(self.repetition_penalty) and 0.0 < self.repetition_penalty < math.inf):
            raise ValueError(f"repetition_penalty must be a finite number > 0, got {self.repetition_penalty!r}")
        _check_range("presence_penalty", self.presence_penalty, -2.0, 2.0)
        _check_range("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        if self.logit_bias is not None:
            object.__setattr__(self, "logit_bias", _checked_logit_bias(self.logit_bias))
        if self.structured_output is not None:
            _check_structured_output(self.structured_output)
        if self.logprobs is not None and not (_is_int(self.logprobs) and 0 <= self.logprobs <= 20):
            raise ValueError(f"logprobs must be an integer in 0..20, got {self.logprobs!r}")


# The largest token id, count or top-k taken: the engine core's messages carry them as 64-bit integers, and no
# vocabulary or context comes near it.
MAX_ID = 2**63 - 1


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_range(name: str, value: object, low: float, high: float) -> None:
    # `low <= value <= high` is False for NaN, so NaN is refused with the range.
    if not (_is_number(value) and low <= value <= high):
        raise ValueError(f"{name} must be a number in [{low:g}, {high:g}], got {value!r}")


def _check_structured_output(spec: object) -> None:
    """Parsed now (no tokenizer needed), so a bad schema, regex or grammar is refused before anything is queued."""
    if not isinstance(spec, StructuredOutputParams):
        raise ValueError("structured_output must be a StructuredOutputParams")
    from kvrun.structured.grammar import GrammarError, parse  # imports xgrammar: only for constrained requests

    try:
        parse(spec)
    except GrammarError as error:
        raise ValueError(f"structured_output {error}") from None


def _checked_logit_bias(bias: object) -> dict[int, float]:
    if not isinstance(bias, dict):
        raise ValueError(f"logit_bias must map token ids to numbers, got {type(bias).__name__}")
    for token, value in bias.items():
        if not _is_int(token) or not 0 <= token <= MAX_ID:
            raise ValueError(f"logit_bias keys must be token ids (integers in [0, 2**63 - 1]), got {token!r}")
        if not (_is_number(value) and -100.0 <= value <= 100.0):
            raise ValueError(f"logit_bias[{token}] must be a number in [-100, 100], got {value!r}")
    return {token: float(value) for token, value in bias.items()}
