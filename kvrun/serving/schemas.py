"""Request bodies at the HTTP edge (msgspec). Responses are in responses.py.

Request structs forbid unknown fields: `max_token` or `temprature` would otherwise be ignored and silently change
what the client gets, so a typo answers 400 naming the field. Fields OpenAI or TGI define but kvrun does not
implement are declared, and refused by the controllers only when set to a non-neutral value.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta, Struct

PositiveInt = Annotated[int, Meta(ge=1)]
Temperature = Annotated[float, Meta(ge=0.0, le=2.0)]
TopP = Annotated[float, Meta(gt=0.0, le=1.0)]
Penalty = Annotated[float, Meta(ge=-2.0, le=2.0)]
TopK = Annotated[int, Meta(ge=-1)]  # vLLM: -1 or 0 = no cut
ChoiceCount = Annotated[int, Meta(ge=1, le=16)]


class StreamOptions(Struct, forbid_unknown_fields=True):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM: usage on every chunk


class SamplingFields(Struct, forbid_unknown_fields=True, kw_only=True):
    """What /v1/completions and /v1/chat/completions share (OpenAI's names, plus vLLM's extras)."""

    model: str
    temperature: Temperature | None = None
    top_p: TopP | None = None
    n: ChoiceCount = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # vLLM extras
    top_k: TopK | None = None
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    return_token_ids: bool = False  # add each choice's generated token ids (`token_ids`), as vLLM does


class CompletionRequest(SamplingFields, kw_only=True):
    # str, a list of str (a batch), a list of token ids, or a list of token-id lists. (msgspec allows one array
    # type in a union, so the list's items are checked by the controller.)
    prompt: str | list[str | int | list[int]]
    max_tokens: PositiveInt | None = 16
    logprobs: Annotated[int, Meta(ge=0, le=20)] | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: PositiveInt | None = None


class TextPart(Struct):
    type: str
    text: str | None = None


class ChatMessage(Struct):
    # Not strict: clients replay whole assistant messages (with `refusal`, `tool_calls`, ...) into the history.
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None


class ResponseFormat(Struct):
    type: str = "text"


class ChatCompletionRequest(SamplingFields, kw_only=True):
    messages: Annotated[list[ChatMessage], Meta(min_length=1)]
    max_tokens: PositiveInt | None = None
    max_completion_tokens: PositiveInt | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Meta(ge=0, le=20)] | None = None
    response_format: ResponseFormat | None = None
    tools: list[dict] | None = None
    tool_choice: str | dict | None = None
    parallel_tool_calls: bool | None = None
    # Accepted and ignored: they do not change what is generated.
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None
    add_generation_prompt: bool = True  # vLLM extra
    echo: bool = False  # vLLM extra: unsupported unless false


# -- TGI / LoRAX -------------------------------------------------------------------------------------------------------
class GenerateParameters(Struct, forbid_unknown_fields=True, kw_only=True):
    adapter_id: str | None = None
    adapter_source: str | None = None  # LoRAX: hub | local | s3 | pbase; here adapters come from the registry
    api_token: str | None = None  # LoRAX: a token for the adapter source; the registry needs none for reads
    best_of: PositiveInt | None = None
    decoder_input_details: bool = False
    details: bool = False
    do_sample: bool = False
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    max_new_tokens: PositiveInt | None = None
    return_full_text: bool | None = None
    seed: Annotated[int, Meta(ge=0)] | None = None
    stop: list[str] = msgspec.field(default_factory=list)
    temperature: Annotated[float, Meta(gt=0.0, le=100.0)] | None = None
    top_k: PositiveInt | None = None
    top_n_tokens: Annotated[int, Meta(ge=0, le=20)] | None = None
    top_p: TopP | None = None
    truncate: PositiveInt | None = None
    typical_p: float | None = None
    watermark: bool = False
    grammar: dict | None = None


class GenerateRequest(Struct, forbid_unknown_fields=True, kw_only=True):
    inputs: Annotated[str, Meta(min_length=1)]
    parameters: GenerateParameters = msgspec.field(default_factory=GenerateParameters)
    stream: bool = False


# -- vLLM's adapter administration ------------------------------------------------------------------------------------
class LoadLoraAdapterRequest(Struct, forbid_unknown_fields=True, kw_only=True):
    lora_name: str
    lora_path: str
    load_inplace: bool = False  # replace an adapter already loaded under this name


class UnloadLoraAdapterRequest(Struct, forbid_unknown_fields=True, kw_only=True):
    lora_name: str
    lora_int_id: int | None = None  # vLLM sends it; names identify adapters here
