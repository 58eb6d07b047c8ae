"""The async bridge between the event loop and the engine, which steps in a thread or in its own process.

`EngineClient` is what the server sees: submit a request and iterate its stream, abort, publish or remove an
adapter, take a snapshot. Two implementations share it:

- `ThreadEngineClient` (this file): the engine steps in one dedicated thread of the server's process; every touch of
  it is a command run on that thread between steps, and outputs reach each request's asyncio queue through
  `call_soon_threadsafe`, one hop per step for all requests.
- `ProcessEngineClient` (process_client.py): the engine steps in its own process (kvrun.engine.core_process), so
  the GIL of the HTTP side (tokenizing, SSE, JSON) never stalls a step, and the reverse.

Slow work (registry fetches, parsing adapters) happens elsewhere before a command is sent, so the engine never
waits on I/O. Failure is per request: a row the engine finishes with finish_reason "error" reaches its own stream
like any other final output, and the requests beside it go on. Only an engine that can no longer step (a step
raised, its process died) fails every stream; it then stops, /health reports it, and an orchestrator restarts the
server. The queue timeout bounds time spent waiting to be scheduled (e.g. for an adapter slot every running request
pins), never the work itself: the engine side checks it, since it knows which requests have started.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from functools import partial
from typing import TypeVar

from kvrun.engine.core import AdapterPublication, EngineCore, EngineInfo, EngineRequest
from kvrun.engine.engine import LLMEngine
from kvrun.engine.request import RequestOutput
from kvrun.serving.snapshot import EngineSnapshot, for_clients

logger = logging.getLogger(__name__)

__all__ = ["AdapterPublication", "EngineClient", "EngineRequest", "RequestStream", "ThreadEngineClient"]

Result = TypeVar("Result")
IDLE_WAIT_S = 0.25  # how long the idle engine thread sleeps on the command queue before checking for shutdown


class QueueFullError(Exception):
    """More requests are in flight than the running batch plus the queue allow."""


class QueueTimeoutError(Exception):
    """A request waited longer than the queue timeout to be scheduled (e.g. every adapter slot stayed pinned)."""


class NeverFitsError(ValueError):
    """A call needs more requests in flight at once than this server ever allows; waiting cannot help."""


class EngineStoppedError(Exception):
    pass


def queue_timeout_error(queue_timeout_s: float) -> QueueTimeoutError:
    return QueueTimeoutError(f"waited {queue_timeout_s:g}s without being scheduled; the server is busy")


class EngineClient:
    """The event loop's side, common to both ways of running the engine. Subclasses provide the transport:
    start/stop/alive, `_send_add` (admit a request, its outputs to `stream`), `abort_soon`, and `_request`
    (snapshot, publish, remove)."""

    def __init__(self, info: EngineInfo, *, max_active: int, queue_timeout_s: float, max_adapters: int) -> None:
        self.info = info
        self.max_active = max_active
        self.queue_timeout_s = queue_timeout_s
        self.max_adapters = max_adapters
        self._active = 0  # requests between admission and their last output; event-loop side only
        # Replaced (never mutated) when the engine's adapters change, so the event loop may read it without a lock.
        self.adapter_names: frozenset[str] = frozenset()
        self.last_error: str | None = None

    def _stopped_reason(self) -> str:
        if self.last_error is not None:
            return f"the engine stopped after an error ({self.last_error}); the server must be restarted"
        return "the engine is not running"

    @property
    def num_active(self) -> int:
        return self._active

    def check_fits(self, count: int) -> None:
        """Refuse a call of `count` requests that could never all be in flight at once (503 would repeat forever)."""
        if count > self.max_active:
            raise NeverFitsError(
                f"this call asks for {count} generations at once, but this server allows at most {self.max_active} "
                f"requests in flight (--max-num-seqs + --max-queue); ask for fewer (n, or prompts per call)"
            )

    async def submit(self, request: EngineRequest) -> RequestStream:
        """Queue a request; errors of admission (bad input, unknown adapter, full queue) raise here, before any
        response byte is sent. Iterate the stream for outputs; close it to abort."""
        if self._active >= self.max_active:
            raise QueueFullError(f"{self._active} requests are in flight (the limit is {self.max_active})")
        stream = RequestStream(self, request.request_id)
        self._active += 1
        try:
            await self._send_add(request, stream.outputs)
        except BaseException:
            stream.close()
            raise
        return stream

    def _closed(self, request_id: str, finished: bool) -> None:
        self._active -= 1
        if not finished:
            # Client gone, timed out or cancelled: free its KV blocks and slot pin now.
            self.abort_soon(request_id)

    async def snapshot(self) -> EngineSnapshot:
        return for_clients(await self._request("snapshot"))

    async def publish(self, name: str, publication: AdapterPublication) -> None:
        await self._request("publish", name, publication)

    async def remove_adapter(self, name: str) -> bool:
        return await self._request("remove", name)

    # -- the transport ---------------------------------------------------------------------------------------------
    async def start(self) -> None:
        raise NotImplementedError

    async def stop(self) -> None:
        raise NotImplementedError

    @property
    def alive(self) -> bool:
        raise NotImplementedError

    def abort_soon(self, request_id: str) -> None:
        """Abort without waiting (safe from `finally` blocks of cancelled tasks)."""
        raise NotImplementedError

    async def _send_add(self, request: EngineRequest, stream: asyncio.Queue) -> None:
        raise NotImplementedError

    async def _request(self, what: str, *args):
        raise NotImplementedError


class ThreadEngineClient(EngineClient):
    """The engine in a dedicated thread of this process (the engine object stays reachable, e.g. for tests)."""

    def __init__(self, engine: LLMEngine, *, max_active: int, queue_timeout_s: float, max_adapters: int) -> None:
        super().__init__(EngineInfo.of(engine), max_active=max_active, queue_timeout_s=queue_timeout_s,
                         max_adapters=max_adapters)  # fmt: skip
        self.engine = engine
        self.core = EngineCore(engine, queue_timeout_s=queue_timeout_s, max_adapters=max_adapters)
        self.adapter_names = self.core.adapter_names
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._streams: dict[str, asyncio.Queue] = {}  # engine-thread state: live requests → their queues

    # -- lifecycle -------------------------------------------------------------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="kvrun-engine", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 30)
        self.engine.shutdown()  # tensor-parallel workers stop with the server

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping.is_set()

    # -- calls from the event loop ----------------------------------------------------------------------------------
    async def call(self, function: Callable[[EngineCore], Result]) -> Result:
        """Run function(core) on the engine thread between steps and return its result."""
        if not self.alive:
            raise EngineStoppedError(self._stopped_reason())
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._commands.put((function, future))
        if not self.alive:  # the thread stopped meanwhile: nobody will run it
            self._drain_commands()
        return await asyncio.wrap_future(future)

    def abort_soon(self, request_id: str) -> None:
        self._commands.put((partial(self._abort, request_id), None))

    async def _send_add(self, request: EngineRequest, stream: asyncio.Queue) -> None:
        await self.call(partial(self._add, request, stream))

    async def _request(self, what: str, *args):
        if what == "snapshot":
            return await self.call(lambda core: core.snapshot())
        if what == "publish":
            return await self.call(lambda core: self._changed(core.publish(*args), core))
        return await self.call(lambda core: self._changed(core.remove(*args), core))

    def _changed(self, result: Result, core: EngineCore) -> Result:
        self.adapter_names = core.adapter_names
        return result

    # -- the engine thread -----------------------------------------------------------------------------------------
    def _run(self) -> None:
        core = self.core
        reason: BaseException = EngineStoppedError("the server is shutting down")
        while not self._stopping.is_set():
            self._run_commands(block=not core.has_unfinished())
            expired = core.expire_waiting()
            if expired:
                error = queue_timeout_error(self.queue_timeout_s)
                streams = [self._streams.pop(request_id, None) for request_id in expired]
                self._post([(stream, error) for stream in streams if stream is not None])
            if not core.has_unfinished():
                continue
            try:
                outputs = core.step()
            except Exception as error:  # noqa: BLE001 - reported below; a row's own failure never raises here
                # The engine finishes a row it cannot sample with an error; a step that raises means the engine
                # itself is broken (device lost, state inconsistent): stop, so /health fails and it is restarted.
                logger.exception("engine step failed; the engine is stopped")
                self.last_error = f"{type(error).__name__}: {error}"
                reason = EngineStoppedError(self._stopped_reason())
                break
            self._deliver(outputs)
        self._stopping.set()
        self._fail_all(reason)
        self._drain_commands()

    def _run_commands(self, block: bool) -> None:
        try:
            command = self._commands.get(timeout=IDLE_WAIT_S) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            function, future = command
            if future is None:
                try:
                    function(self.core)
                except Exception:  # noqa: BLE001 - fire-and-forget (an abort); the thread must go on
                    logger.exception("engine command failed")
            elif future.set_running_or_notify_cancel():
                try:
                    future.set_result(function(self.core))
                except BaseException as error:  # noqa: BLE001 - handed to the awaiting coroutine
                    future.set_exception(error)
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return

    def _drain_commands(self) -> None:
        """Fail commands no engine thread will run (it stopped), so their callers do not wait forever."""
        while True:
            try:
                _, future = self._commands.get_nowait()
            except queue.Empty:
                return
            if future is not None and future.set_running_or_notify_cancel():
                future.set_exception(EngineStoppedError(self._stopped_reason()))

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        """Each output to its own stream; a row finished with an error ends its request alone."""
        batch = []
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is None:
                continue
            batch.append((stream, output))
            if output.finished:
                del self._streams[output.request_id]
        self._post(batch)

    def _post(self, batch: list[tuple[asyncio.Queue, object]]) -> None:
        if batch and self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(_put_all, batch)

    def _fail_all(self, error: BaseException) -> None:
        self.core.abort_all()
        batch = [(stream, error) for stream in self._streams.values()]
        self._streams.clear()
        self._post(batch)

    def _add(self, request: EngineRequest, stream: asyncio.Queue, core: EngineCore) -> None:
        try:
            core.add(request)
        finally:
            self.adapter_names = core.adapter_names  # a publication may have happened before a refusal
        self._streams[request.request_id] = stream

    def _abort(self, request_id: str, core: EngineCore) -> None:
        output = core.abort(request_id)
        stream = self._streams.pop(request_id, None)
        if output is not None and stream is not None:
            self._post([(stream, output)])  # a consumer still waiting (e.g. a queue timeout) sees "abort"


class RequestStream:
    """One request's outputs, in order; `close()` (always call it) aborts the request if it has not finished.

    coalesce: when several outputs wait because the consumer fell behind (a busy event loop, a slow client), hand
    them out as one, with the new token ids and text of all of them (vLLM's RequestOutputCollector). For consumers
    that may send several tokens in one event (OpenAI's deltas) or need only the last output; a consumer that keeps
    up sees every output as the engine made it. An output that ends the request with an error is never merged into
    (the outputs before it still reach the client as they would have).
    """

    def __init__(self, client: EngineClient, request_id: str) -> None:
        self.client = client
        self.request_id = request_id
        self.coalesce = False
        self.outputs: asyncio.Queue = asyncio.Queue()
        self.finished = False
        self._closed = False

    def __aiter__(self) -> AsyncIterator[RequestOutput]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[RequestOutput]:
        pending = None  # taken off the queue while coalescing, not merged: handed out next
        while not self.finished:
            # The engine side bounds the wait to be scheduled.
            output = pending if pending is not None else await self.outputs.get()
            pending = None
            while self.coalesce and isinstance(output, RequestOutput) and not output.finished and self.outputs.qsize():
                following = self.outputs.get_nowait()
                if isinstance(following, BaseException) or following.finish_reason == "error":
                    pending = following
                    break
                output = merged(output, following)
            if isinstance(output, BaseException):
                self.finished = True
                raise output
            self.finished = output.finished
            yield output

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.client._closed(self.request_id, self.finished)

    def __del__(self) -> None:
        # Backstop for a response body that was never iterated (client gone before streaming began).
        self.close()


def merged(first: RequestOutput, then: RequestOutput) -> RequestOutput:
    """Two consecutive outputs of one request as one: the state after `then`, with what both added."""
    return replace(
        then, new_token_ids=first.new_token_ids + then.new_token_ids, new_text=first.new_text + then.new_text,
        queue_time=first.queue_time if first.queue_time is not None else then.queue_time,
    )  # fmt: skip


def _put_all(batch: list[tuple[asyncio.Queue, object]]) -> None:
    for stream, item in batch:
        stream.put_nowait(item)
