"""Response bodies and stream chunks, field for field as OpenAI, vLLM and TGI send them.

OpenAI sends `null` for absent values inside choices (`"logprobs": null`, `"finish_reason": null`) but leaves `usage`
out of stream chunks unless `stream_options.include_usage` asked for it; UNSET marks fields that are left out.
"""

from __future__ import annotations

import msgspec
from msgspec import UNSET, Struct, UnsetType


class Usage(Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(Struct):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(Struct):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None  # vLLM: the stop string or token id that ended it
    token_ids: list[int] | UnsetType = UNSET  # vLLM's `return_token_ids`


class Completion(Struct):
    id: str
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None | UnsetType = UNSET
    object: str = "text_completion"
    system_fingerprint: str | None = None


class TopLogprob(Struct):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(Struct):
    token: str
    logprob: float
    bytes: list[int]
    top_logprobs: list[TopLogprob]


class ChatLogprobs(Struct):
    content: list[TokenLogprob]


class ChatMessageOut(Struct):
    content: str | None  # None when the reply is tool calls
    role: str = "assistant"
    refusal: str | None = None
    tool_calls: list[dict] = msgspec.field(default_factory=list)


class ChatChoice(Struct):
    index: int
    message: ChatMessageOut
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    token_ids: list[int] | UnsetType = UNSET


class ChatCompletion(Struct):
    id: str
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    object: str = "chat.completion"
    system_fingerprint: str | None = None


class Delta(Struct, omit_defaults=True):
    role: str | UnsetType = UNSET
    content: str | None | UnsetType = UNSET
    tool_calls: list[dict] | UnsetType = UNSET  # each with its `index`, as OpenAI streams them


class ChatChunkChoice(Struct):
    index: int
    delta: Delta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    token_ids: list[int] | UnsetType = UNSET


class ChatCompletionChunk(Struct):
    id: str
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None | UnsetType = UNSET
    object: str = "chat.completion.chunk"
    system_fingerprint: str | None = None


class ModelCard(Struct):
    id: str
    created: int
    owned_by: str
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None
    object: str = "model"


class ModelList(Struct):
    data: list[ModelCard]
    object: str = "list"


class TokenizeResponse(Struct):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeResponse(Struct):
    prompt: str


class VersionResponse(Struct):
    version: str


# -- TGI / LoRAX ------------------------------------------------------------------------------------------------------
class AlternativeToken(Struct):
    id: int
    text: str
    logprob: float


class InputToken(Struct):
    id: int
    text: str
    logprob: float | None = None


class Token(Struct):
    id: int
    text: str
    logprob: float
    special: bool
    alternative_tokens: list[AlternativeToken] | None = None  # LoRAX's `return_k_alternatives`


class GenerateDetails(Struct):
    finish_reason: str  # "length" | "eos_token" | "stop_sequence"
    generated_tokens: int
    seed: int | None
    prompt_tokens: int  # LoRAX
    prefill: list[InputToken] = msgspec.field(default_factory=list)  # filled when `decoder_input_details`
    tokens: list[Token] = msgspec.field(default_factory=list)
    top_tokens: list[list[Token]] | None = None  # TGI's `top_n_tokens`


class GenerateResponse(Struct, omit_defaults=True):
    generated_text: str
    details: GenerateDetails | None = None


class StreamDetails(Struct):
    finish_reason: str
    generated_tokens: int
    seed: int | None
    input_length: int  # TGI
    prompt_tokens: int  # LoRAX


class StreamResponse(Struct):
    index: int
    token: Token
    generated_text: str | None = None
    details: StreamDetails | None = None
    top_tokens: list[Token] | None = None


class TgiInfo(Struct):
    """GET /info, in TGI's shape (with LoRAX's adapter limits and kvrun's registry beside it)."""

    model_id: str
    model_sha: str | None
    model_dtype: str
    model_device_type: str
    model_pipeline_tag: str | None
    max_concurrent_requests: int
    max_best_of: int
    max_stop_sequences: int
    max_input_tokens: int
    max_input_length: int  # TGI < 2.1's name for max_input_tokens
    max_total_tokens: int
    max_batch_total_tokens: int
    max_batch_size: int
    max_waiting_tokens: int
    waiting_served_ratio: float
    validation_workers: int
    max_client_batch_size: int
    router: str
    version: str
    sha: str | None
    docker_label: str | None
    max_loras: int
    max_lora_rank: int
    max_cpu_loras: int
    registry: str | None


# -- adapters ----------------------------------------------------------------------------------------------------------
class AdapterInfo(Struct):
    """One adapter as /v1/adapters reports it."""

    id: str  # what a request names: `ns/name`, a tag ref, or a name loaded from a path
    state: str  # "registry" (only there) | "registered" | "host" | "gpu"
    source: str  # "registry" | "path" | "merged" (a merged_adapters merge, named by its identity)
    version: int | None = None
    ref: str | None = None  # the engine-side version this id serves, `ns/name@3`
    sha256: str | None = None
    rank: int | None = None
    slot: int | None = None
    in_flight: int = 0  # live requests (running or waiting) on this version
    pinned: int = 0  # running requests pinning its slot
    tags: list[str] = msgspec.field(default_factory=list)
    serving: bool = True  # False: a superseded version kept until its in-flight requests finish
    why_not_servable: str | None = None  # set: this server cannot serve it (not listed in /v1/models)
    stale: bool = False  # the registry does not answer: this is the last known resolution, still served


class AdapterList(Struct):
    data: list[AdapterInfo]
    max_loras: int
    max_cpu_loras: int
    object: str = "list"
