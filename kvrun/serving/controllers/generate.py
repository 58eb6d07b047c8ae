"""POST / (TGI's compatibility route), /generate and /generate_stream, as TGI and LoRAX answer them;
`parameters.adapter_id` picks the adapter (a registry ref, a name loaded from a path, or with
`adapter_source: "local"` a directory on the server), or `parameters.merged_adapters` several to merge."""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from pathlib import Path

from litestar import Controller, Request, post
from litestar.response import Response, Stream

from kvrun.engine.request import RequestOutput
from kvrun.serving import errors
from kvrun.serving.adapter_resolver import Resolution
from kvrun.serving.auth import require_admin_key, require_api_key
from kvrun.serving.controllers.streaming import SSE_HEADERS, collect, run_streams, start_all, tgi_error_frame
from kvrun.serving.decoding import decode
from kvrun.serving.openai_format import sse
from kvrun.serving.responses import GenerateDetails, GenerateResponse, StreamDetails, StreamResponse
from kvrun.serving.schemas import GenerateRequest
from kvrun.serving.state import Serving
from kvrun.serving.tgi_format import LOCAL_SOURCE, TokenRenderer, check, finish_reason, sampling

OVERLOADED = 429  # TGI answers "Model is overloaded" with 429


async def _local_adapter(request: Request, serving: Serving, path: str) -> Resolution:
    """LoRAX's `adapter_source: "local"`: load the directory as /v1/load_lora_adapter would (same admin key),
    once, under a name derived from its path; later requests for the same directory reuse it."""
    await require_admin_key(request, None)  # type: ignore[arg-type]
    try:
        resolved = str(Path(path).expanduser().resolve())
    except (OSError, ValueError, RuntimeError) as error:  # too long, a NUL byte, an unknown ~user
        raise errors.invalid(f"adapter path {path[:200]!r} cannot be used: {error}", "parameters.adapter_id") from None
    lock = request.app.state.setdefault("local_adapter_lock", asyncio.Lock())
    async with lock:  # two first requests for one directory must not both load it
        for name, loaded in serving.resolver.local.items():
            if loaded in (path, resolved):
                return await serving.resolver.resolve(name)
        digest = hashlib.sha256(resolved.encode()).hexdigest()[:10]
        # No '/': that form belongs to registry names, which a path-loaded adapter may never take.
        name = f"local:{Path(resolved).name[:64] or 'adapter'}-{digest}"
        try:
            await serving.resolver.load_local(name, resolved, replace=False)
        except errors.ApiError as error:
            if error.param == "lora_path":
                raise errors.invalid(f"parameters.adapter_id: {error.message}", "parameters.adapter_id") from None
            raise
    return await serving.resolver.resolve(name)


class GenerateController(Controller):
    path = "/"
    guards = [require_api_key]
    tags = ["TGI / LoRAX"]

    async def _start(self, request: Request, data: GenerateRequest, streaming: bool):
        serving: Serving = request.app.state.serving
        service = serving.service
        parameters = data.parameters
        check(parameters)
        local = parameters.adapter_source == LOCAL_SOURCE
        merged = parameters.merged_adapters
        if merged is not None:
            resolve = (lambda path: _local_adapter(request, serving, path)) if local else serving.resolver.resolve
            resolution = await service.merger.resolve(merged.ids, merged.spec(), resolve, "parameters.merged_adapters")
        elif local:
            resolution = await _local_adapter(request, serving, parameters.adapter_id or "")
        else:
            resolution = await serving.resolver.resolve(parameters.adapter_id)
        token_ids = service.encode(data.inputs)
        if parameters.truncate is not None:
            token_ids = token_ids[-parameters.truncate :]
        max_new_tokens = parameters.max_new_tokens or serving.config.default_max_new_tokens
        service.check_length(len(token_ids), max_new_tokens, "inputs", "parameters.max_new_tokens")
        params = sampling(parameters, max_new_tokens)
        call_id = f"gen-{uuid.uuid4().hex}"
        # TGI streams one event per token, each with its own text; a whole answer needs only the last output.
        streams = await start_all(service, "generate", resolution, call_id, [(token_ids, params)], OVERLOADED,
                                  coalesce=not streaming)  # fmt: skip
        headers = resolution.headers()
        special = set(getattr(serving.tokenizer, "all_special_ids", ()) or ())
        renderer = TokenRenderer(serving.token_text, special, parameters)
        return streams, params, token_ids, headers, renderer

    @post("/", status_code=200, summary="Generate; streams when `stream` is true (TGI's compatibility route)")
    async def compat(self, request: Request) -> Response:
        data = decode(await request.body(), GenerateRequest)
        if data.stream:
            return await self._stream(request, data)
        response = await self._generate(request, data)
        return Response([response.content], headers=response.headers)  # TGI answers this route with a list

    @post("/generate", status_code=200, summary="Generate (TGI / LoRAX)")
    async def generate(self, request: Request) -> Response:
        data = decode(await request.body(), GenerateRequest)
        if data.stream:  # TGI's compatibility: `"stream": true` on /generate streams
            return await self._stream(request, data)
        return await self._generate(request, data)

    @post("/generate_stream", status_code=200, summary="Generate, streamed as server-sent events (TGI / LoRAX)")
    async def generate_stream(self, request: Request) -> Stream:
        return await self._stream(request, decode(await request.body(), GenerateRequest))

    async def _generate(self, request: Request, data: GenerateRequest) -> Response[GenerateResponse]:
        streams, params, prompt, headers, renderer = await self._start(request, data, streaming=False)
        output = (await collect(request, streams))[0]
        parameters = data.parameters
        text = data.inputs + output.text if parameters.return_full_text else output.text
        details = None
        if parameters.details or parameters.decoder_input_details:
            entries = output.logprobs or [{}] * len(output.token_ids)
            tokens = [renderer.token(token_id, entry) for token_id, entry in zip(output.token_ids, entries)]
            top_tokens = [renderer.top_tokens(entry) for entry in entries] if parameters.top_n_tokens else None
            prefill = renderer.prefill(prompt) if parameters.decoder_input_details else []
            details = GenerateDetails(finish_reason(output), len(output.token_ids), params.seed, len(prompt), prefill,
                                      tokens, top_tokens)  # fmt: skip
        return Response(GenerateResponse(text, details), headers=headers)

    async def _stream(self, request: Request, data: GenerateRequest) -> Stream:
        streams, params, prompt, headers, renderer = await self._start(request, data, streaming=True)
        parameters = data.parameters
        prefix = data.inputs if parameters.return_full_text else ""

        def chunk(_: int, output: RequestOutput) -> bytes | None:
            if not output.new_token_ids:
                return None
            new = output.new_token_ids
            entries = (output.logprobs or [])[-len(new) :] or [{}] * len(new)
            frames = b""
            for position, (token_id, entry) in enumerate(zip(new, entries)):
                token = renderer.token(token_id, entry)
                token.text = output.new_text if position == len(new) - 1 else ""  # text comes whole characters
                last = output.finished and position == len(new) - 1
                details = None
                if last and parameters.details:
                    details = StreamDetails(finish_reason(output), len(output.token_ids), params.seed, len(prompt),
                                            len(prompt))  # fmt: skip
                generated = prefix + output.text if last else None
                top = renderer.top_tokens(entry) if parameters.top_n_tokens else None
                frames += sse(StreamResponse(0, token, generated, details, top))
            return frames

        events = run_streams(streams, chunk, error_frame=tgi_error_frame, done=None)
        return Stream(events, media_type="text/event-stream", headers={**SSE_HEADERS, **headers})
