"""The worker process of one tensor-parallel rank (1 .. N-1): load the rank's shard, then follow rank 0.

Rank 0 runs in the engine's process and sends each worker, over its own pipe, every call that must happen on all
ranks, in the order rank 0 makes it:
    ("execute", ScheduledBatch, n) run the step's forward pass (rank 0 samples; the workers' logits are dropped);
                                  n: None, or the length of the last step's sampled tokens, which rank 0
                                  broadcasts first (async scheduling: rows whose token is not on its host yet)
    ("call", function, args)      function(runner, *args), answered "ok": KV cache sizing, graph capture, LoRA
                                  wrapping and adapter slot writes (the engine publishes a slot before the step
                                  that uses it, so every rank sees a whole adapter or none), then a DoRA
                                  adapter's norm sums (an all-reduce rank 0 joins)
    ("stop",)                     leave the loop
These go pickled from parent to child, as multiprocessing's own start of the worker does. The answers go back as
MessagePack Answers, so rank 0 never unpickles what a worker sends: "joining" (its rendezvous began), "ready" (its
shard is loaded), "ok" (a call finished), or "error" with the traceback, after which the worker exits. One whose
engine vanished (its pipe closed) exits too.
"""

from __future__ import annotations

import logging
import os
import traceback
from dataclasses import replace
from multiprocessing.connection import Connection
from pathlib import Path

import msgspec
import torch
import torch.distributed as dist

from kvrun.config import EngineConfig
from kvrun.runtime.distributed.group import make_group

logger = logging.getLogger(__name__)


class Answer(msgspec.Struct, array_like=True):
    kind: str  # "joining" | "ready" | "ok" | "error"
    traceback: str | None = None  # with "error"


_answer_decoder = msgspec.msgpack.Decoder(Answer)


def read_answer(conn: Connection) -> Answer:
    """A worker's next answer (raises EOFError once its pipe closed, msgspec.DecodeError for unreadable bytes)."""
    return _answer_decoder.decode(conn.recv_bytes())


def _answer(conn: Connection, kind: str, failure: str | None = None) -> None:
    conn.send_bytes(msgspec.msgpack.encode(Answer(kind, failure)))


def rank_config(config: EngineConfig, rank: int) -> EngineConfig:
    """The config one rank runs: its own CUDA device (the first rank's index + rank)."""
    device = config.torch_device()
    if device.type != "cuda":
        return config
    return replace(config, device=f"cuda:{(device.index or 0) + rank}")


def cpu_threads(size: int) -> int:
    """Each CPU rank's share of the cores: ranks that each spin up every core's thread starve one another at
    every collective (a step took 40x longer on two cores)."""
    return max(1, (os.cpu_count() or 1) // size)


def run_worker(
    rank: int, size: int, store_port: int, model_dir: Path, config: EngineConfig, model_name: str, conn: Connection
) -> None:
    from kvrun.runtime.model_runner import ModelRunner

    logging.basicConfig(level=os.environ.get("KVRUN_LOG_LEVEL", "WARNING"))
    try:
        config = rank_config(config, rank)
        device = config.torch_device()
        if device.type == "cuda":
            torch.cuda.set_device(device)
        else:
            torch.set_num_threads(cpu_threads(size))
        store = dist.TCPStore("127.0.0.1", store_port, size, False)
        _answer(conn, "joining")
        tp = make_group(store, rank, size, device)
        runner = ModelRunner(model_dir, config, model_name, tp)
        _answer(conn, "ready")
        _serve(runner, conn)
    except EOFError:  # the engine's end of the pipe closed: nothing left to do
        os._exit(0)
    except BaseException:  # noqa: BLE001 - reported to rank 0, which takes the engine down with it
        try:
            _answer(conn, "error", traceback.format_exc())
        finally:
            os._exit(1)


def _serve(runner, conn: Connection) -> None:
    while True:
        message = conn.recv()
        kind = message[0]
        if kind == "execute":
            _, batch, width = message
            previous = None
            if width is not None:
                previous = runner.tp.broadcast(torch.empty(width, dtype=torch.int64, device=runner.device))
            runner.execute(batch, previous)
        elif kind == "call":
            _, function, args = message
            function(runner, *args)
            _answer(conn, "ok")
        elif kind == "stop":
            return
        else:
            raise RuntimeError(f"unknown message {kind!r} from rank 0")
