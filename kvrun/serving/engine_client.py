"""The async bridge: the engine steps in one dedicated thread; the event loop talks to it through a command queue.

The engine is not thread-safe, so every touch of it (adding, aborting, publishing an adapter, taking a snapshot)
is a command run on the engine thread between steps. Outputs go back to one asyncio queue per request through
`call_soon_threadsafe`, one hop per step for all requests. Slow work (registry fetches, parsing adapters) happens
elsewhere before a command is sent, so the engine thread never waits on I/O.

Failure is per request: a row the engine finishes with finish_reason "error" reaches its own stream like any
other final output, and the requests beside it go on. Only an engine that can no longer step (a step raised) fails
every stream; the thread then stops, /health reports it, and an orchestrator restarts the process.

The queue timeout bounds time spent waiting to be scheduled (e.g. for an adapter slot every running request
pins), never the work itself: it is checked on the engine thread, which knows which requests have started.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from functools import partial
from typing import TypeVar

from kvrun.adapters.peft_format import ParsedAdapter
from kvrun.engine.engine import LLMEngine
from kvrun.engine.request import RequestOutput
from kvrun.engine.sampling_params import SamplingParams
from kvrun.serving.snapshot import EngineSnapshot, take_snapshot

logger = logging.getLogger(__name__)

Result = TypeVar("Result")
IDLE_WAIT_S = 0.25  # how long the idle engine thread sleeps on the command queue before checking for shutdown
EXPIRY_CHECK_S = 0.1  # how often the engine thread looks for requests that waited too long to be scheduled


class QueueFullError(Exception):
    """More requests are in flight than the running batch plus the queue allow."""


class QueueTimeoutError(Exception):
    """A request waited longer than the queue timeout to be scheduled (e.g. every adapter slot stayed pinned)."""


class NeverFitsError(ValueError):
    """A call needs more requests in flight at once than this server ever allows; waiting cannot help."""


class EngineStoppedError(Exception):
    pass


@dataclass(frozen=True, slots=True)
class AdapterPublication:
    """An adapter version parsed off the engine thread, to be published under its name before a request uses it."""

    parsed: ParsedAdapter
    source: Callable[[], ParsedAdapter]  # re-parses it if the host cache dropped it; runs on the engine thread
    evictable: bool = True  # registry versions may be unloaded when unused; path-loaded adapters stay


@dataclass(frozen=True, slots=True)
class EngineRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    adapter: str | None = None  # engine-side adapter name, None = base model
    label: str | None = None  # the adapter name as the client wrote it (metrics, routing info)
    publication: AdapterPublication | None = None  # publish first when the engine lacks `adapter`


class EngineClient:
    def __init__(self, engine: LLMEngine, *, max_active: int, queue_timeout_s: float, max_adapters: int) -> None:
        self.engine = engine
        self.max_active = max_active
        self.queue_timeout_s = queue_timeout_s
        self.max_adapters = max_adapters
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._active = 0  # requests between admission and their last output; event-loop side only
        # engine-thread state
        self._streams: dict[str, asyncio.Queue] = {}
        self._labels: dict[str, str | None] = {}
        self._deadlines: dict[str, float] = {}  # requests not yet scheduled → when they stop waiting (monotonic)
        self._next_expiry_check = 0.0
        self._evictable: OrderedDict[str, None] = OrderedDict()  # registry versions, least recently used first
        # Replaced (never mutated) by the engine thread, so the event loop may read it without a lock.
        self.adapter_names: frozenset[str] = frozenset()
        self.last_error: str | None = None

    # -- lifecycle -------------------------------------------------------------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="kvrun-engine", daemon=True)
        self._thread.start()

    def _stopped_reason(self) -> str:
        if self.last_error is not None:
            return f"the engine stopped after an error ({self.last_error}); the server must be restarted"
        return "the engine is not running"

    async def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 30)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping.is_set()

    @property
    def num_active(self) -> int:
        return self._active

    # -- calls from the event loop ----------------------------------------------------------------------------------
    async def call(self, function: Callable[[LLMEngine], Result]) -> Result:
        """Run function(engine) on the engine thread between steps and return its result."""
        if not self.alive:
            raise EngineStoppedError(self._stopped_reason())
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._commands.put((function, future))
        if not self.alive:  # the thread stopped meanwhile: nobody will run it
            self._drain_commands()
        return await asyncio.wrap_future(future)

    def check_fits(self, count: int) -> None:
        """Refuse a call of `count` requests that could never all be in flight at once (503 would repeat forever)."""
        if count > self.max_active:
            raise NeverFitsError(
                f"this call asks for {count} generations at once, but this server allows at most {self.max_active} "
                f"requests in flight (--max-num-seqs + --max-queue); ask for fewer (n, or prompts per call)"
            )

    def abort_soon(self, request_id: str) -> None:
        """Abort without waiting (safe from `finally` blocks of cancelled tasks)."""
        self._commands.put((partial(self._abort, request_id), None))

    async def snapshot(self) -> EngineSnapshot:
        return await self.call(lambda engine: take_snapshot(engine, self._labels))

    async def publish(self, name: str, publication: AdapterPublication) -> None:
        await self.call(lambda engine: self._publish(engine, name, publication))

    async def remove_adapter(self, name: str) -> bool:
        return await self.call(lambda engine: self._remove(engine, name))

    async def submit(self, request: EngineRequest) -> RequestStream:
        """Queue a request; errors of admission (bad input, unknown adapter, full queue) raise here, before any
        response byte is sent. Iterate the stream for outputs; close it to abort."""
        if self._active >= self.max_active:
            raise QueueFullError(f"{self._active} requests are in flight (the limit is {self.max_active})")
        stream = RequestStream(self, request.request_id)
        self._active += 1
        try:
            await self.call(partial(self._add, request, stream.outputs))
        except BaseException:
            stream.close()
            raise
        return stream

    def _closed(self, request_id: str, finished: bool) -> None:
        self._active -= 1
        if not finished:
            # Client gone, timed out or cancelled: free its KV blocks and slot pin now.
            self.abort_soon(request_id)

    # -- the engine thread -----------------------------------------------------------------------------------------
    def _run(self) -> None:
        engine = self.engine
        if engine.adapters is not None:
            self.adapter_names = frozenset(engine.adapters.names())
        reason: BaseException = EngineStoppedError("the server is shutting down")
        while not self._stopping.is_set():
            self._run_commands(block=not engine.has_unfinished())
            self._expire_waiting(engine)
            if not engine.has_unfinished():
                continue
            try:
                outputs = engine.step()
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
                    function(self.engine)
                except Exception:  # noqa: BLE001 - fire-and-forget (an abort); the thread must go on
                    logger.exception("engine command failed")
            elif future.set_running_or_notify_cancel():
                try:
                    future.set_result(function(self.engine))
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
            self._deadlines.pop(output.request_id, None)
            stream = self._streams.get(output.request_id)
            if stream is None:
                continue
            batch.append((stream, output))
            if output.finished:
                del self._streams[output.request_id]
                self._labels.pop(output.request_id, None)
        if batch:
            self._loop.call_soon_threadsafe(_put_all, batch)

    def _expire_waiting(self, engine: LLMEngine) -> None:
        """Abort requests that waited longer than the queue timeout without being scheduled."""
        now = time.monotonic()
        if not self._deadlines or now < self._next_expiry_check:
            return
        self._next_expiry_check = now + EXPIRY_CHECK_S
        started = {request.request_id for request in engine.scheduler.running}
        for request_id, deadline in list(self._deadlines.items()):
            if request_id in started:
                del self._deadlines[request_id]  # scheduled: from here on it is work, not waiting
            elif deadline <= now:
                del self._deadlines[request_id]
                stream = self._streams.pop(request_id, None)
                self._labels.pop(request_id, None)
                engine.abort_request(request_id)
                if stream is not None:
                    error = QueueTimeoutError(
                        f"waited {self.queue_timeout_s:g}s without being scheduled; the server is busy"
                    )
                    self._loop.call_soon_threadsafe(_put_all, [(stream, error)])

    def _fail_all(self, error: BaseException) -> None:
        for request_id in list(self._streams):
            try:
                self.engine.abort_request(request_id)
            except Exception:  # noqa: BLE001 - the engine may be what broke; the streams must still end
                logger.exception("abort of %s failed", request_id)
        batch = [(stream, error) for stream in self._streams.values()]
        self._streams.clear()
        self._labels.clear()
        self._deadlines.clear()
        if batch and self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(_put_all, batch)

    def _add(self, request: EngineRequest, stream: asyncio.Queue, engine: LLMEngine) -> None:
        if request.adapter is not None:
            if request.publication is not None and request.adapter not in self.adapter_names:
                self._publish(engine, request.adapter, request.publication)
            if request.adapter in self._evictable:
                self._evictable.move_to_end(request.adapter)
        engine.add_request(request.prompt_token_ids, request.params, request.adapter, request.request_id)
        self._streams[request.request_id] = stream
        self._labels[request.request_id] = request.label
        self._deadlines[request.request_id] = time.monotonic() + self.queue_timeout_s

    def _abort(self, request_id: str, engine: LLMEngine) -> None:
        output = engine.abort_request(request_id)
        if output is not None and request_id in self._streams:
            self._deliver([output])  # a consumer still waiting (e.g. a queue timeout) sees finish_reason "abort"
        self._streams.pop(request_id, None)
        self._labels.pop(request_id, None)
        self._deadlines.pop(request_id, None)

    def _publish(self, engine: LLMEngine, name: str, publication: AdapterPublication) -> None:
        if engine.adapters is None:
            raise ValueError("LoRA is disabled on this server (--max-loras 0)")
        engine.adapters.add(publication.parsed, publication.source)
        if publication.evictable:
            self._evictable[name] = None
            self._evictable.move_to_end(name)
        else:
            self._evictable.pop(name, None)
        self._trim(engine, keep=name)
        self.adapter_names = frozenset(engine.adapters.names())

    def _remove(self, engine: LLMEngine, name: str) -> bool:
        if engine.adapters is None or name not in engine.adapters.names():
            return False
        engine.adapters.remove(name)  # requests already holding it finish on it; new ones cannot start
        self._evictable.pop(name, None)
        self.adapter_names = frozenset(engine.adapters.names())
        return True

    def _trim(self, engine: LLMEngine, keep: str) -> None:
        """Keep at most max_adapters names: unload the least recently used registry versions nobody uses."""
        manager = engine.adapters
        excess = len(manager.names()) - self.max_adapters
        for name in list(self._evictable):
            if excess <= 0:
                break
            ref = manager.names().get(name)
            if name == keep or ref is None or manager.holds(ref) or manager.slots.pins(ref):
                continue
            manager.remove(name)
            del self._evictable[name]
            excess -= 1
            logger.info("unloaded %s (least recently used; over --max-cpu-loras)", name)


class RequestStream:
    """One request's outputs, in order; `close()` (always call it) aborts the request if it has not finished."""

    def __init__(self, client: EngineClient, request_id: str) -> None:
        self.client = client
        self.request_id = request_id
        self.outputs: asyncio.Queue = asyncio.Queue()
        self.finished = False
        self._closed = False

    def __aiter__(self) -> AsyncIterator[RequestOutput]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[RequestOutput]:
        while not self.finished:
            output = await self.outputs.get()  # the engine thread bounds the wait to be scheduled
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


def _put_all(batch: list[tuple[asyncio.Queue, object]]) -> None:
    for stream, item in batch:
        stream.put_nowait(item)
