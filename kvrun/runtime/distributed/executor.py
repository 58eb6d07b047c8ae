"""Rank 0 of a tensor-parallel group, in the engine's process, and the N-1 worker processes it starts and drives.

Rank 0 is a ModelRunner over its own shard, so the engine, the memory plan and the sampler see one runner as
always; every call that must happen on all ranks is sent to the workers first (kvrun.runtime.distributed.worker
lists the messages), then run here. The logits stay on rank 0's device: no per-step copy of [rows, vocab] between
processes, and the sampler runs once.

A worker that dies takes the engine down with WorkerDiedError naming the rank, its exit code and its traceback:
rank 0 checks the workers before each call and after any call that fails (gloo reports a closed peer at once);
a watcher thread also aborts the NCCL group when a worker dies, so a collective waiting for it returns instead of
hanging until its timeout.
"""

from __future__ import annotations

import datetime
import logging
import multiprocessing
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import replace
from multiprocessing.connection import Connection, wait
from pathlib import Path

import msgspec
import torch
import torch.distributed as dist

from kvrun.config import EngineConfig
from kvrun.runtime.distributed.group import backend_for, check_shardable, make_group
from kvrun.runtime.distributed.worker import cpu_threads, rank_config, read_answer, run_worker
from kvrun.runtime.forward_batch import ScheduledBatch
from kvrun.runtime.loader import read_config
from kvrun.runtime.model_runner import ModelRunner
from kvrun.runtime.models.registry import read_model_config

logger = logging.getLogger(__name__)

START_TIMEOUT_S = 600.0  # a worker loading a large shard from a slow disk
CALL_TIMEOUT_S = 600.0  # graph capture on every rank


class WorkerDiedError(RuntimeError):
    """A tensor-parallel worker process is gone; the engine cannot take another step."""


class Workers:
    """Worker processes for ranks 1..N-1, each with a pipe; sends messages and waits for their answers."""

    def __init__(self, size: int, store_port: int, model_dir: Path, config: EngineConfig, model_name: str) -> None:
        context = multiprocessing.get_context("spawn")  # CUDA cannot be forked; spawn is the same on CPU
        self.processes, self.pipes = [], []
        self.failure: str | None = None
        self._stopping = False
        for rank in range(1, size):
            ours, theirs = context.Pipe()
            process = context.Process(
                target=run_worker, args=(rank, size, store_port, model_dir, config, model_name, theirs),
                name=f"kvrun-tp-rank{rank}", daemon=True,
            )  # fmt: skip
            process.start()
            theirs.close()
            self.processes.append(process)
            self.pipes.append(ours)
        self._finalizer = weakref.finalize(self, _stop, self.processes, self.pipes)
        self.on_death: list[Callable[[], None]] = []  # called once, from the watcher thread, when a worker dies
        threading.Thread(target=self._watch, name="kvrun-tp-watcher", daemon=True).start()

    # -- sending --------------------------------------------------------------------------------------------------
    def send(self, message: tuple) -> None:
        self.check()
        for rank, pipe in enumerate(self.pipes, start=1):
            try:
                pipe.send(message)
            except (BrokenPipeError, ConnectionResetError, EOFError, OSError):
                self.raise_failure(f"rank {rank} stopped taking messages")

    def expect(self, answer: str, timeout: float) -> None:
        """Wait until every worker has answered `answer`; raise WorkerDiedError for one that died or failed."""
        for rank, (pipe, process) in enumerate(zip(self.pipes, self.processes), start=1):
            ready = wait([pipe, process.sentinel], timeout)
            if not ready:
                self.raise_failure(f"rank {rank} did not answer within {timeout:.0f} s")
            if pipe not in ready:
                self.raise_failure()
            try:
                message = read_answer(pipe)
            except (EOFError, OSError):
                self.raise_failure()
            except msgspec.DecodeError as error:
                self.raise_failure(f"rank {rank} sent an unreadable answer ({error})")
            if message.kind == "error":
                self._record(f"tensor-parallel worker rank {rank} failed:\n{message.traceback}")
                self.raise_failure()
            if message.kind != answer:
                self.raise_failure(f"rank {rank} answered {message.kind!r}, expected {answer!r}")

    def call(self, function, *args, here: Callable[[], object] | None = None):
        """function(runner, *args) on every worker, each answering when done. here: rank 0's part of the call, run
        after the message is sent and before the answers are awaited, so collectives inside it meet the workers';
        returns its result."""
        self.send(("call", function, args))
        result = None if here is None else self.guarded(here)
        self.expect("ok", CALL_TIMEOUT_S)
        return result

    def guarded(self, function, *args):
        """function(*args) on rank 0, whose failure is blamed on a dead worker when there is one (gloo's socket
        error says less)."""
        try:
            return function(*args)
        except WorkerDiedError:
            raise
        except Exception:
            self.check()
            raise

    # -- failures -------------------------------------------------------------------------------------------------
    def check(self) -> None:
        if self.failure is None:
            for rank, process in enumerate(self.processes, start=1):
                if _exited(process):
                    self._died(rank, process)
        if self.failure is not None:
            raise WorkerDiedError(self.failure)

    def raise_failure(self, reason: str | None = None) -> None:
        """Raise WorkerDiedError with the best explanation known: a worker's own traceback, its exit, or reason."""
        for rank, (pipe, process) in enumerate(zip(self.pipes, self.processes), start=1):
            self._drain(rank, pipe)
            # One that just closed its pipe is exiting: let it, to report its exit code (a killed worker's status
            # reaches a forkserver-started parent late on a loaded machine; 1 s was seen to be too short).
            if self.failure is None and _exited(process, timeout=5.0):
                self._died(rank, process)
        if self.failure is None:
            self._record(f"tensor-parallel worker {reason or 'failed'}")
        raise WorkerDiedError(self.failure)

    def _drain(self, rank: int, pipe: Connection) -> None:
        try:
            while pipe.poll():
                message = read_answer(pipe)
                if message.kind == "error":
                    self._record(f"tensor-parallel worker rank {rank} failed:\n{message.traceback}")
        except (EOFError, OSError, msgspec.DecodeError):
            pass

    def _died(self, rank: int, process) -> None:
        # Its sentinel fired, so it is gone; the exit code may still be on its way (another thread can be reaping it).
        deadline = time.monotonic() + 5.0  # a loaded machine schedules the reaping thread late
        while process.exitcode is None and time.monotonic() < deadline:
            process.join(timeout=0.05)
        self._record(
            f"tensor-parallel worker rank {rank} (pid {process.pid}) exited with code {process.exitcode}; "
            "the engine cannot run without all of its ranks"
        )

    def _record(self, failure: str) -> None:
        if self.failure is None:
            self.failure = failure
            logger.error("%s", failure)

    def _watch(self) -> None:
        sentinels = {process.sentinel: rank for rank, process in enumerate(self.processes, start=1)}
        ready = wait(list(sentinels))
        if self._stopping:
            return
        rank = sentinels[ready[0]]
        self._drain(rank, self.pipes[rank - 1])
        self._died(rank, self.processes[rank - 1])
        for callback in self.on_death:
            try:
                callback()
            except Exception:  # noqa: BLE001 - the next callback must still run
                logger.exception("tensor-parallel failure callback failed")

    def stop(self) -> None:
        self._stopping = True
        self._finalizer()


def _exited(process, timeout: float = 0.0) -> bool:
    """Whether the process has ended (waiting up to timeout), read from its sentinel. Not is_alive(): while another
    thread (the watcher, or a caller's join) is reaping it, is_alive() can still answer True for a dead process, and a
    dead worker would then be reported as a vague pipe failure instead of its exit."""
    return bool(wait([process.sentinel], timeout))


def _stop(processes, pipes) -> None:
    for pipe in pipes:
        try:
            pipe.send(("stop",))
        except (BrokenPipeError, OSError):
            pass
    for process in processes:
        process.join(timeout=10.0)
        if process.is_alive():
            process.kill()
            process.join(timeout=5.0)
    for pipe in pipes:
        pipe.close()


class TensorParallelRunner(ModelRunner):
    """ModelRunner for rank 0 of `config.tensor_parallel_size` ranks; starts the other ranks' processes."""

    def __init__(self, model_dir: Path, config: EngineConfig, model_name: str) -> None:
        size = config.tensor_parallel_size
        check_shardable(read_model_config(read_config(model_dir), model_name), size)
        device = config.torch_device()
        if device.type == "cuda" and (device.index or 0) + size > torch.cuda.device_count():
            raise ValueError(
                f"tensor_parallel_size={size} needs {size} CUDA devices from {device}; "
                f"{torch.cuda.device_count()} are visible"
            )
        store = dist.TCPStore(
            "127.0.0.1", 0, size, True, timeout=datetime.timedelta(seconds=START_TIMEOUT_S), wait_for_workers=False
        )
        self._threads = torch.get_num_threads()
        self.workers = Workers(size, store.port, model_dir, config, model_name)
        try:
            self.workers.expect("joining", START_TIMEOUT_S)
            config = rank_config(config, 0)
            if device.type == "cuda":
                torch.cuda.set_device(config.torch_device())
            else:
                torch.set_num_threads(cpu_threads(size))
            tp = make_group(store, 0, size, config.torch_device())
            super().__init__(model_dir, config, model_name, tp)
            self.workers.expect("ready", START_TIMEOUT_S)
        except BaseException:
            self.workers.stop()
            torch.set_num_threads(self._threads)
            raise
        self._store = store  # the workers' rendezvous: kept while the group lives
        if backend_for(self.device) == "nccl":
            # A collective waiting for a dead NCCL peer never returns by itself: abort the group so it does.
            self.workers.on_death.append(tp.group.abort)
        logger.info("tensor parallelism: %d ranks over %s", size, backend_for(self.device))

    def call_everywhere(self, function, *args):
        """function(runner, *args) on every rank at once (collectives inside: each rank makes the same calls);
        returns rank 0's result. function must be importable by name (a module-level function or a method)."""
        return self.workers.call(function, *args, here=lambda: function(self, *args))

    def init_kv_cache(self, num_blocks: int) -> None:
        self.call_everywhere(ModelRunner.init_kv_cache, num_blocks)

    def release_kv_cache(self) -> None:
        if getattr(self, "workers", None) is not None and self.workers.failure is None:
            self.workers.call(ModelRunner.release_kv_cache)
        super().release_kv_cache()

    def capture_graphs(self, max_batch_size: int, max_step_tokens: int, with_lora: bool) -> None:
        self.call_everywhere(ModelRunner.capture_graphs, max_batch_size, max_step_tokens, with_lora)

    def execute(self, batch: ScheduledBatch, previous: torch.Tensor | None = None) -> torch.Tensor:
        # Workers need the step's layout only; sampling state (generators) stays with rank 0. Under async scheduling
        # the tokens rank 0 sampled last step may still be on its device only: they reach the workers by a
        # broadcast over the group (device to device), which the workers join before their forward pass.
        rows = [replace(request, generator=None) for request in batch.requests]
        pending = previous is not None and any(request.previous_row >= 0 for request in batch.requests)
        width = previous.shape[0] if pending else None
        self.workers.send(("execute", replace(batch, requests=rows), width))

        def here() -> torch.Tensor:
            if pending:
                self.tp.broadcast(previous.contiguous())
            return super(TensorParallelRunner, self).execute(batch, previous if pending else None)

        return self.workers.guarded(here)

    def shutdown(self) -> None:
        self.workers.stop()
        if self.device.type == "cpu":
            torch.set_num_threads(self._threads)
