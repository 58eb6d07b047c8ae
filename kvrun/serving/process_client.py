"""ProcessEngineClient: the server's side of an engine core that steps in its own process.

The core's socket is an asyncio connection of the event loop: messages out are buffered writes (never blocking
the loop), messages in are decoded as they arrive and each step's deltas become RequestOutputs on their streams.
The core sends token ids, not text: each stream detokenizes here, with the same incremental detokenizer and the
same stop-string rules (kvrun.engine.stop) the engine uses when it makes the text itself, so the text matches.
Calls (admission, publish, remove, snapshot) wait for the core's reply, which comes between two steps.

When the core dies (killed, out of memory, a step raised), every stream ends with an error that says so, every
call fails at once, /health turns 503 with the reason, and new requests get 503: nothing waits on a dead core.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading

import msgspec

from kvrun.engine.core import EngineRequest
from kvrun.engine.detokenizer import IncrementalDetokenizer
from kvrun.engine.core_process import (
    Abort,
    Add,
    CoreProcess,
    Delta,
    Expired,
    FrameBuffer,
    FromCore,
    Outputs,
    Publish,
    PublicationSpec,
    Remove,
    Reply,
    Shutdown,
    Snapshot,
    Stopped,
    encode,
    raise_failure,
)
from kvrun.engine.request import RequestOutput
from kvrun.engine.snapshot import EngineSnapshot
from kvrun.engine.stop import find_stop, text_delta
from kvrun.serving.engine_client import EngineClient, EngineStoppedError, queue_timeout_error

logger = logging.getLogger(__name__)


class _Stream:
    """What the server keeps of a live request to turn deltas back into whole RequestOutputs, its text included."""

    __slots__ = ("queue", "prompt_token_ids", "adapter", "stops", "detokenizer", "token_ids", "text", "logprobs")

    def __init__(self, queue: asyncio.Queue, request: EngineRequest, tokenizer) -> None:
        self.queue = queue
        self.prompt_token_ids = request.prompt_token_ids
        self.adapter = request.adapter
        self.stops = request.params.stop
        self.detokenizer = None
        if tokenizer is not None:
            self.detokenizer = IncrementalDetokenizer(tokenizer, request.params.skip_special_tokens)
        self.token_ids: list[int] = []
        self.text = ""  # the whole text so far, a tail that may become a stop string included
        self.logprobs: list[dict[int, float]] | None = [] if request.params.logprobs is not None else None

    def output(self, delta: Delta) -> RequestOutput:
        """The step's output, as an engine that detokenizes makes it (LLMEngine._append and _output). A text that
        cannot be made ends this request alone with an error and what it had before, as the engine ends such a row
        (the caller then aborts it in the core)."""
        previous_text, num_tokens = self.text, len(self.token_ids)
        new_token_ids, finished, finish_reason, stop_reason, error = (
            delta.new_token_ids, delta.finished, delta.finish_reason, delta.stop_reason, delta.error
        )  # fmt: skip
        try:
            self._advance(delta, previous_text)
        except Exception as failure:  # noqa: BLE001 - this request ends; every other stream goes on
            logger.exception("request %s failed", delta.request_id)
            del self.token_ids[num_tokens:]
            if self.logprobs is not None:
                del self.logprobs[num_tokens:]
            self.text = previous_text
            new_token_ids, finished, finish_reason, stop_reason = [], True, "error", None
            error = f"{type(failure).__name__}: {failure}"
        text, new_text = text_delta(self.stops, previous_text, self.text, finished)
        return RequestOutput(
            request_id=delta.request_id, prompt_token_ids=self.prompt_token_ids, token_ids=list(self.token_ids),
            text=text, new_token_ids=new_token_ids, new_text=new_text, finished=finished, finish_reason=finish_reason,
            stop_reason=stop_reason, adapter=self.adapter,
            logprobs=None if self.logprobs is None else list(self.logprobs), error=error, queue_time=delta.queue_time,
        )  # fmt: skip

    def _advance(self, delta: Delta, previous_text: str) -> None:
        if delta.new_token_ids:
            self.token_ids += delta.new_token_ids
            if self.detokenizer is not None:
                self.text += self.detokenizer.step(self.token_ids)
        if delta.finished:
            self.token_ids = delta.token_ids or []
            if self.logprobs is not None:
                self.logprobs = delta.logprobs or []
            if isinstance(delta.stop_reason, str):  # the core found it in this step's text: cut where it did
                found = find_stop(self.text, self.stops, len(previous_text))
                if found is not None:
                    self.text = self.text[: found[0]]
        elif self.logprobs is not None and delta.new_logprobs:
            self.logprobs += delta.new_logprobs


class ProcessEngineClient(EngineClient):
    def __init__(self, process: CoreProcess, tokenizer, *, max_active: int, queue_timeout_s: float,
                 max_adapters: int) -> None:  # fmt: skip
        """tokenizer: the server's own instance of the model's tokenizer (None: the model has none, outputs carry
        token ids only, as the engine's do then)."""
        super().__init__(process.info, max_active=max_active, queue_timeout_s=queue_timeout_s,
                         max_adapters=max_adapters)  # fmt: skip
        self.process = process
        self.tokenizer = tokenizer
        self.adapter_names = frozenset(process.adapter_names)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._transport: asyncio.Transport | None = None
        self._frames = FrameBuffer(FromCore)
        self._streams: dict[str, _Stream] = {}
        self._calls: dict[int, asyncio.Future] = {}
        self._call_ids = itertools.count()
        self._stopped = False

    @property
    def pid(self) -> int | None:
        return self.process.process.pid

    # -- lifecycle -------------------------------------------------------------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._transport, _ = await self._loop.create_unix_connection(lambda: _CoreProtocol(self),
                                                                      sock=self.process.sock)  # fmt: skip

    async def stop(self) -> None:
        if not self._stopped:
            self._write(Shutdown())
            self._end(EngineStoppedError("the server is shutting down"))
        # Shutdown went through our connection (after anything it still buffers); never interleave a second writer.
        await asyncio.to_thread(self.process.close, False)
        if self._transport is not None:
            self._transport.close()

    @property
    def alive(self) -> bool:
        return not self._stopped and self._transport is not None

    # -- calls -----------------------------------------------------------------------------------------------------
    def abort_soon(self, request_id: str) -> None:
        if threading.get_ident() == self._loop_thread:
            self._abort(request_id)
        elif self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._abort, request_id)

    def _abort(self, request_id: str) -> None:
        self._streams.pop(request_id, None)
        if not self._stopped:
            self._write(Abort(request_id))

    async def _send_add(self, request: EngineRequest, stream: asyncio.Queue) -> None:
        publication = None
        if request.publication is not None:
            publication = self._spec(request.adapter, request.publication)
        self._streams[request.request_id] = _Stream(stream, request, self.tokenizer)
        try:
            await self._call(lambda call_id: Add(call_id, request.request_id, request.prompt_token_ids,
                                                 request.params, request.adapter, request.label, publication))
        except BaseException:
            self._streams.pop(request.request_id, None)
            raise

    async def _request(self, what: str, *args):
        if what == "snapshot":
            value = await self._call(Snapshot)
            return msgspec.convert(value, EngineSnapshot)
        if what == "publish":
            name, publication = args
            return await self._call(lambda call_id: Publish(call_id, self._spec(name, publication)))
        return await self._call(lambda call_id: Remove(call_id, args[0]))

    @staticmethod
    def _spec(name: str, publication) -> PublicationSpec:
        if publication.directory is None:
            raise ValueError(f"adapter {name!r} has no local directory to load it from in the engine core")
        return PublicationSpec(name, publication.directory, publication.parsed.ref.version, publication.evictable)

    async def _call(self, message_for):
        if not self.alive:
            raise EngineStoppedError(self._stopped_reason())
        call_id = next(self._call_ids)
        data = encode(message_for(call_id))  # first: a message that cannot be encoded leaves no call behind
        future = self._loop.create_future()
        self._calls[call_id] = future
        self._send(data)
        try:
            return await future
        finally:  # also when the caller gave up waiting (a probe's timeout): its reply, if any, is then dropped
            self._calls.pop(call_id, None)

    def _write(self, message) -> None:
        self._send(encode(message))

    def _send(self, data: bytes) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)

    # -- messages from the core -------------------------------------------------------------------------------------
    def _received(self, data: bytes) -> None:
        for message in self._frames.feed(data):
            if isinstance(message, Outputs):
                self._deliver(message.deltas)
            elif isinstance(message, Reply):
                self._reply(message)
            elif isinstance(message, Expired):
                error = queue_timeout_error(self.queue_timeout_s)
                for request_id in message.request_ids:
                    stream = self._streams.pop(request_id, None)
                    if stream is not None:
                        stream.queue.put_nowait(error)
            elif isinstance(message, Stopped):
                logger.error("the engine core stopped after an error: %s", message.error)
                self.last_error = message.error

    def _deliver(self, deltas: list[Delta]) -> None:
        for delta in deltas:
            stream = self._streams.get(delta.request_id)
            if stream is None:
                continue
            output = stream.output(delta)
            if output.finished:
                del self._streams[delta.request_id]
                if not delta.finished:  # its text failed here: the core must stop generating it
                    self._write(Abort(delta.request_id))
            stream.queue.put_nowait(output)

    def _reply(self, reply: Reply) -> None:
        if reply.adapter_names is not None:
            self.adapter_names = frozenset(reply.adapter_names)
        future = self._calls.pop(reply.call_id, None)
        if future is None or future.done():
            return
        if reply.failure is None:
            future.set_result(reply.value)
        else:
            try:
                raise_failure(reply.failure)
            except Exception as error:  # noqa: BLE001 - handed to the awaiting coroutine
                future.set_exception(error)

    def _lost(self) -> None:
        """The core's socket closed: it exited (or was killed). Say why, end everything that waits on it."""
        if self._stopped:
            return
        process = self.process.process
        process.join(1.0)
        if self.last_error is None:
            code = process.exitcode
            how = f"was killed by signal {-code}" if code is not None and code < 0 else f"exited (code {code})"
            self.last_error = f"the engine core process (pid {process.pid}) {how}"
            logger.error("%s; the server must be restarted", self.last_error)
        self._end(EngineStoppedError(self._stopped_reason()))

    def _end(self, error: BaseException) -> None:
        self._stopped = True
        for stream in self._streams.values():
            stream.queue.put_nowait(error)
        self._streams.clear()
        for future in self._calls.values():
            if not future.done():
                future.set_exception(error)
        self._calls.clear()


class _CoreProtocol(asyncio.Protocol):
    def __init__(self, client: ProcessEngineClient) -> None:
        self.client = client

    def data_received(self, data: bytes) -> None:
        self.client._received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.client._lost()
