"""POST /generate and /generate_stream, as TGI and LoRAX answer them (`parameters.adapter_id` picks the adapter)."""

from __future__ import annotations

import random
import uuid

from litestar import Controller, Request, post
from litestar.params import JSONBody
from litestar.response import Response, Stream

from kvrun.engine.request import RequestOutput
from kvrun.engine.sampling_params import SamplingParams
from kvrun.serving import errors
from kvrun.serving.auth import require_api_key
from kvrun.serving.controllers.streaming import SSE_HEADERS, collect, run_streams, start_all, tgi_error_frame
from kvrun.serving.openai_format import sse
from kvrun.serving.responses import GenerateDetails, GenerateResponse, StreamDetails, StreamResponse, Token
from kvrun.serving.schemas import GenerateParameters, GenerateRequest
from kvrun.serving.state import Serving

OVERLOADED = 429  # TGI answers "Model is overloaded" with 429
ADAPTER_SOURCES = (None, "hub", "registry")


def _check(parameters: GenerateParameters) -> None:
    def refuse(field: str, why: str = "is not supported") -> errors.ApiError:
        return errors.invalid(f"parameters.{field} {why}", f"parameters.{field}")

    if parameters.adapter_source not in ADAPTER_SOURCES:
        raise refuse("adapter_source", "must be 'hub' or 'registry' (load local paths with /v1/load_lora_adapter)")
    if parameters.best_of not in (None, 1):
        raise refuse("best_of", "> 1 is not supported")
    if parameters.repetition_penalty not in (None, 1.0):
        raise refuse("repetition_penalty")
    if parameters.frequency_penalty not in (None, 0.0):
        raise refuse("frequency_penalty")
    if parameters.typical_p is not None and parameters.typical_p < 1.0:
        raise refuse("typical_p")
    if parameters.watermark:
        raise refuse("watermark")
    if parameters.grammar is not None:
        raise refuse("grammar")
    if parameters.decoder_input_details:
        raise refuse("decoder_input_details")
    if len(parameters.stop) > 16 or any(not stop for stop in parameters.stop):
        raise refuse("stop", "must be at most 16 non-empty strings")


def _sampling(parameters: GenerateParameters, max_new_tokens: int) -> SamplingParams:
    # TGI samples when asked to, or when any sampling knob is set; otherwise decoding is greedy.
    sampling = parameters.do_sample or any(
        value is not None for value in (parameters.temperature, parameters.top_k, parameters.top_p)
    )
    seed = parameters.seed
    if sampling and seed is None:
        seed = random.getrandbits(63)  # chosen here so `details.seed` can report it
    return SamplingParams(
        max_tokens=max_new_tokens,
        temperature=(parameters.temperature or 1.0) if sampling else 0.0,
        top_p=parameters.top_p or 1.0,
        top_k=parameters.top_k or 0,
        seed=seed if sampling else None,
        stop=tuple(parameters.stop),
        logprobs=parameters.top_n_tokens or 0,  # every TGI token carries its logprob
    )


def _finish_reason(output: RequestOutput) -> str:
    if output.finish_reason == "length":
        return "length"
    return "stop_sequence" if isinstance(output.stop_reason, str) else "eos_token"


def _tokens(serving: Serving, token_ids: list[int], entries: list[dict[int, float]]) -> list[Token]:
    special = set(getattr(serving.tokenizer, "all_special_ids", ()) or ())
    return [
        Token(token_id, serving.token_text(token_id), entry.get(token_id), token_id in special)
        for token_id, entry in zip(token_ids, entries)
    ]


def _top_tokens(serving: Serving, entry: dict[int, float], count: int) -> list[Token]:
    best = sorted(entry.items(), key=lambda item: -item[1])[:count]
    return [Token(token_id, serving.token_text(token_id), logprob, False) for token_id, logprob in best]


class GenerateController(Controller):
    path = "/"
    guards = [require_api_key]
    tags = ["TGI / LoRAX"]

    async def _start(self, request: Request, data: GenerateRequest):
        serving: Serving = request.app.state.serving
        service = serving.service
        parameters = data.parameters
        _check(parameters)
        resolution = await serving.resolver.resolve(parameters.adapter_id)
        token_ids = service.encode(data.inputs)
        if parameters.truncate is not None:
            token_ids = token_ids[-parameters.truncate :]
        max_new_tokens = parameters.max_new_tokens or serving.config.default_max_new_tokens
        service.check_length(len(token_ids), max_new_tokens, "inputs", "parameters.max_new_tokens")
        params = _sampling(parameters, max_new_tokens)
        call_id = f"gen-{uuid.uuid4().hex}"
        streams = await start_all(service, "generate", resolution, call_id, [(token_ids, params)], OVERLOADED)
        headers = {"x-kvrun-adapter": resolution.adapter} if resolution.adapter else {}
        return serving, streams, params, len(token_ids), headers


    @post("/generate", status_code=200, summary="Generate (TGI / LoRAX)")
    async def generate(self, request: Request, data: JSONBody[GenerateRequest]) -> Response:
        if data.stream:  # TGI's compatibility: `"stream": true` on /generate streams
            return await self._stream(request, data)
        serving, streams, params, _, headers = await self._start(request, data)
        output = (await collect(request, streams))[0]
        text = data.inputs + output.text if data.parameters.return_full_text else output.text
        details = None
        if data.parameters.details:
            entries = output.logprobs or [{}] * len(output.token_ids)
            tokens = _tokens(serving, output.token_ids, entries)
            count = data.parameters.top_n_tokens or 0
            top_tokens = [_top_tokens(serving, entry, count) for entry in entries] if count else []
            details = GenerateDetails(_finish_reason(output), len(output.token_ids), params.seed, [], tokens, top_tokens)
        return Response(GenerateResponse(text, details), headers=headers)

    @post("/generate_stream", status_code=200, summary="Generate, streamed as server-sent events (TGI / LoRAX)")
    async def generate_stream(self, request: Request, data: JSONBody[GenerateRequest]) -> Stream:
        return await self._stream(request, data)

    async def _stream(self, request: Request, data: GenerateRequest) -> Stream:
        serving, streams, params, input_length, headers = await self._start(request, data)
        prefix = data.inputs if data.parameters.return_full_text else ""

        def chunk(_: int, output: RequestOutput) -> bytes | None:
            if not output.new_token_ids:
                return None
            entries = (output.logprobs or [])[-len(output.new_token_ids) :] or [{}] * len(output.new_token_ids)
            frames = b""
            for position, token in enumerate(_tokens(serving, output.new_token_ids, entries)):
                token.text = output.new_text if position == len(output.new_token_ids) - 1 else ""
                last = output.finished and position == len(output.new_token_ids) - 1
                details = None
                if last and data.parameters.details:
                    details = StreamDetails(_finish_reason(output), len(output.token_ids), params.seed, input_length)
                generated = prefix + output.text if last else None
                top = _top_tokens(serving, entries[position], data.parameters.top_n_tokens or 0)
                frames += sse(StreamResponse(0, token, generated, details, top))
            return frames

        events = run_streams(streams, chunk, error_frame=tgi_error_frame, done=None)
        return Stream(events, media_type="text/event-stream", headers={**SSE_HEADERS, **headers})
