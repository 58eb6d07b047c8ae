from __future__ import annotations

from dataclasses import dataclass, field

# Fields whose behaviour the sampler implements; any other field left at a non-default value is refused by
# `SamplingParams.__post_init__` so a request never runs with a setting the engine would silently ignore.
_NOT_YET = ("min_p", "min_tokens", "repetition_penalty", "presence_penalty", "frequency_penalty", "logit_bias",
            "structured_output")  # fmt: skip


@dataclass(frozen=True, slots=True)
class StructuredOutputParams:
    """Constrain generation to a language (vLLM's GuidedDecodingParams); exactly one field is set."""

    json: str | dict | None = None  # a JSON schema (object or its JSON text)
    json_object: bool = False  # any JSON object
    regex: str | None = None
    choice: tuple[str, ...] | None = None  # one of these strings, exactly
    grammar: str | None = None  # an EBNF / GBNF grammar

    def __post_init__(self) -> None:
        if self.choice is not None:
            object.__setattr__(self, "choice", tuple(self.choice))
        chosen = [name for name in ("json", "regex", "choice", "grammar") if getattr(self, name) is not None]
        chosen += ["json_object"] if self.json_object else []
        if len(chosen) != 1:
            raise ValueError(f"structured output needs exactly one of json, json_object, regex, choice, grammar; got {chosen or 'none'}")


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How one request generates (vLLM's names and meanings). temperature 0 = greedy."""

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
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not 0.0 <= self.temperature <= 100.0:
            raise ValueError(f"temperature must be in [0, 100], got {self.temperature!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if self.seed is not None and not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if any(not isinstance(text, str) or not text for text in self.stop):
            raise ValueError("stop strings must be non-empty strings")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise ValueError(f"logprobs must be in 0..20, got {self.logprobs!r}")
        defaults = SamplingParams.__dataclass_fields__
        for name in _NOT_YET:
            if getattr(self, name) != defaults[name].default:
                raise ValueError(f"{name} is not supported yet")
