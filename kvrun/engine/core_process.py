"""The engine core in its own process: it loads the model, steps, and talks to the server over one socket.

The server's process tokenizes, resolves adapters, fetches them and streams; this process only steps, so neither
side's GIL stalls the other. Messages are msgspec structs encoded as MessagePack, each framed by a 4-byte length;
the server decodes them against their types (nothing it receives is unpickled), torch dtypes travelling by name.

    server → core   Add (a request, with the adapter version to publish first, if any), Abort, Publish, Remove,
                    Snapshot, Shutdown
    core → server   Ready (once: EngineInfo, or StartFailed), Reply (to Add / Publish / Remove / Snapshot),
                    Outputs (one per step: each row's delta), Expired (queue timeouts), Stopped (a step raised)

Outputs carry deltas (this step's token ids and logprobs; the whole token ids only when a request finishes), so a
message's size does not grow with the length of the generations. They carry no text: the server detokenizes each
stream itself (kvrun.serving.process_client), so the core's steps spend no time on text. Only a request with stop
strings is detokenized here as well, because the core must stop it where a stop string appears; its delta then says
which stop string ended it, and the server cuts its own text at the same place. Adapters travel as a directory
on local disk (a registry version's local copy, or the path it was loaded from), parsed here again.

The core stops when the server says so, when its socket closes (the server died: no orphan keeps the GPU), or
after a step raised (it says why first). SIGINT is ignored: a terminal's Ctrl-C reaches the whole process group,
and the server shuts the core down in order.
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing
import os
import select
import signal
import socket
import struct
import threading
import time
from typing import Any

import msgspec
import torch

from kvrun.adapters.manager import UnknownAdapterError
from kvrun.adapters.peft_format import AdapterError
from kvrun.config import EngineConfig
from kvrun.engine.core import AdapterPublication, EngineCore, EngineInfo, EngineRequest
from kvrun.engine.request import RequestOutput
from kvrun.engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

IDLE_WAIT_S = 0.25  # how long an idle core waits for a message before looking again
_HEADER = struct.Struct("<I")


# -- messages ------------------------------------------------------------------------------------------------------
class PublicationSpec(msgspec.Struct, array_like=True):
    name: str
    directory: str
    version: int
    evictable: bool


class Add(msgspec.Struct, tag="add", array_like=True):
    call_id: int
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    adapter: str | None
    label: str | None
    publication: PublicationSpec | None


class Abort(msgspec.Struct, tag="abort", array_like=True):
    request_id: str


class Publish(msgspec.Struct, tag="publish", array_like=True):
    call_id: int
    publication: PublicationSpec


class Remove(msgspec.Struct, tag="remove", array_like=True):
    call_id: int
    name: str


class Snapshot(msgspec.Struct, tag="snapshot", array_like=True):
    call_id: int


class Shutdown(msgspec.Struct, tag="shutdown", array_like=True):
    pass


class Failure(msgspec.Struct, array_like=True):
    kind: str  # "unknown_adapter" | "adapter" | "value" | "other"
    message: str
    name: str | None = None


class Reply(msgspec.Struct, tag="reply", array_like=True):
    call_id: int
    value: Any = None
    failure: Failure | None = None
    adapter_names: list[str] | None = None  # the engine's adapter names, when the call changed them


class Delta(msgspec.Struct, array_like=True, omit_defaults=True):
    request_id: str
    new_token_ids: list[int]
    finished: bool = False
    finish_reason: str | None = None
    stop_reason: str | int | None = None  # a stop string here means the server cuts its text before it
    error: str | None = None
    new_logprobs: list[dict[int, float]] | None = None
    token_ids: list[int] | None = None  # the whole output, once finished
    logprobs: list[dict[int, float]] | None = None  # all of them, once finished
    queue_time: float | None = None  # with a request's first tokens only


class Outputs(msgspec.Struct, tag="outputs", array_like=True):
    deltas: list[Delta]


class Expired(msgspec.Struct, tag="expired", array_like=True):
    request_ids: list[str]


class Ready(msgspec.Struct, tag="ready", array_like=True):
    info: EngineInfo
    adapter_names: list[str]


class StartFailed(msgspec.Struct, tag="start_failed", array_like=True):
    message: str


class Stopped(msgspec.Struct, tag="stopped", array_like=True):
    error: str


ToCore = Add | Abort | Publish | Remove | Snapshot | Shutdown
FromCore = Reply | Outputs | Expired | Ready | StartFailed | Stopped


def _encode_dtype(obj: Any) -> Any:
    if isinstance(obj, torch.dtype):
        return str(obj).removeprefix("torch.")  # "bfloat16"
    raise NotImplementedError(f"{type(obj).__name__} has no MessagePack form")


def _decode_dtype(kind: type, obj: Any) -> Any:
    if kind is not torch.dtype:
        raise NotImplementedError(f"{kind} has no MessagePack form")
    dtype = getattr(torch, obj, None) if isinstance(obj, str) else None
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"{obj!r} is not a torch dtype")
    return dtype


_encoder = msgspec.msgpack.Encoder(enc_hook=_encode_dtype)


def encode(message: msgspec.Struct) -> bytes:
    payload = _encoder.encode(message)
    return _HEADER.pack(len(payload)) + payload


class FrameBuffer:
    """Bytes in, whole decoded messages out."""

    def __init__(self, message_type: Any) -> None:
        self._decoder = msgspec.msgpack.Decoder(message_type, dec_hook=_decode_dtype)
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list:
        self._buffer += data
        messages, offset = [], 0
        while len(self._buffer) - offset >= _HEADER.size:
            (size,) = _HEADER.unpack_from(self._buffer, offset)
            end = offset + _HEADER.size + size
            if len(self._buffer) < end:
                break
            messages.append(self._decoder.decode(memoryview(self._buffer)[offset + _HEADER.size : end]))
            offset = end
        del self._buffer[:offset]
        return messages


def failure_of(error: BaseException) -> Failure:
    if isinstance(error, UnknownAdapterError):
        return Failure("unknown_adapter", str(error), error.name)
    if isinstance(error, AdapterError):
        return Failure("adapter", str(error))
    if isinstance(error, ValueError):
        return Failure("value", str(error))
    return Failure("other", f"{type(error).__name__}: {error}")


def raise_failure(failure: Failure) -> None:
    if failure.kind == "unknown_adapter":
        raise UnknownAdapterError(failure.name or "")
    if failure.kind == "adapter":
        raise AdapterError(failure.message)
    if failure.kind == "value":
        raise ValueError(failure.message)
    raise RuntimeError(failure.message)


def delta_of(output: RequestOutput) -> Delta:
    new_logprobs = None
    if output.logprobs is not None and output.new_token_ids:
        new_logprobs = output.logprobs[-len(output.new_token_ids) :]
    first = bool(output.new_token_ids) and len(output.token_ids) == len(output.new_token_ids)
    queue_time = output.queue_time if first else None
    if not output.finished:
        return Delta(output.request_id, output.new_token_ids, new_logprobs=new_logprobs, queue_time=queue_time)
    return Delta(
        output.request_id, output.new_token_ids, True, output.finish_reason, output.stop_reason, output.error,
        new_logprobs, output.token_ids, output.logprobs, queue_time,
    )  # fmt: skip


# -- the core's side -----------------------------------------------------------------------------------------------
class _Channel:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.frames = FrameBuffer(ToCore)
        self.gone = False  # the server closed its end: nothing sent can reach anyone

    def send(self, message: msgspec.Struct) -> None:
        if self.gone:
            return
        try:
            self.sock.sendall(encode(message))  # blocks while the server is slow to read: backpressure, not loss
        except (BrokenPipeError, ConnectionResetError) as error:  # the server stopped since our last read
            logger.warning("the server closed the engine core's socket (%s)", error)
            self.gone = True

    def receive(self, timeout: float) -> list | None:
        """The messages that arrived (waiting up to timeout for the first); None once the server is gone."""
        readable, _, _ = select.select([self.sock], [], [], timeout)
        if not readable:
            return []
        messages = []
        while True:
            try:
                data = self.sock.recv(1 << 20, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return messages
            except OSError:
                return None
            if not data:
                return messages or None
            messages += self.frames.feed(data)


class _CoreServer:
    def __init__(self, core: EngineCore, channel: _Channel) -> None:
        self.core = core
        self.channel = channel
        self.stopping = False

    def run(self) -> None:
        core, channel = self.core, self.channel
        while not self.stopping:
            messages = channel.receive(0.0 if core.has_unfinished() else IDLE_WAIT_S)
            if messages is None:
                logger.warning("the server closed the engine core's socket; stopping")
                break
            for message in messages:
                if channel.gone:
                    break
                self.handle(message)
            expired = core.expire_waiting()
            if expired:
                channel.send(Expired(expired))
            if channel.gone:  # a write found the server gone: no step's outputs could reach anyone
                break
            if self.stopping or not core.has_unfinished():
                continue
            try:
                outputs = core.step()
            except Exception as error:  # noqa: BLE001 - a row's own failure never raises here
                logger.exception("engine step failed; the engine core stops")
                channel.send(Stopped(f"{type(error).__name__}: {error}"))
                break
            if outputs:
                channel.send(Outputs([delta_of(output) for output in outputs]))
        core.abort_all()

    def handle(self, message) -> None:
        if isinstance(message, Abort):
            output = self.core.abort(message.request_id)
            if output is not None:  # a consumer still waiting sees finish_reason "abort"
                self.channel.send(Outputs([delta_of(output)]))
        elif isinstance(message, Shutdown):
            self.stopping = True
        else:
            self.channel.send(self._answer(message))

    def _answer(self, message) -> Reply:
        core = self.core
        names = core.adapter_names
        try:
            if isinstance(message, Add):
                publication = None if message.publication is None else self._parse(message.publication)
                request = EngineRequest(message.request_id, message.prompt_token_ids, message.params,
                                        message.adapter, message.label, publication)  # fmt: skip
                value = core.add(request)
            elif isinstance(message, Publish):
                value = core.publish(message.publication.name, self._parse(message.publication))
            elif isinstance(message, Remove):
                value = core.remove(message.name)
            else:
                value = core.snapshot()
            failure = None
        except Exception as error:  # noqa: BLE001 - the caller gets it; the core goes on
            value, failure = None, failure_of(error)
        changed = sorted(core.adapter_names) if core.adapter_names != names else None
        return Reply(message.call_id, value, failure, changed)

    def _parse(self, spec: PublicationSpec) -> AdapterPublication:
        manager = self.core.engine.adapters
        if manager is None:
            raise ValueError("LoRA is disabled on this server (--max-loras 0)")
        started = time.perf_counter()
        parsed = manager.parse_path(spec.name, spec.directory, spec.version)
        logger.info("parsed %s in %.0f ms", spec.name, 1000 * (time.perf_counter() - started))
        source = lambda: manager.parse_path(spec.name, spec.directory, spec.version)  # noqa: E731
        return AdapterPublication(parsed, source, spec.evictable, spec.directory)


def run_core(config: EngineConfig, sock: socket.socket, queue_timeout_s: float, max_adapters: int,
             log_level: int) -> None:  # fmt: skip
    """The core process's main."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("kvrun").setLevel(log_level)
    channel = _Channel(sock)
    loaded = threading.Event()
    threading.Thread(target=_exit_if_server_goes, args=(sock, loaded), name="kvrun-core-watch", daemon=True).start()
    try:
        from kvrun.engine.engine import LLMEngine

        engine = LLMEngine(config, detokenize=False)  # the server makes the text
    except Exception as error:  # noqa: BLE001 - reported to the server, which reports it in one line
        channel.send(StartFailed(str(error) if isinstance(error, (ValueError, LookupError, OSError))
                                 else f"{type(error).__name__}: {error}"))  # fmt: skip
        return
    finally:
        loaded.set()
    core = EngineCore(engine, queue_timeout_s=queue_timeout_s, max_adapters=max_adapters)
    channel.send(Ready(EngineInfo.of(engine), sorted(core.adapter_names)))
    # Steps run in a thread of their own, as they do in a server without a core process: on CPU, torch's OpenMP
    # team of the main thread spins at every op's barrier, and on a busy machine a step took 20x as long there.
    stepper = threading.Thread(target=_CoreServer(core, channel).run, name="kvrun-engine")
    stepper.start()
    stepper.join()
    engine.shutdown()  # tensor-parallel workers stop with the core


def _exit_if_server_goes(sock: socket.socket, loaded: threading.Event) -> None:
    """While the model loads (minutes for a large one, holding GPU memory), nothing else reads the socket: a server
    killed meanwhile (SIGTERM or SIGKILL run no shutdown code of its) would leave the core loading on. End the
    process when the socket reaches end-of-file before loading is done. Data the server sent (a Shutdown) is only
    peeked at: the core reads it once it is up."""
    while not loaded.is_set():
        readable, _, _ = select.select([sock], [], [], 0.5)
        if not readable:
            continue
        try:
            gone = not sock.recv(1, socket.MSG_PEEK)
        except OSError:
            gone = True
        if gone and not loaded.is_set():
            os._exit(1)  # no engine to shut down yet; tensor-parallel workers see their pipes close and exit
        loaded.wait(0.5)  # a message waits for the core: stop polling a socket that stays readable


# -- the server's side: starting it ---------------------------------------------------------------------------------
class CoreStartError(ValueError):
    """The engine core could not load the model (the message says why)."""


class CoreProcess:
    """A started engine core that said Ready: its process, the server's end of its socket, and what it loaded."""

    def __init__(self, process: multiprocessing.process.BaseProcess, sock: socket.socket, info: EngineInfo,
                 adapter_names: list[str]) -> None:  # fmt: skip
        self.process = process
        self.sock = sock
        self.info = info
        self.adapter_names = adapter_names

    @classmethod
    def start(cls, config: EngineConfig, *, queue_timeout_s: float, max_adapters: int) -> CoreProcess:
        """Start the process and wait until it loaded the model; raises CoreStartError with its reason if not."""
        ours, theirs = socket.socketpair()
        process = _context().Process(
            # Not daemonic: a core may start tensor-parallel workers of its own. It still never outlives the
            # server: close() runs at the latest at exit, and the core stops when its socket closes.
            target=run_core, name="kvrun-engine-core", daemon=False,
            args=(config, theirs, queue_timeout_s, max_adapters, logging.getLogger("kvrun").getEffectiveLevel()),
        )  # fmt: skip
        process.start()
        theirs.close()
        try:
            first = _first_message(ours, process)
        except BaseException:
            ours.close()
            process.kill()
            process.join(5)
            raise
        if isinstance(first, Ready):
            core = cls(process, ours, first.info, first.adapter_names)
            atexit.register(core.close)  # before multiprocessing's own exit handler joins it
            return core
        ours.close()
        process.join(10)
        if isinstance(first, StartFailed):
            raise CoreStartError(first.message)
        raise CoreStartError(f"the engine core process exited while loading the model (exit code {process.exitcode})")

    def close(self, say_shutdown: bool = True) -> None:
        """Stop the process however it is (no orphan): Shutdown (unless the caller's connection sent it), then
        SIGTERM, then SIGKILL."""
        if say_shutdown:
            try:
                self.sock.sendall(encode(Shutdown()))
            except OSError:
                pass
        if self.process.pid is None:
            return
        self.process.join(10)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)
        self.sock.close()


def _first_message(sock: socket.socket, process) -> Ready | StartFailed | None:
    frames = FrameBuffer(FromCore)
    while True:
        readable, _, _ = select.select([sock], [], [], 1.0)
        if not readable:
            if not process.is_alive():
                return None
            continue
        data = sock.recv(1 << 20)
        if not data:
            return None
        messages = frames.feed(data)
        if messages:
            return messages[0]


_CONTEXT: multiprocessing.context.BaseContext | None = None


def _context() -> multiprocessing.context.BaseContext:
    """forkserver: each core forks from a clean process that imported kvrun once (fast starts, no inherited
    threads or CUDA state, unlike fork; no re-import per start, unlike spawn)."""
    global _CONTEXT
    if _CONTEXT is None:
        _CONTEXT = multiprocessing.get_context("forkserver")
        _CONTEXT.set_forkserver_preload(["kvrun.engine.core_process"])
    return _CONTEXT
