"""TGI / LoRAX request parameters → SamplingParams; engine outputs → TGI's tokens, details and stream events.

One body serves both clients: TGI's `text-generation` reads `details.top_tokens` and `input_length`, LoRAX's
`lorax-client` reads `details.prompt_tokens` and each token's `alternative_tokens`; extra keys are ignored by both.
"""

from __future__ import annotations

import random

from kvrun.engine.request import RequestOutput
from kvrun.engine.sampling_params import SamplingParams, StructuredOutputParams
from kvrun.serving import errors
from kvrun.serving.responses import AlternativeToken, InputToken, Token
from kvrun.serving.sampling import json_schema, make_params, structured
from kvrun.serving.schemas import GenerateParameters

# Where `adapter_id` comes from. kvrun's registry is the default; LoRAX's remote sources are refused by name.
REGISTRY_SOURCES = (None, "registry")
LOCAL_SOURCE = "local"
REMOTE_SOURCES = {"hub": "the Hugging Face Hub", "s3": "S3", "pbase": "Predibase"}


def refuse(field: str, why: str = "is not supported") -> errors.ApiError:
    return errors.invalid(f"parameters.{field} {why}", f"parameters.{field}")


def check(parameters: GenerateParameters) -> None:
    source = parameters.adapter_source
    if source in REMOTE_SOURCES:
        raise refuse("adapter_source", f"{source!r} is not supported: kvrun does not download adapters from "
                      f"{REMOTE_SOURCES[source]}; push the adapter to the registry (`kvrun-adapters push DIR --name "
                      "ns/name`) and name it in adapter_id, or use 'local' with a directory on the server")
    if source not in (*REGISTRY_SOURCES, LOCAL_SOURCE):
        raise refuse("adapter_source", "must be 'registry' (the default) or 'local'")
    merged = parameters.merged_adapters
    if source == LOCAL_SOURCE and not parameters.adapter_id and merged is None:
        raise refuse("adapter_id", "must be a directory on the server when adapter_source is 'local'")
    if merged is not None and parameters.adapter_id:
        raise refuse("merged_adapters", "and parameters.adapter_id are both set; name the adapters to merge in "
                     "merged_adapters.ids only")  # fmt: skip
    if parameters.best_of not in (None, 1):
        raise refuse("best_of", "> 1 is not supported")
    if parameters.typical_p is not None and parameters.typical_p < 1.0:
        raise refuse("typical_p", "is not supported (only 1.0, no typical sampling)")
    if parameters.watermark:
        raise refuse("watermark")
    if len(parameters.stop) > 16 or any(not stop for stop in parameters.stop):
        raise refuse("stop", "must be at most 16 non-empty strings")


def _grammar(parameters: GenerateParameters) -> StructuredOutputParams | None:
    grammar = parameters.grammar
    if grammar is None:
        return None
    if grammar.type == "regex":
        if not isinstance(grammar.value, str) or not grammar.value:
            raise refuse("grammar.value", "must be a regular expression")
        return StructuredOutputParams(regex=grammar.value)
    if grammar.type == "json_object" and grammar.value is None:
        return StructuredOutputParams(json_object=True)
    return json_schema(grammar.value, "parameters.grammar.value")


def _response_format(parameters: GenerateParameters) -> StructuredOutputParams | None:
    response_format = parameters.response_format
    if response_format is None or response_format.type == "text":
        return None
    if response_format.schema is None:
        return StructuredOutputParams(json_object=True)
    return json_schema(response_format.schema, "parameters.response_format.schema")


def sampling(parameters: GenerateParameters, max_new_tokens: int) -> SamplingParams:
    # TGI samples when asked to, or when any sampling knob is set; otherwise decoding is greedy.
    sample = parameters.do_sample or any(
        value is not None for value in (parameters.temperature, parameters.top_k, parameters.top_p)
    )
    seed = parameters.seed
    if sample and seed is None:
        seed = random.getrandbits(63)  # chosen here so `details.seed` can report it
    constraint, field = structured({
        "parameters.grammar": _grammar(parameters),
        "parameters.response_format": _response_format(parameters),
    })  # fmt: skip
    names = {name: f"parameters.{name}" for name in ("repetition_penalty", "frequency_penalty", "temperature", "top_p")}
    return make_params(
        {**names, "structured_output": field or "parameters.grammar", "ignore_eos": "parameters.ignore_eos_token"},
        max_tokens=max_new_tokens,
        temperature=(1.0 if parameters.temperature is None else parameters.temperature) if sample else 0.0,
        top_p=parameters.top_p or 1.0,
        top_k=parameters.top_k or 0,
        repetition_penalty=1.0 if parameters.repetition_penalty is None else parameters.repetition_penalty,
        frequency_penalty=parameters.frequency_penalty or 0.0,
        ignore_eos=parameters.ignore_eos_token,
        structured_output=constraint,
        seed=seed if sample else None,
        stop=tuple(parameters.stop),
        logprobs=top_count(parameters),  # every TGI token carries its logprob
    )


def top_count(parameters: GenerateParameters) -> int:
    return max(parameters.top_n_tokens or 0, parameters.return_k_alternatives or 0)


def finish_reason(output: RequestOutput) -> str:
    if output.finish_reason == "length":
        return "length"
    return "stop_sequence" if isinstance(output.stop_reason, str) else "eos_token"


class TokenRenderer:
    """Token ids and their logprob entries → TGI tokens (with LoRAX's alternatives and TGI's top tokens)."""

    def __init__(self, token_text, special_ids: set[int], parameters: GenerateParameters) -> None:
        self.token_text = token_text
        self.special_ids = special_ids
        self.top_n = parameters.top_n_tokens or 0
        self.alternatives = parameters.return_k_alternatives or 0

    def _best(self, entry: dict[int, float], count: int) -> list[tuple[int, float]]:
        return sorted(entry.items(), key=lambda item: -item[1])[:count]

    def token(self, token_id: int, entry: dict[int, float]) -> Token:
        alternatives = None
        if self.alternatives:
            alternatives = [AlternativeToken(t, self.token_text(t), v) for t, v in self._best(entry, self.alternatives)]
        return Token(token_id, self.token_text(token_id), entry.get(token_id, 0.0), token_id in self.special_ids,
                     alternatives)  # fmt: skip

    def top_tokens(self, entry: dict[int, float]) -> list[Token]:
        return [Token(t, self.token_text(t), v, t in self.special_ids) for t, v in self._best(entry, self.top_n)]

    def prefill(self, prompt_token_ids: list[int]) -> list[InputToken]:
        # kvrun computes no prompt logprobs: the prefill lists the prompt's tokens with `logprob: null`.
        return [InputToken(token_id, self.token_text(token_id)) for token_id in prompt_token_ids]
