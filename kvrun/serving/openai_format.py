"""OpenAI request fields → SamplingParams and chat messages; engine outputs → OpenAI logprobs and SSE frames."""

from __future__ import annotations

import msgspec

from kvrun.engine.sampling_params import SamplingParams, StructuredOutputParams
from kvrun.serving import errors
from kvrun.serving.sampling import json_schema, logit_bias, make_params, structured
from kvrun.serving.responses import ChatLogprobs, CompletionLogprobs, TokenLogprob, TopLogprob
from kvrun.serving.schemas import ChatCompletionRequest, ChatMessage, SamplingFields

_encoder = msgspec.json.Encoder()
DONE = b"data: [DONE]\n\n"


def sse(payload: object) -> bytes:
    """One server-sent event as OpenAI frames it."""
    return b"data: " + _encoder.encode(payload) + b"\n\n"


def _structured_output(body: SamplingFields) -> tuple[StructuredOutputParams | None, str | None]:
    response_format = None
    if body.response_format is not None and body.response_format.type == "json_object":
        response_format = StructuredOutputParams(json_object=True)
    elif body.response_format is not None and body.response_format.type == "json_schema":
        spec = body.response_format.json_schema
        if spec is None or spec.schema is None:
            raise errors.invalid("response_format json_schema needs json_schema.schema", "response_format.json_schema")
        response_format = json_schema(spec.schema, "response_format.json_schema.schema")
    return structured({
        "response_format": response_format,
        "guided_json": None if body.guided_json is None else json_schema(body.guided_json, "guided_json"),
        "guided_regex": None if body.guided_regex is None else StructuredOutputParams(regex=body.guided_regex),
        "guided_choice": None if body.guided_choice is None else StructuredOutputParams(choice=body.guided_choice),
        "guided_grammar": None if body.guided_grammar is None else StructuredOutputParams(grammar=body.guided_grammar),
    })  # fmt: skip


def sampling_params(body: SamplingFields, max_tokens: int, logprobs: int | None, choice: int, vocab_size: int,
                    constraint: StructuredOutputParams | None = None, constraint_field: str | None = None,
                    ) -> SamplingParams:  # fmt: skip
    """`constraint` (tools) replaces the body's own structured-output fields when given."""
    stop = body.stop if isinstance(body.stop, list) else [body.stop] if body.stop is not None else []
    if any(not text for text in stop):
        raise errors.invalid("stop strings must be non-empty", "stop")
    if len(stop) > 16:
        raise errors.invalid("at most 16 stop strings", "stop")
    if constraint is None:
        constraint, constraint_field = _structured_output(body)
    # Choices after the first get their own seed, so `n` seeded samples differ yet repeat across calls.
    seed = None if body.seed is None else body.seed + choice
    return make_params(
        {"structured_output": constraint_field or "response_format"},
        max_tokens=max_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=max(0, body.top_k or 0),
        min_p=body.min_p,
        min_tokens=body.min_tokens,
        repetition_penalty=body.repetition_penalty,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        logit_bias=logit_bias(body.logit_bias, vocab_size),
        structured_output=constraint,
        seed=seed,
        stop=tuple(stop),
        stop_token_ids=tuple(body.stop_token_ids or ()),
        ignore_eos=body.ignore_eos,
        logprobs=logprobs,
        skip_special_tokens=body.skip_special_tokens,
    )


def check_chat(body: ChatCompletionRequest) -> None:
    if body.echo:
        raise errors.invalid("echo is not supported for chat completions", "echo")


def chat_messages(body_messages: list[ChatMessage]) -> list[dict]:
    """Messages as the chat template wants them: string content, `developer` read as `system`."""
    messages = []
    for index, message in enumerate(body_messages):
        content = message.content
        if isinstance(content, list):
            texts = []
            for part in content:
                if part.type != "text" or part.text is None:
                    raise errors.invalid(f"content part type {part.type!r} is not supported (text only)",
                                         f"messages[{index}].content")  # fmt: skip
                texts.append(part.text)
            content = "".join(texts)
        role = "system" if message.role == "developer" else message.role
        entry = {"role": role, "content": content or ""}
        if message.tool_calls:
            entry["tool_calls"] = [msgspec.structs.asdict(call) | {"function": msgspec.structs.asdict(call.function)}
                                   for call in message.tool_calls]  # fmt: skip
        if message.tool_call_id is not None:
            entry["tool_call_id"] = message.tool_call_id
        if message.name is not None:
            entry["name"] = message.name
        messages.append(entry)
    return messages


# chat_template_kwargs that are arguments of the rendering itself, not variables of the template: a request may not
# set them (one would make it return token ids, or replace the template).
RENDER_ARGUMENTS = frozenset({
    "chat_template", "tokenize", "return_dict", "return_tensors", "padding", "truncation", "max_length",
    "tokenizer_kwargs", "return_assistant_tokens_mask", "add_generation_prompt", "continue_final_message",
    "conversation", "tools", "documents",
})  # fmt: skip


def render_chat(tokenizer, messages: list[dict], add_generation_prompt: bool = True,
                continue_final_message: bool = False, template_kwargs: dict | None = None,
                tools: list[dict] | None = None, trust_request_template: bool = False) -> str:  # fmt: skip
    """The prompt text of a chat, through the model's (or --chat-template's) template. A template sent with the
    request (chat_template_kwargs.chat_template) runs only on a server started with --trust-request-chat-template:
    it is code the server runs, and a loop in it stalls every request."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise errors.invalid("this model has no chat template: use /v1/completions (or start kvrun with "
                             "--chat-template)", "messages")  # fmt: skip
    if continue_final_message and add_generation_prompt:
        raise errors.invalid("continue_final_message needs add_generation_prompt=false", "continue_final_message")
    kwargs = dict(template_kwargs or {})
    for key in sorted(RENDER_ARGUMENTS & kwargs.keys()):
        if key == "chat_template" and trust_request_template:
            continue
        reason = ("a template from the request runs only on a server started with --trust-request-chat-template"
                  if key == "chat_template" else "it is an argument of the rendering, not a template variable")
        raise errors.invalid(f"chat_template_kwargs.{key} is not accepted: {reason}", f"chat_template_kwargs.{key}")
    if tools:
        kwargs["tools"] = tools
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                             continue_final_message=continue_final_message, **kwargs)  # fmt: skip
    except Exception as error:  # jinja raises its own types for a template's raise_exception()
        raise errors.invalid(f"the chat template rejected the messages: {error}", "messages") from None


class TokenText:
    """Token id → its text, for logprobs (cached: the same few thousand ids come back again and again)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id]) if self.tokenizer is not None else f"<{token_id}>"
            if len(self._cache) < 200_000:
                self._cache[token_id] = text
        return text


def _top(entries: dict[int, float], count: int) -> list[tuple[int, float]]:
    return sorted(entries.items(), key=lambda item: -item[1])[:count]


def completion_logprobs(
    token_ids: list[int], entries: list[dict[int, float]], count: int, token_text: TokenText, offset: int
) -> CompletionLogprobs:
    """`entries[i]` holds the sampled token's logprob first, then the top ones (kvrun's RequestOutput.logprobs)."""
    tokens, values, tops, offsets = [], [], [], []
    for token_id, entry in zip(token_ids, entries):
        text = token_text(token_id)
        tokens.append(text)
        values.append(entry.get(token_id))
        tops.append({token_text(t): v for t, v in _top(entry, count)} if count else None)
        offsets.append(offset)
        offset += len(text)
    return CompletionLogprobs(tokens, values, tops, offsets)


def chat_logprobs(token_ids: list[int], entries: list[dict[int, float]], count: int, token_text: TokenText) -> ChatLogprobs:
    content = []
    for token_id, entry in zip(token_ids, entries):
        text = token_text(token_id)
        top = [TopLogprob(token_text(t), v, list(token_text(t).encode())) for t, v in _top(entry, count)]
        content.append(TokenLogprob(text, entry.get(token_id, 0.0), list(text.encode()), top))
    return ChatLogprobs(content)
