"""Request fields → SamplingParams, for every endpoint; SamplingParams' own refusals become 400s naming the field
as the client wrote it (`parameters.repetition_penalty` on TGI, `response_format` on OpenAI)."""

from __future__ import annotations

import json
from typing import Any

from kvrun.engine.sampling_params import SamplingParams, StructuredOutputParams
from kvrun.serving import errors


def make_params(fields: dict[str, str], **values: Any) -> SamplingParams:
    """SamplingParams(**values); `fields` maps a SamplingParams name to the request field that set it."""
    try:
        return SamplingParams(**values)
    except ValueError as error:
        message = str(error)
        name = message.split(" ", 1)[0]
        field = fields.get(name, name)
        if message.startswith(f"{name} "):
            message = f"{field} {message.split(' ', 1)[1]}"
        raise errors.invalid(message, field) from None


def structured(choices: dict[str, StructuredOutputParams | None]) -> tuple[StructuredOutputParams | None, str | None]:
    """The one structured-output constraint among request fields (field → its constraint, None when not set)."""
    chosen = [(field, params) for field, params in choices.items() if params is not None]
    if len(chosen) > 1:
        names = " and ".join(field for field, _ in chosen)
        raise errors.invalid(f"{names} cannot be combined: give one output constraint", chosen[1][0])
    return chosen[0][1] if chosen else None, chosen[0][0] if chosen else None


def json_schema(schema: Any, field: str) -> StructuredOutputParams:
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as error:
            raise errors.invalid(f"{field} is not a JSON schema: {error}", field) from None
    if not isinstance(schema, dict):
        raise errors.invalid(f"{field} must be a JSON schema object", field)
    return StructuredOutputParams(json=schema)


def logit_bias(bias: dict[str, float] | None, vocab_size: int, field: str = "logit_bias") -> dict[int, float] | None:
    """OpenAI sends token ids as JSON object keys (strings)."""
    if not bias:
        return None
    result = {}
    for key, value in bias.items():
        try:
            token_id = int(key)
        except ValueError:
            raise errors.invalid(f"{field} keys must be token ids, got {key!r}", field) from None
        if not 0 <= token_id < vocab_size:
            raise errors.invalid(f"{field} token id {token_id} is outside the vocabulary [0, {vocab_size})", field)
        result[token_id] = value
    return result
