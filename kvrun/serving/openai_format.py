"""OpenAI request fields → SamplingParams and chat messages; engine outputs → OpenAI logprobs and SSE frames."""

from __future__ import annotations

import msgspec

from kvrun.engine.sampling_params import SamplingParams
from kvrun.serving import errors
from kvrun.serving.responses import ChatLogprobs, CompletionLogprobs, TokenLogprob, TopLogprob
from kvrun.serving.schemas import ChatCompletionRequest, SamplingFields

_encoder = msgspec.json.Encoder()
DONE = b"data: [DONE]\n\n"


def sse(payload: object) -> bytes:
    """One server-sent event as OpenAI frames it."""
    return b"data: " + _encoder.encode(payload) + b"\n\n"


def check_unsupported(body: SamplingFields) -> None:
    if body.presence_penalty:
        raise errors.invalid("presence_penalty is not supported (only 0)", "presence_penalty")
    if body.frequency_penalty:
        raise errors.invalid("frequency_penalty is not supported (only 0)", "frequency_penalty")
    if body.logit_bias:
        raise errors.invalid("logit_bias is not supported", "logit_bias")


def sampling_params(body: SamplingFields, max_tokens: int, logprobs: int | None, choice: int) -> SamplingParams:
    stop = body.stop if isinstance(body.stop, list) else [body.stop] if body.stop is not None else []
    if any(not text for text in stop):
        raise errors.invalid("stop strings must be non-empty", "stop")
    if len(stop) > 16:
        raise errors.invalid("at most 16 stop strings", "stop")
    # Choices after the first get their own seed, so `n` seeded samples differ yet repeat across calls.
    seed = None if body.seed is None else body.seed + choice
    try:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            top_k=max(0, body.top_k or 0),
            seed=seed,
            stop=tuple(stop),
            stop_token_ids=tuple(body.stop_token_ids or ()),
            ignore_eos=body.ignore_eos,
            logprobs=logprobs,
            skip_special_tokens=body.skip_special_tokens,
        )
    except ValueError as error:
        raise errors.invalid(str(error), str(error).split(" ", 1)[0]) from None


def chat_messages(body: ChatCompletionRequest) -> list[dict]:
    """Messages as the chat template wants them: string content, `developer` read as `system`."""
    if body.tools:
        raise errors.invalid("tools are not supported by this server", "tools")
    if body.response_format is not None and body.response_format.type != "text":
        raise errors.invalid(f"response_format {body.response_format.type!r} is not supported", "response_format")
    if body.echo:
        raise errors.invalid("echo is not supported for chat completions", "echo")
    messages = []
    for index, message in enumerate(body.messages):
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
        messages.append({"role": role, "content": content or ""})
    return messages


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
