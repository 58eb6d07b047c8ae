"""The engine core in its own process: it stops with the server (no orphan, even when the server is killed), a
storm of clients hanging up mid-stream leaves no KV blocks or slot pins behind, and a core that dies is reported
at once (streams end with an error, /health says why, new requests get 503) instead of leaving anything hanging."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.serving.conftest import REGISTRY_ADAPTERS, greedy, push
from tests.serving.server import free_port
from tests.serving.test_disconnect import _wait_until_idle
from tests.serving.test_reliability_engine import assert_engine_stopped

PROMPT = "Once upon a time"


def _gone(pid: int, timeout_s: float = 30.0) -> bool:
    """True once pid has exited (a zombie not yet reaped counts as exited)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as stat:
                if stat.read().split(") ")[-1].startswith("Z"):
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.1)
    return False


def _children(pid: int) -> list[int]:
    children = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        children += [int(child) for child in text]
    return children


async def _stream(http: httpx.AsyncClient, body: dict, keep_events: int | None) -> list[str]:
    """Stream a completion; hang up after keep_events data lines (None: read it all)."""
    lines = []
    async with http.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200, await response.aread()
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                lines.append(line)
                if keep_events is not None and len(lines) >= keep_events:
                    break  # leaving the block closes the connection mid-stream
    return lines


def test_core_process_answers_like_the_offline_engine_and_stops_with_the_server(serve, registry, adapter_dirs,
                                                                                 reference):  # fmt: skip
    for spec in REGISTRY_ADAPTERS[:2]:
        push(registry, adapter_dirs[spec.name], f"team/{spec.name}", "prod")
    server = serve(registry, engine_process=True)
    pid = server.serving.client.pid
    assert pid is not None and pid != os.getpid() and not _gone(pid, 0.1)
    models = [None, *(f"team/{spec.name}" for spec in REGISTRY_ADAPTERS[:2])]
    with server.client() as http:
        for model in models:
            body = {"model": model or server.serving.model_name, "prompt": PROMPT, "max_tokens": 6, "temperature": 0,
                    "ignore_eos": True, "return_token_ids": True, "logprobs": 2}  # fmt: skip
            choice = http.post("/v1/completions", json=body).json()["choices"][0]
            expected = greedy(reference, [PROMPT], [model], 6, ignore_eos=True)[0]
            assert choice["token_ids"] == expected, model
            assert len(choice["logprobs"]["top_logprobs"]) == 6
        assert http.get("/health").json() == {"status": "ok"}
    server.stop()
    assert _gone(pid), "the engine core process outlived its server"


def test_disconnect_storm_leaves_no_blocks_or_pins(serve, registry, adapter_dirs):
    for spec in REGISTRY_ADAPTERS:
        push(registry, adapter_dirs[spec.name], f"team/{spec.name}", "prod")
    server = serve(registry, engine_process=True, max_num_seqs=16)
    models = [server.serving.model_name, *(f"team/{spec.name}" for spec in REGISTRY_ADAPTERS)]
    rng = random.Random(7)

    async def storm() -> list[list[str]]:
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=server.url, timeout=60, limits=limits) as http:
            jobs = []
            for index in range(48):
                body = {"model": models[index % len(models)], "prompt": f"{PROMPT} {index}", "max_tokens": 400,
                        "temperature": 0.8, "ignore_eos": True, "stream": True}  # fmt: skip
                jobs.append(_stream(http, body, keep_events=rng.randint(1, 6)))
            jobs.append(_stream(http, {**body, "max_tokens": 8, "model": models[1]}, keep_events=None))
            return await asyncio.gather(*jobs)

    *dropped, whole = asyncio.run(storm())
    assert all(lines for lines in dropped) and whole[-1] == "data: [DONE]"
    with server.client() as http:
        _wait_until_idle(http, timeout_s=60)
        response = http.post("/v1/completions", json={"model": models[2], "prompt": PROMPT, "max_tokens": 3})
        assert response.status_code == 200, response.text
    assert server.serving.client.alive


def test_a_core_that_dies_ends_streams_with_an_error_and_fails_health(serve):
    server = serve(None, engine_process=True)
    base = server.serving.model_name
    body = {"model": base, "prompt": PROMPT, "max_tokens": 1500, "ignore_eos": True, "stream": True}

    async def run() -> list[str]:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
            lines = []
            async with http.stream("POST", "/v1/completions", json=body) as response:
                async for line in response.aiter_lines():
                    if line.startswith("data: "):
                        lines.append(line)
                        if len(lines) == 3:
                            os.kill(server.serving.client.pid, signal.SIGKILL)
            return lines

    started = time.monotonic()
    lines = asyncio.run(run())
    assert time.monotonic() - started < 30
    assert lines[-1] == "data: [DONE]" and "killed by signal 9" in lines[-2], lines[-3:]
    assert_engine_stopped(server, "engine core process")


def test_killing_the_server_takes_the_core_with_it(model_dir):
    port = free_port()
    command = [
        str(Path(sys.executable).parent / "kvrun"), "serve", "--model", str(model_dir), "--port", str(port),
        "--registry", "none", "--max-loras", "1", "--num-blocks", "128", "--block-size", "4", "--engine-process",
        "--log-level", "warning",
    ]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert process.poll() is None and time.monotonic() < deadline, process.stdout.read()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        reply = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=60,
                           json={"prompt": PROMPT, "max_tokens": 2, "model": model_dir.name})  # fmt: skip
        assert reply.status_code == 200, reply.text
        descendants = _descendants(process.pid)  # the engine core, and multiprocessing's helpers
        assert descendants, "no engine core process"
    finally:
        process.kill()  # SIGKILL: no shutdown code of the server runs
        process.wait(30)
    assert all(_gone(pid) for pid in descendants), f"left behind: {[_command(pid) for pid in descendants]}"


def _descendants(pid: int) -> list[int]:
    found, queue = [], [pid]
    while queue:
        for child in _children(queue.pop()):
            found.append(child)
            queue.append(child)
    return found


def _command(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def test_outputs_travel_as_deltas():
    """A step's message holds only what the step added, until a request finishes, and no text (the server makes
    it from the token ids)."""
    from kvrun.engine.core_process import Outputs, delta_of, encode
    from kvrun.engine.request import RequestOutput

    long_text = "word " * 2000
    running = RequestOutput("r1", [1, 2], list(range(2000)), long_text, [7], " word", False, None,
                            logprobs=[{1: -0.1}] * 2000)  # fmt: skip
    message = encode(Outputs([delta_of(running)]))
    assert len(message) < 100 and json.dumps(delta_of(running).new_logprobs, default=str).count("-0.1") == 1
    assert b"word" not in message
    finished = RequestOutput("r1", [1, 2], [5, 6], "ab", [6], "b", True, "stop", stop_reason="x")
    delta = delta_of(finished)
    assert delta.token_ids == [5, 6] and delta.finish_reason == "stop" and delta.stop_reason == "x"
    assert b"ab" not in encode(Outputs([delta]))


def test_a_server_that_closes_its_end_mid_step_stops_the_core_quietly(model_dir):
    """A replica stopping while its core still streams: the core's next write meets a closed socket. It stops its
    loop and aborts what ran (no traceback, nothing left running), as it does when a read finds EOF."""
    import socket
    import threading

    from kvrun import LLM
    from kvrun.engine.core import EngineCore, EngineRequest
    from kvrun.engine.core_process import _Channel, _CoreServer
    from kvrun.engine.sampling_params import SamplingParams

    llm = LLM(str(model_dir), max_loras=0, num_blocks=64, block_size=4)
    ours, theirs = socket.socketpair()
    try:
        core = EngineCore(llm.engine, queue_timeout_s=60, max_adapters=0)
        core.add(EngineRequest("r1", [1, 2, 3], SamplingParams(max_tokens=200, ignore_eos=True)))
        channel = _Channel(theirs)
        errors = []
        previous_hook, threading.excepthook = threading.excepthook, errors.append
        ours.shutdown(socket.SHUT_RD)  # reads still block (no EOF), the first write breaks: a server mid-close
        stepper = threading.Thread(target=_CoreServer(core, channel).run, daemon=True)
        try:
            stepper.start()
            stepper.join(60)
        finally:
            threading.excepthook = previous_hook
        assert not stepper.is_alive() and not errors, errors
        assert channel.gone and not llm.engine.has_unfinished()
    finally:
        ours.close()
        theirs.close()
        llm.engine.shutdown()


def _watch_unloaded(sock) -> None:
    import threading

    from kvrun.engine.core_process import _exit_if_server_goes

    _exit_if_server_goes(sock, threading.Event())  # the model never finishes loading here
    os._exit(0)  # not reached unless the watcher returns


def test_a_core_still_loading_its_model_exits_when_the_server_is_gone():
    """The server killed while its core loads the model: the core's socket reaches end-of-file and the core ends
    then, instead of finishing a load of minutes and holding the GPU's memory. A message from a live server (a
    Shutdown sent during loading) is left for the core to read once it is up."""
    import multiprocessing
    import socket

    context = multiprocessing.get_context("spawn")
    for send_first in (True, False):
        ours, theirs = socket.socketpair()
        process = context.Process(target=_watch_unloaded, args=(theirs,), daemon=True)
        process.start()
        theirs.close()
        if send_first:
            ours.sendall(b"x")  # a live server's message: the core keeps loading
            process.join(3)
            assert process.is_alive()
            process.kill()
            process.join(10)
            ours.close()
            continue
        time.sleep(1)  # the watcher is polling
        assert process.is_alive()
        ours.close()  # the server is gone
        process.join(10)
        assert process.exitcode == 1
