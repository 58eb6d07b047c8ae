"""Request bodies at the HTTP edge (msgspec), decoded by decoding.py. Responses are in responses.py.

Types are strict (`"max_tokens": "3"` is a 400 naming the field), `null` means "not given", and unknown fields are
ignored with a warning, as vLLM does. Fields OpenAI, vLLM, TGI or LoRAX define are declared here, so they are either
honoured or refused by name by the controllers (never silently dropped); docs/api.md lists which is which.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct

from kvrun.adapters.merge import MAX_COMPONENTS, SIGN_METHODS, STRATEGIES, MergeSpec
from kvrun.serving.decoding import OpenFields

PositiveInt = Annotated[int, Meta(ge=1)]
Temperature = Annotated[float, Meta(ge=0.0, le=2.0)]
TopP = Annotated[float, Meta(gt=0.0, le=1.0)]
Penalty = Annotated[float, Meta(ge=-2.0, le=2.0)]
RepetitionPenalty = Annotated[float, Meta(gt=0.0, le=10.0)]
TopK = Annotated[int, Meta(ge=-1)]  # vLLM: -1 or 0 = no cut
ChoiceCount = Annotated[int, Meta(ge=1, le=16)]
Probability = Annotated[float, Meta(ge=0.0, le=1.0)]


class StreamOptions(Struct):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM: usage on every chunk


class JsonSchemaFormat(Struct):
    name: str = "response"
    schema: dict[str, Any] | None = None
    strict: bool | None = None
    description: str | None = None


class ResponseFormat(Struct):
    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: JsonSchemaFormat | None = None


class MergedAdapters(Struct, kw_only=True, forbid_unknown_fields=True):
    """LoRAX's `merged_adapters`: serve the merge of several adapters (kvrun.adapters.merge says what it computes).
    Unknown fields are refused: a misspelt `density` would silently merge differently."""

    ids: Annotated[list[str], Meta(min_length=1, max_length=MAX_COMPONENTS)]
    weights: list[float] | None = None  # one per id; LoRAX's default: all 1
    merge_strategy: Literal[STRATEGIES] = "linear"
    majority_sign_method: Literal[SIGN_METHODS] = "total"
    density: Annotated[float, Meta(ge=0.0, le=1.0)] = 1.0  # the fraction kept by ties / dare (linear ignores it)

    def spec(self) -> MergeSpec:
        # LoRAX: no weights (or an empty list) weighs every adapter 1.
        weights = tuple(self.weights) if self.weights else (1.0,) * len(self.ids)
        return MergeSpec(weights, self.merge_strategy, self.density, self.majority_sign_method)


class SamplingFields(Struct, kw_only=True):
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
    logit_bias: dict[str, Annotated[float, Meta(ge=-100.0, le=100.0)]] | None = None  # token id (as text) → bias
    user: str | None = None  # accepted and ignored
    response_format: ResponseFormat | None = None
    # vLLM extras
    top_k: TopK | None = None
    min_p: Probability = 0.0
    min_tokens: Annotated[int, Meta(ge=0)] = 0
    repetition_penalty: RepetitionPenalty = 1.0
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    return_token_ids: bool = False  # add each choice's generated token ids (`token_ids`), as vLLM does
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    # kvrun's extension: LoRAX's merged_adapters (with `model` naming the base model)
    merged_adapters: MergedAdapters | None = None


class CompletionRequest(SamplingFields, kw_only=True):
    # str, a list of str (a batch), a list of token ids, or a list of token-id lists. (msgspec allows one array
    # type in a union, so the list's items are checked by the controller.)
    prompt: str | list[str | int | list[int]]
    max_tokens: PositiveInt | None = 16
    logprobs: Annotated[int, Meta(ge=0, le=20)] | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: PositiveInt | None = None


class TextPart(Struct, OpenFields):
    type: str
    text: str | None = None


class ToolCallFunction(Struct, OpenFields):
    name: str
    arguments: str = ""


class ToolCall(Struct, OpenFields):
    function: ToolCallFunction
    id: str | None = None
    type: str = "function"


class ChatMessage(Struct, OpenFields):
    # Open: clients replay whole assistant messages (with `refusal`, `audio`, ...) into the history.
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None


class FunctionDefinition(Struct):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(Struct):
    function: FunctionDefinition
    type: Literal["function"] = "function"


class NamedFunction(Struct):
    name: str


class NamedToolChoice(Struct):
    function: NamedFunction
    type: Literal["function"] = "function"


class ChatCompletionRequest(SamplingFields, kw_only=True):
    messages: Annotated[list[ChatMessage], Meta(min_length=1)]
    max_tokens: PositiveInt | None = None
    max_completion_tokens: PositiveInt | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Meta(ge=0, le=20)] | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    # Accepted and ignored: they do not change what is generated.
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None
    # vLLM extras
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    echo: bool = False  # unsupported unless false


class TokenizeRequest(Struct, kw_only=True):
    """vLLM's /tokenize: a `prompt`, or chat `messages` rendered as /v1/chat/completions renders them."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[Tool] | None = None
    return_token_strs: bool = False


class DetokenizeRequest(Struct, kw_only=True):
    model: str | None = None
    tokens: list[int]


# -- TGI / LoRAX -------------------------------------------------------------------------------------------------------
class Grammar(Struct):
    """TGI's `grammar`: `{"type": "json", "value": <schema>}` or `{"type": "regex", "value": "<pattern>"}`."""

    type: Literal["json", "json_object", "regex"]
    value: str | dict[str, Any] | None = None


class LoraxResponseFormat(Struct):
    """LoRAX's `response_format`: `{"type": "json_object", "schema": <JSON schema>}`."""

    type: Literal["json_object", "json_schema", "text"]
    schema: dict[str, Any] | None = None


class GenerateParameters(Struct, kw_only=True):
    adapter_id: str | None = None
    adapter_source: str | None = None  # LoRAX: hub | local | s3 | pbase; kvrun: registry (default) | local
    api_token: str | None = None  # LoRAX: a token for the adapter source; accepted and ignored
    merged_adapters: MergedAdapters | None = None  # LoRAX: the merge of several adapters, instead of adapter_id
    best_of: PositiveInt | None = None
    decoder_input_details: bool = False
    details: bool = False
    do_sample: bool = False
    frequency_penalty: Penalty | None = None
    repetition_penalty: RepetitionPenalty | None = None
    ignore_eos_token: bool = False
    max_new_tokens: PositiveInt | None = None
    return_full_text: bool = False
    seed: Annotated[int, Meta(ge=0)] | None = None
    stop: list[str] = msgspec.field(default_factory=list)
    temperature: Annotated[float, Meta(ge=0.0, le=100.0)] | None = None
    top_k: PositiveInt | None = None
    top_n_tokens: Annotated[int, Meta(ge=0, le=20)] | None = None
    return_k_alternatives: Annotated[int, Meta(ge=0, le=20)] | None = None  # LoRAX's name for top_n_tokens
    top_p: TopP | None = None
    truncate: PositiveInt | None = None
    typical_p: float | None = None
    watermark: bool = False
    grammar: Grammar | None = None
    response_format: LoraxResponseFormat | None = None


class GenerateRequest(Struct, kw_only=True):
    inputs: Annotated[str, Meta(min_length=1)]
    parameters: GenerateParameters = msgspec.field(default_factory=GenerateParameters)
    stream: bool = False


# -- vLLM's adapter administration ------------------------------------------------------------------------------------
class LoadLoraAdapterRequest(Struct, kw_only=True):
    lora_name: str
    lora_path: str
    load_inplace: bool = False  # replace an adapter already loaded under this name


class UnloadLoraAdapterRequest(Struct, kw_only=True):
    lora_name: str
    lora_int_id: int | None = None  # vLLM sends it; names identify adapters here
