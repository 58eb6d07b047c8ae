"""POST /v1/completions and /v1/chat/completions, in OpenAI's shapes (JSON, or SSE when `stream`)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable

from litestar import Controller, Request, post
from litestar.response import Response, Stream
from msgspec import UNSET

from kvrun.serving import errors, tools
from kvrun.serving.adapter_resolver import Resolution
from kvrun.serving.auth import require_api_key
from kvrun.serving.decoding import decode
from kvrun.serving.controllers.streaming import SSE_HEADERS, collect, run_streams, start_all
from kvrun.serving.generation import TrackedStream
from kvrun.serving.openai_format import (
    chat_logprobs,
    chat_messages,
    check_chat,
    completion_logprobs,
    render_chat,
    sampling_params,
    sse,
)
from kvrun.serving.responses import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatMessageOut,
    Completion,
    CompletionChoice,
    Delta,
    Usage,
)
from kvrun.serving.schemas import ChatCompletionRequest, CompletionRequest, SamplingFields
from kvrun.serving.state import Serving


def _prompts(prompt: str | list) -> list[str | list[int]]:
    """OpenAI's four prompt forms → a list of prompts (text or token ids)."""
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise errors.invalid("prompt must not be empty", "prompt")
    if all(isinstance(item, int) for item in prompt):
        return [list(prompt)]
    if all(isinstance(item, str) for item in prompt) or all(isinstance(item, list) for item in prompt):
        return list(prompt)
    raise errors.invalid("prompt must be a string, a list of strings, token ids, or lists of token ids", "prompt")


def _completion_jobs(serving: Serving, data: CompletionRequest) -> tuple[list, int, list[str]]:
    """One (token ids, params) job per prompt and choice, the prompt tokens to bill, and each job's echo text."""
    service = serving.service
    max_tokens = data.max_tokens or 16
    jobs, prompt_tokens, prompt_texts = [], 0, []
    for prompt in _prompts(data.prompt):
        if isinstance(prompt, str):
            token_ids = service.encode(prompt)
        else:
            if not prompt or not all(isinstance(t, int) and 0 <= t < service.vocab_size for t in prompt):
                raise errors.invalid(f"prompt token ids must be in [0, {service.vocab_size})", "prompt")
            token_ids = prompt
        service.check_length(len(token_ids), max_tokens, "prompt", "max_tokens")
        prompt_tokens += len(token_ids)
        text = prompt if isinstance(prompt, str) else (serving.tokenizer.decode(prompt) if data.echo else "")
        for choice in range(data.n):
            jobs.append((token_ids, sampling_params(data, max_tokens, data.logprobs, choice, service.vocab_size)))
            prompt_texts.append(text)
    return jobs, prompt_tokens, prompt_texts


async def _resolve(serving: Serving, data: SamplingFields) -> Resolution:
    """`model`, or with kvrun's `merged_adapters` extension the merge it names (then `model` names the base model)."""
    resolution = await serving.resolver.resolve(data.model)
    merged = data.merged_adapters
    if merged is None:
        return resolution
    if resolution.adapter is not None:
        raise errors.invalid(f"model must name the base model ({serving.model_name}) when merged_adapters names the "
                             "adapters to merge", "model")  # fmt: skip
    return await serving.service.merger.resolve(merged.ids, merged.spec(), serving.resolver.resolve, "merged_adapters")


def _headers(resolution: Resolution) -> dict[str, str]:
    return resolution.headers()


def _usage(prompt_tokens: int, streams: list[TrackedStream]) -> Usage:
    completion = sum(stream.num_tokens for stream in streams)
    return Usage(prompt_tokens, completion, prompt_tokens + completion)


class OpenAIController(Controller):
    path = "/v1"
    guards = [require_api_key]
    tags = ["OpenAI"]

    @post("/completions", status_code=200, summary="Text completion (OpenAI)")
    async def completions(self, request: Request) -> Response:
        data = decode(await request.body(), CompletionRequest)
        serving: Serving = request.app.state.serving
        service = serving.service
        if data.suffix:
            raise errors.invalid("suffix is not supported", "suffix")
        if data.best_of not in (None, data.n):
            raise errors.invalid("best_of must equal n (or be omitted)", "best_of")
        resolution = await _resolve(serving, data)
        jobs, prompt_tokens, prompt_texts = _completion_jobs(serving, data)
        call_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        # OpenAI's chunks may carry several tokens: a stream that fell behind catches up in fewer, larger chunks.
        streams = await start_all(service, "completions", resolution, call_id, jobs, coalesce=True)
        include_usage = bool(data.stream_options and data.stream_options.include_usage)
        offsets = [0] * len(streams)

        def choice(index: int, output, delta: bool) -> CompletionChoice:
            text = output.new_text if delta else output.text
            token_ids = output.new_token_ids if delta else output.token_ids
            if data.echo and (not delta or len(output.token_ids) == len(output.new_token_ids)):
                text = prompt_texts[index] + text
            logprobs = None
            if data.logprobs is not None:
                entries = output.logprobs[len(output.logprobs) - len(token_ids):] if delta else output.logprobs
                logprobs = completion_logprobs(token_ids, entries, data.logprobs, serving.token_text, offsets[index])
                offsets[index] += len(text)
            ids = list(token_ids) if data.return_token_ids else UNSET
            return CompletionChoice(index, text, logprobs, output.finish_reason, output.stop_reason, ids)

        if not data.stream:
            finals = await collect(request, streams)
            body = Completion(call_id, created, data.model, [choice(i, out, False) for i, out in enumerate(finals)],
                              _usage(prompt_tokens, streams))  # fmt: skip
            return Response(body, headers=_headers(resolution))

        def chunk(index: int, output) -> bytes | None:
            if not (output.new_text or output.finished or data.logprobs is not None or data.echo
                    or data.return_token_ids):  # fmt: skip
                return None  # nothing visible yet (a partial character, or text that may become a stop string)
            body = Completion(call_id, created, data.model, [choice(index, output, True)],
                              None if include_usage else UNSET)  # fmt: skip
            return sse(body)

        def usage_chunk() -> bytes:
            return sse(Completion(call_id, created, data.model, [], _usage(prompt_tokens, streams)))

        events = run_streams(streams, chunk, usage_chunk if include_usage else None)
        return Stream(events, media_type="text/event-stream", headers={**SSE_HEADERS, **_headers(resolution)})

    @post("/chat/completions", status_code=200, summary="Chat completion (OpenAI)")
    async def chat_completions(self, request: Request) -> Response:
        data = decode(await request.body(), ChatCompletionRequest)
        serving: Serving = request.app.state.serving
        service = serving.service
        check_chat(data)
        messages = chat_messages(data.messages)
        if data.top_logprobs is not None and not data.logprobs:
            raise errors.invalid("top_logprobs needs logprobs=true", "top_logprobs")
        tool_plan = tools.plan(data, serving.tokenizer)
        resolution = await _resolve(serving, data)
        rendered_tools = tools.tool_dicts(data) if tools.template_renders_tools(serving.tokenizer) else None
        trusted = serving.config.trust_request_chat_template
        prompt = render_chat(serving.tokenizer, messages, data.add_generation_prompt, data.continue_final_message,
                             data.chat_template_kwargs, rendered_tools, trusted)  # fmt: skip
        token_ids = service.encode(prompt)
        max_tokens = data.max_completion_tokens or data.max_tokens
        max_field = "max_completion_tokens" if data.max_completion_tokens else "max_tokens"
        if max_tokens is None:
            max_tokens = service.default_max_tokens(len(token_ids), "messages")
        service.check_length(len(token_ids), max_tokens, "messages", max_field)
        top = (data.top_logprobs or 0) if data.logprobs else None
        constraint = tool_plan.constraint if tool_plan else None
        jobs = [(token_ids, sampling_params(data, max_tokens, top, choice, service.vocab_size, constraint,
                                            "tool_choice" if constraint else None))
                for choice in range(data.n)]  # fmt: skip
        call_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        streams = await start_all(service, "chat", resolution, call_id, jobs, coalesce=True)
        logprobs_of: Callable = lambda ids, entries: (  # noqa: E731
            chat_logprobs(ids, entries, top, serving.token_text) if top is not None else None
        )
        ids_of: Callable = lambda ids: list(ids) if data.return_token_ids else UNSET  # noqa: E731

        def message(output) -> tuple[ChatMessageOut, str | None]:
            if tool_plan is None:
                return ChatMessageOut(output.text), output.finish_reason
            content, calls = tools.parse(tool_plan, output.text)
            finish = "tool_calls" if calls and output.finish_reason == "stop" else output.finish_reason
            return ChatMessageOut(content, tool_calls=calls), finish

        if not data.stream:
            finals = await collect(request, streams)
            choices = []
            for index, output in enumerate(finals):
                reply, finish = message(output)
                logprobs = logprobs_of(output.token_ids, output.logprobs or [])
                choices.append(ChatChoice(index, reply, logprobs, finish, output.stop_reason, ids_of(output.token_ids)))
            body = ChatCompletion(call_id, created, data.model, choices, _usage(len(token_ids), streams))
            return Response(body, headers=_headers(resolution))

        include_usage = bool(data.stream_options and data.stream_options.include_usage)
        usage_field = None if include_usage else UNSET

        def frame(index: int, delta: Delta, logprobs=None, finish_reason: str | None = None, ids=UNSET) -> bytes:
            choice = ChatChunkChoice(index, delta, logprobs, finish_reason, ids)
            return sse(ChatCompletionChunk(call_id, created, data.model, [choice], usage_field))

        opening = [frame(index, Delta(role="assistant", content="")) for index in range(len(streams))]

        def chunk(index: int, output) -> bytes | None:
            frames = b""
            if tool_plan is not None:  # tool calls are parsed from the whole text: sent when it is complete
                if not output.finished:
                    return None
                whole, finish = message(output)
                calls = [{"index": i, **call} for i, call in enumerate(whole.tool_calls)]
                delta = Delta(content=whole.content) if not calls else Delta(tool_calls=calls)
                return frame(index, delta, None, None) + frame(index, Delta(), None, finish)
            if output.new_text or ((top is not None or data.return_token_ids) and output.new_token_ids):
                entries = (output.logprobs or [])[len(output.logprobs or []) - len(output.new_token_ids):]
                frames += frame(index, Delta(content=output.new_text), logprobs_of(output.new_token_ids, entries),
                                None, ids_of(output.new_token_ids))  # fmt: skip
            if output.finished:
                frames += frame(index, Delta(), None, output.finish_reason)
            return frames or None

        def usage_chunk() -> bytes:
            return sse(ChatCompletionChunk(call_id, created, data.model, [], _usage(len(token_ids), streams)))

        events = run_streams(streams, chunk, usage_chunk if include_usage else None, opening)
        return Stream(events, media_type="text/event-stream", headers={**SSE_HEADERS, **_headers(resolution)})
