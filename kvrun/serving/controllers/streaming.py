"""Shared plumbing of the generating endpoints: start n engine requests, run them to the end (watching for a client
that hangs up), or turn them into an SSE body whose cancellation aborts them."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Iterable

from litestar import Request

from kvrun.engine.request import RequestOutput
from kvrun.engine.sampling_params import SamplingParams
from kvrun.serving import errors
from kvrun.serving.adapter_resolver import Resolution
from kvrun.serving.engine_client import NeverFitsError
from kvrun.serving.generation import GenerationService, TrackedStream, merge
from kvrun.serving.openai_format import DONE, sse

logger = logging.getLogger(__name__)

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy buffering of tokens
CLIENT_CLOSED = 499  # nginx's code for "client closed the request"; never reaches the client


async def start_all(
    service: GenerationService,
    endpoint: str,
    resolution: Resolution,
    call_id: str,
    jobs: list[tuple[list[int], SamplingParams]],
    overload_status: int = 503,
    coalesce: bool = False,
) -> list[TrackedStream]:
    """One engine request per (prompt, params); if one is refused, the ones already queued are aborted.
    coalesce: a consumer that fell behind gets the outputs waiting for it as one (for answers that allow several
    tokens in one event, or need only the last output)."""
    try:
        service.client.check_fits(len(jobs))
    except NeverFitsError as error:
        raise errors.invalid(str(error), "n") from None
    streams: list[TrackedStream] = []
    try:
        for index, (token_ids, params) in enumerate(jobs):
            request_id = f"{call_id}-{index}"
            streams.append(await service.start(endpoint, resolution, request_id, token_ids, params, overload_status,
                                               coalesce))  # fmt: skip
    except BaseException:
        for stream in streams:
            stream.close()
        raise
    return streams


async def _disconnected(request: Request) -> None:
    # The body was read already, so the next ASGI message is http.disconnect, whenever the client hangs up.
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def collect(request: Request, streams: list[TrackedStream]) -> list[RequestOutput]:
    """Each stream's final output. A client that disconnects first gets its requests aborted."""
    finals: list[RequestOutput | None] = [None] * len(streams)

    async def run() -> None:
        async for index, output in merge(streams):
            if output.finished:
                finals[index] = output

    work = asyncio.ensure_future(run())
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        if not work.done():
            logger.info("client left before %d request(s) finished; aborting them", len(streams))
            raise errors.ApiError(CLIENT_CLOSED, "client closed the request")
        work.result()  # re-raises an ApiError from the engine side
    finally:
        for task in (work, gone):
            task.cancel()
        for stream in streams:
            stream.close()
    return finals  # type: ignore[return-value]


def openai_error_frame(error: errors.ApiError) -> bytes:
    return sse(error.openai_body())


def tgi_error_frame(error: errors.ApiError) -> bytes:
    return sse(error.tgi_body())


async def run_streams(
    streams: list[TrackedStream],
    chunk: Callable[[int, RequestOutput], bytes | None],
    final: Callable[[], bytes] | None = None,
    opening: Iterable[bytes] = (),
    error_frame: Callable[[errors.ApiError], bytes] = openai_error_frame,
    done: bytes | None = DONE,
) -> AsyncIterator[bytes]:
    """An SSE body. When the client disconnects, the server cancels this generator; `finally` then aborts the
    engine requests, which frees their KV blocks and adapter slot pins."""
    try:
        for frame in opening:
            yield frame
        async for index, output in merge(streams):
            frame = chunk(index, output)
            if frame:
                yield frame
        if final is not None:
            yield final()
    except errors.ApiError as error:  # headers are sent: the error travels as an event, as vLLM and TGI do
        yield error_frame(error)
    finally:
        for stream in streams:
            stream.close()
    if done is not None:
        yield done
