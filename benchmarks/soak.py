"""Soak `kvrun serve` under faults: many concurrent streams, client disconnects, a Redis kill and restart, a re-push.

    python benchmarks/soak.py --streams 500 --duration 180

It starts a redis-server of its own on a free port (append-only file in a temp dir, so a restart finds the registry
as it was, as a production Redis with persistence would; a password in the registry URL, to look for), pushes random
adapters shaped for the served model (the bundled SmolLM2 on CPU by default), and starts `kvrun serve`. It then keeps
--streams streaming requests in flight for --duration seconds over the adapters' refs (`ns/name`, `ns/name:prod`,
`ns/name@1`) and the base model; --disconnect of the clients hang up part-way. At 20 % of the run Redis is killed
(SIGKILL), at 45 % it is restarted, at 65 % one adapter is re-pushed under the same tag with other weights. Then:

- failures for resident adapters: a request for an adapter the server held before the outage that did not end with
  every token and [DONE] (clients that hung up on purpose excluded); goal 0
- leaked KV blocks and pins, once every request is done; goal 0
- stale-weight responses: content (x-kvrun-adapter-sha256) other than what the ref named when the request was sent
  (a request sent within --grace-s of the re-push may get either), or tokens other than what that content gives
  alone (greedy; measured request by request before the run); goal 0
- secrets: the Redis password in any response (status, headers, body, /ready, /info, /v1/adapters, /metrics) or in
  the server's log; goal 0
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import redis
from adapters_registry import open_store
from load_http import make_adapter, percentile, stop_server, wait_until_up

from kvrun.runtime.loader import resolve_model

PROMPTS = ["The sea is", "Once upon a time", "def add(a, b):", "Dear diary,", "In 1492,", "The mitochondria"]
NAMESPACE = "soak"


@dataclass
class Outcome:
    ref: str
    prompt: str
    sent: float  # seconds since the run started
    latency: float = 0.0
    status: int = 0
    served: str = ""  # x-kvrun-adapter
    sha256: str = ""
    stale: bool = False
    tokens: list[int] = field(default_factory=list)
    done: bool = False  # saw [DONE]
    error: str = ""  # an error event, or the transport error
    hung_up: bool = False  # the client left on purpose


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class OwnRedis:
    def __init__(self, directory: Path, password: str) -> None:
        self.directory, self.password, self.port = directory, password, free_port()
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes",
             "--appendfsync", "always", "--dir", str(self.directory), "--requirepass", self.password],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        client = redis.Redis(port=self.port, password=self.password, socket_connect_timeout=1)
        for _ in range(200):
            try:
                client.ping()
                return
            except (redis.ConnectionError, redis.BusyLoadingError):
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


def start_server(args, registry: str, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [str(Path(sys.executable).parent / "kvrun"), "serve", "--port", str(port), "--registry", registry,
               "--max-loras", str(args.adapters + 2), "--max-lora-rank", "8", "--max-num-seqs", str(args.max_num_seqs),
               "--max-queue", str(args.streams + 64), "--queue-timeout", "900", "--log-level", "info"]  # fmt: skip
    if args.model:
        command += ["--model", args.model]
    with log.open("ab") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    wait_until_up(process, url, "/ready")
    return process, url


async def one(http: httpx.AsyncClient, ref: str, prompt: str, args, started: float, hang_up: bool) -> Outcome:
    outcome = Outcome(ref, prompt, time.monotonic() - started)
    body = {"model": ref, "prompt": prompt, "max_tokens": args.max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "return_token_ids": True}  # fmt: skip
    leave_after = random.randint(1, max(1, args.max_tokens // 2)) if hang_up else None
    try:
        async with http.stream("POST", "/v1/completions", json=body) as response:
            outcome.status = response.status_code
            outcome.served = response.headers.get("x-kvrun-adapter", "")
            outcome.sha256 = response.headers.get("x-kvrun-adapter-sha256", "")
            outcome.stale = response.headers.get("x-kvrun-adapter-stale") == "true"
            if response.status_code != 200:
                outcome.error = (await response.aread()).decode(errors="replace")
                return outcome
            async for line in response.aiter_lines():
                if line == "data: [DONE]":
                    outcome.done = True
                elif line.startswith("data: {"):
                    event = json.loads(line[6:])
                    if "error" in event:
                        outcome.error = json.dumps(event)
                    for choice in event.get("choices", []):
                        outcome.tokens += choice.get("token_ids") or []
                if leave_after is not None and len(outcome.tokens) >= leave_after:
                    outcome.hung_up = True
                    return outcome  # leaving the block closes the connection: the server must abort the request
    except httpx.HTTPError as error:
        outcome.error = f"{type(error).__name__}: {error}"
    outcome.latency = time.monotonic() - started - outcome.sent
    return outcome


async def calm_tokens(http: httpx.AsyncClient, refs: list[str], args) -> tuple[dict, dict[str, str]]:
    """(sha256 or "base", prompt) → tokens, one request at a time: what each content gives alone; and ref → sha256."""
    expected, shas = {}, {}
    for ref in refs:
        for prompt in PROMPTS:
            outcome = await one(http, ref, prompt, args, time.monotonic(), hang_up=False)
            if outcome.status != 200 or not outcome.done:
                raise RuntimeError(f"calm request for {ref} failed: {outcome.status} {outcome.error[:300]}")
            expected[(outcome.sha256 or "base", prompt)] = outcome.tokens
            shas[ref] = outcome.sha256
    return expected, shas


async def texts_of(http: httpx.AsyncClient, paths: list[str]) -> list[str]:
    texts = []
    for path in paths:
        response = await http.get(path)
        texts.append(f"{path} {response.status_code} {dict(response.headers)} {response.text}")
    return texts


async def idle_state(http: httpx.AsyncClient, timeout_s: float = 30) -> tuple[int, int]:
    """(leaked KV blocks, leaked pins and holds) once the server had timeout_s to settle after the last request."""
    deadline = time.monotonic() + timeout_s
    while True:
        metrics = {}
        for line in (await http.get("/metrics")).text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                metrics[name] = float(value)
        adapters = (await http.get("/v1/adapters")).json()["data"]
        blocks = int(metrics["kvrun_kv_blocks_total"] - metrics["kvrun_kv_blocks_free"])
        pins = sum(entry["pinned"] + entry["in_flight"] for entry in adapters)
        busy = sum(metrics[f"kvrun_requests_{state}"] for state in ("running", "waiting", "in_flight"))
        if (blocks == 0 and pins == 0 and busy == 0) or time.monotonic() > deadline:
            return blocks, pins
        await asyncio.sleep(0.5)


async def soak(args) -> None:
    work = Path(tempfile.mkdtemp(prefix="kvrun-soak-"))
    secret = f"soak-{uuid.uuid4().hex}"
    own = OwnRedis(work, secret)
    own.start()
    registry = f"redis://127.0.0.1:{own.port}/0?prefix={NAMESPACE}:&password={secret}"
    model_dir = resolve_model(args.model)
    store = open_store(registry)
    names = [f"{NAMESPACE}/a{index}" for index in range(args.adapters)]
    for index, name in enumerate(names):
        store.push(make_adapter(model_dir, work / f"a{index}", 8, seed=index), name, tags=["prod"])
    log = work / "server.log"
    process, url = start_server(args, registry, log)
    timeline: dict[str, float] = {}
    texts: list[str] = []
    try:
        limits = httpx.Limits(max_connections=args.streams + 16, max_keepalive_connections=args.streams + 16)
        async with httpx.AsyncClient(base_url=url, timeout=900, limits=limits) as http:
            base = (await http.get("/v1/models")).json()["data"][0]["id"]
            refs = [ref for name in names for ref in (name, f"{name}:prod", f"{name}@1")]
            expected, old_sha = await calm_tokens(http, [base, *names], args)
            resident = set(refs)  # every ref was resolved and its version loaded before the faults
            outcomes: list[Outcome] = []
            started = time.monotonic()
            stop = started + args.duration

            async def client() -> None:
                while time.monotonic() < stop:
                    ref = random.choice([*refs, base])
                    hang_up = random.random() < args.disconnect
                    outcomes.append(await one(http, ref, random.choice(PROMPTS), args, started, hang_up))

            async def faults() -> None:
                repushed = names[1 % len(names)]
                for at, action in ((0.20, "kill"), (0.45, "restart"), (0.65, "re-push")):
                    await asyncio.sleep(max(0.0, started + at * args.duration - time.monotonic()))
                    if action == "kill":
                        own.kill()
                        await asyncio.sleep(1.0)
                        ready = await http.get("/ready")
                        timeline["ready during outage"] = ready.status_code == 200
                        texts.extend(await texts_of(http, ["/ready", "/info", "/v1/adapters", "/v1/models"]))
                    elif action == "restart":
                        own.start()
                    else:
                        directory = make_adapter(model_dir, work / "repush", 8, seed=99)
                        record = await asyncio.to_thread(store.push, directory, repushed, tags=["prod"])
                        timeline["new_sha"], timeline["repushed"] = record.sha256, repushed
                    timeline[action] = time.monotonic() - started

            await asyncio.gather(faults(), *(client() for _ in range(args.streams)))
            duration = time.monotonic() - started
            leaked_blocks, leaked_pins = await idle_state(http)
            texts.extend(await texts_of(http, ["/ready", "/info", "/v1/adapters", "/v1/models", "/metrics"]))
            repushed = timeline["repushed"]
            expected.update((await calm_tokens(http, [f"{repushed}@2"], args))[0])
        report(args, outcomes, expected, resident, old_sha, timeline, duration, leaked_blocks, leaked_pins,
               texts, log, secret, base)  # fmt: skip
    finally:
        stop_server(process)
        store.close()
        own.kill()
        shutil.rmtree(work, ignore_errors=True)


def report(args, outcomes, expected, resident, old_sha, timeline, duration, leaked_blocks, leaked_pins, texts, log,
           secret, base) -> None:  # fmt: skip
    repushed, new_sha, pushed_at = timeline["repushed"], timeline["new_sha"], timeline["re-push"]
    completed = [o for o in outcomes if not o.hung_up]
    ok = [o for o in completed if o.status == 200 and o.done and not o.error and len(o.tokens) == args.max_tokens]
    failed = [o for o in completed if o not in ok]
    failed_resident = [o for o in failed if o.ref in resident]
    stale_content, wrong_tokens = [], []
    for o in ok:
        if o.ref != base:
            name = o.ref.split("@")[0].split(":")[0]
            moves = name == repushed and "@" not in o.ref  # the tag and `latest` moved to the new version
            if moves and o.sent > pushed_at + args.grace_s:
                wanted = {new_sha}
            elif moves and o.sent > pushed_at - args.grace_s:
                wanted = {new_sha, old_sha[name]}
            else:
                wanted = {old_sha[name]}
            if o.sha256 not in wanted:
                stale_content.append(o)
        if o.tokens != expected.get((o.sha256 or "base", o.prompt)):
            wrong_tokens.append(o)
    log_text = log.read_text(errors="replace")
    leaks = sum(secret in text for text in texts) + (secret in log_text)
    leaks += sum(secret in f"{o.served} {o.sha256} {o.error}" for o in outcomes)
    tokens = sum(len(o.tokens) for o in outcomes)
    latencies = [o.latency for o in ok]
    stale_served = sum(o.stale for o in ok)
    served_during_outage = [o for o in ok if timeline["kill"] <= o.sent <= timeline["restart"] and o.ref in resident]
    print(f"kvrun soak: {args.streams} concurrent streams for {args.duration:.0f} s, {args.adapters} adapters "
          f"({len(resident)} refs) + base, {args.max_tokens} tokens each, {args.disconnect:.0%} disconnects")
    print(f"Redis killed at {timeline['kill']:.1f} s, restarted at {timeline['restart']:.1f} s; {repushed} re-pushed "
          f"under :prod at {pushed_at:.1f} s; /ready during the outage: "
          f"{'ready' if timeline['ready during outage'] else 'NOT ready'}")
    rows = [
        ("requests", len(outcomes), ""),
        ("completed (client stayed)", len(ok), f"of {len(completed)}"),
        ("disconnected on purpose", len(outcomes) - len(completed), ""),
        ("failures for resident adapters", len(failed_resident), "goal 0"),
        ("other failures", len(failed) - len(failed_resident), ""),
        ("adapter requests sent during the outage, served", len(served_during_outage), ""),
        ("responses served from the last known resolution (stale)", stale_served, ""),
        ("leaked KV blocks", leaked_blocks, "goal 0"),
        ("leaked adapter pins / holds", leaked_pins, "goal 0"),
        ("stale-weight responses (content)", len(stale_content), "goal 0"),
        ("stale-weight responses (tokens differ from the content alone)", len(wrong_tokens), "goal 0"),
        ("secrets found in responses or logs", leaks, "goal 0"),
        ("generated tokens / s", f"{tokens / duration:.1f}", ""),
        ("request latency p50 / p99 s", f"{percentile(latencies, 50):.1f} / {percentile(latencies, 99):.1f}", ""),
    ]
    print("| metric | value | |\n|---|---|---|")
    for name, value, note in rows:
        print(f"| {name} | {value} | {note} |")
    masked = log_text.count("password=***")
    print(f"(the server's log has {len(log_text.splitlines())} lines; {masked} name the registry with its password "
          "masked, so the search for the password looked where it would have been)")
    for o in (failed_resident + stale_content + wrong_tokens)[:5]:
        print(f"  e.g. {o.ref} sent at {o.sent:.1f} s: {o.status} {o.served} {o.error[:200]}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=500, help="streams kept in flight")
    parser.add_argument("--duration", type=float, default=180.0, help="seconds of traffic (then it drains)")
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--disconnect", type=float, default=0.2, help="share of clients that hang up mid-stream")
    parser.add_argument("--grace-s", type=float, default=1.0, help="after a re-push, either version may be served")
    parser.add_argument("--model", default=None, help="default: the bundled SmolLM2")
    return parser.parse_args(argv)


if __name__ == "__main__":
    asyncio.run(soak(parse_args()))
