"""What every generating endpoint does between parsing its body and shaping its answer.

Resolve the adapter, tokenize, check lengths, submit to the engine (publishing a freshly fetched adapter version
with the request), turn engine and registry failures into API errors, and time the outputs for /metrics.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import replace

from kvrun.adapters.manager import UnknownAdapterError
from kvrun.adapters.peft_format import AdapterError
from kvrun.engine.request import RequestOutput
from kvrun.engine.sampling_params import SamplingParams
from kvrun.serving import errors
from kvrun.serving.adapter_merger import AdapterMerger
from kvrun.serving.adapter_resolver import AdapterResolver, Resolution
from kvrun.serving.engine_client import (
    EngineClient,
    EngineRequest,
    EngineStoppedError,
    QueueFullError,
    QueueTimeoutError,
    RequestStream,
    merged,
)
from kvrun.serving.metrics import ServingMetrics

logger = logging.getLogger(__name__)


class TrackedStream:
    """A RequestStream that records TTFT, inter-token latency and totals, and maps failures to ApiError."""

    def __init__(self, stream: RequestStream, metrics: ServingMetrics, endpoint: str, label: str | None,
                 prompt_tokens: int, arrival: float) -> None:  # fmt: skip
        self.stream = stream
        self.metrics = metrics
        self.endpoint = endpoint
        self.label = label
        self.prompt_tokens = prompt_tokens
        self.arrival = arrival
        self.num_tokens = 0
        self.last: RequestOutput | None = None
        self._recorded = False

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        previous = None
        try:
            async for output in self.stream:
                now = time.monotonic()
                if output.new_token_ids:
                    self.metrics.tokens_streamed += len(output.new_token_ids)
                    if previous is None:
                        self.metrics.first_token(now - self.arrival)
                        if output.queue_time is not None:
                            self.metrics.queued(output.queue_time)
                    else:  # one gap per token, also for the tokens of coalesced outputs
                        gap = (now - previous) / len(output.new_token_ids)
                        for _ in output.new_token_ids:
                            self.metrics.inter_token(gap)
                    previous = now
                self.num_tokens = len(output.token_ids)
                self.last = output
                if output.finished and output.finish_reason == "error":
                    logger.warning("request %s failed in the engine: %s", output.request_id, output.error)
                    raise errors.generation_failed(output.error)
                yield output
        except QueueTimeoutError as error:
            raise errors.overloaded(str(error)) from None
        except EngineStoppedError as error:
            raise errors.unavailable(str(error)) from None

    def close(self) -> None:
        self.stream.close()
        if not self._recorded:
            self._recorded = True
            last = self.last
            outcome = last.finish_reason if last is not None and last.finished else "abort"
            if outcome != "abort":
                self.metrics.completed(time.monotonic() - self.arrival)
            self.metrics.finished(self.endpoint, self.label, outcome or "abort", self.prompt_tokens, self.num_tokens)


class GenerationService:
    def __init__(self, client: EngineClient, resolver: AdapterResolver, metrics: ServingMetrics, tokenizer) -> None:
        self.client = client
        self.resolver = resolver
        self.merger = AdapterMerger(resolver)
        self.metrics = metrics
        self.tokenizer = tokenizer  # the serving side's own instance: the engine uses its own
        self.max_model_len = client.info.max_model_len
        self.kv_capacity = client.info.kv_capacity
        self.vocab_size = client.info.model_config.vocab_size

    @property
    def context_limit(self) -> int:
        return min(self.max_model_len, self.kv_capacity)

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise errors.invalid("this model has no tokenizer: send prompts as token ids", "prompt")
        return self.tokenizer.encode(text, add_special_tokens=True)

    def check_length(self, prompt_tokens: int, max_tokens: int, prompt_field: str, max_field: str) -> None:
        if prompt_tokens + max_tokens > self.max_model_len:
            raise errors.invalid(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the prompt, {max_tokens} for the "
                f"completion). Please reduce the length of the prompt or `{max_field}`.",
                max_field if prompt_tokens < self.max_model_len else prompt_field,
            )
        if prompt_tokens + max_tokens > self.kv_capacity:
            raise errors.invalid(
                f"{prompt_tokens} prompt + {max_tokens} completion tokens exceed the KV cache's {self.kv_capacity} "
                f"tokens; reduce `{max_field}` or the prompt", max_field,
            )  # fmt: skip

    def default_max_tokens(self, prompt_tokens: int, prompt_field: str) -> int:
        remaining = self.context_limit - prompt_tokens
        if remaining < 1:
            raise errors.invalid(
                f"The prompt has {prompt_tokens} tokens, which fills this model's context of {self.context_limit}",
                prompt_field,
            )
        return remaining

    async def start(
        self,
        endpoint: str,
        resolution: Resolution,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        overload_status: int = 503,
        coalesce: bool = False,
    ) -> TrackedStream:
        """coalesce: outputs that wait for a consumer that fell behind come as one (RequestStream)."""
        arrival = time.monotonic()
        request = EngineRequest(request_id, prompt_token_ids, params, resolution.adapter, resolution.label)
        try:
            stream = await self._submit(request, resolution)
        except errors.ApiError as error:
            self.metrics.rejected.inc(1, endpoint, str(error.status))
            raise
        except QueueFullError as error:
            self.metrics.rejected.inc(1, endpoint, str(overload_status))
            raise errors.overloaded(f"The server is overloaded: {error}. Retry shortly.", status=overload_status)
        stream.coalesce = coalesce
        return TrackedStream(stream, self.metrics, endpoint, resolution.label, len(prompt_token_ids), arrival)

    async def _submit(self, request: EngineRequest, resolution: Resolution) -> RequestStream:
        # Registry versions and merges are published with the request that needs them; path loads are resident.
        fetched = resolution.record is not None or resolution.merge is not None
        try:
            if fetched and request.adapter not in self.client.adapter_names:
                request = replace(request, publication=await self._publication(resolution))
            try:
                return await self.client.submit(request)
            except UnknownAdapterError:
                # Unloaded (least recently used, or deleted) between our check and the engine's: fetch it again.
                if not fetched or request.publication is not None:
                    raise
                request = replace(request, publication=await self._publication(resolution))
                return await self.client.submit(request)
        except UnknownAdapterError:
            raise errors.unknown_model(resolution.label or "") from None
        except AdapterError as error:  # before ValueError: it is one
            raise errors.incompatible_adapter(str(error)) from None
        except ValueError as error:
            raise errors.invalid(str(error)) from None
        except EngineStoppedError as error:
            raise errors.unavailable(str(error)) from None

    async def _publication(self, resolution: Resolution):
        try:
            if resolution.merge is not None:
                publication = await self.merger.publication(resolution)
            else:
                publication = await self.resolver.publication(resolution.record)
        except errors.ApiError:
            self.metrics.adapter_fetches.inc(1, "error")
            raise
        self.metrics.adapter_fetches.inc(1, "ok")
        return publication


async def merge(streams: list[TrackedStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Outputs of several streams (the n choices of one call) as they come, tagged with the stream's index. Streams
    that coalesce (RequestStream.coalesce) have the outputs that waited here merged per choice, too."""
    if len(streams) == 1:
        async for output in streams[0]:
            yield 0, output
        return
    items: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, stream: TrackedStream) -> None:
        try:
            async for output in stream:
                items.put_nowait((index, output))
        except Exception as error:  # noqa: BLE001 - re-raised to the consumer below
            items.put_nowait((index, error))
        items.put_nowait((index, None))

    tasks = [asyncio.ensure_future(pump(index, stream)) for index, stream in enumerate(streams)]
    coalesce = all(stream.stream.coalesce for stream in streams)
    try:
        remaining = len(streams)
        while remaining:
            waiting = [await items.get()]
            while coalesce and not items.empty():
                waiting.append(items.get_nowait())
            for index, item in _per_choice(waiting) if coalesce else waiting:
                if item is None:
                    remaining -= 1
                elif isinstance(item, Exception):
                    raise item
                else:
                    yield index, item
    finally:
        for task in tasks:
            task.cancel()


def _per_choice(waiting: list[tuple[int, object]]) -> list[tuple[int, object]]:
    """Each choice's consecutive outputs merged into its first; nothing merges across an error or a stream's end."""
    result: list[tuple[int, object]] = []
    latest: dict[int, int] = {}  # choice → where its output that may still take more sits in result
    for index, item in waiting:
        at = latest.get(index)
        if isinstance(item, RequestOutput) and at is not None:
            result[at] = (index, merged(result[at][1], item))
            continue
        if isinstance(item, RequestOutput) and not item.finished:
            latest[index] = len(result)
        elif isinstance(item, Exception):
            latest.clear()
        else:
            latest.pop(index, None)
        result.append((index, item))
    return result
