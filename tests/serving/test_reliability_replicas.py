"""Many replicas, one registry: three `kvrun serve` processes on one Redis key prefix while requests flow to all of
them. A push, a tag move and a delete reach every replica within a second (the spread is printed); streams already
running finish on their version; every response's tokens are the weights its headers name; a replica killed and
restarted serves what changed while it was down, and follows the change log again."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
from adapters_registry import open_store

from tests.serving.conftest import greedy, reference_name
from tests.serving.replicas import Replica

PROMPT = "Once upon a time"
PROPAGATION_S = 1.0
VERSIONS = {1: "qkv-r8", 2: "mlp-r16", 3: "o-r16"}  # which adapter of ADAPTER_SPECS each pushed version holds
REFS = ("team/r:prod", "team/r", "team/r@1")



def _body(model: str, max_tokens: int = 6, stream: bool = False) -> dict:
    return {"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True, "stream": stream}  # fmt: skip


class Traffic:
    """One client loop per replica, asking for REFS in turn and recording every answer."""

    def __init__(self, replicas: list[Replica]) -> None:
        self.replicas = replicas
        self.answers: list[tuple[str, str, int, str, str, list[int]]] = []  # replica, model, status, ref, sha, ids
        self.unreachable = 0
        self.errors: list[tuple[str, str, int, dict]] = []  # replica, model, status, error body of each non-200
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(replica,), daemon=True) for replica in replicas]

    def __enter__(self) -> Traffic:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)

    def _run(self, replica: Replica) -> None:
        with httpx.Client(base_url=replica.url, timeout=60) as http:
            index = 0
            while not self._stop.is_set():
                model = REFS[index % len(REFS)]
                index += 1
                try:
                    response = http.post("/v1/completions", json=_body(model))
                except httpx.TransportError:  # the replica is down (killed on purpose)
                    self.unreachable += 1
                    time.sleep(0.05)
                    continue
                tokens = response.json()["choices"][0]["token_ids"] if response.status_code == 200 else []
                if response.status_code != 200:
                    self.errors.append((replica.name, model, response.status_code, response.json().get("error", {})))
                self.answers.append((replica.name, model, response.status_code,
                                     response.headers.get("x-kvrun-adapter", ""),
                                     response.headers.get("x-kvrun-adapter-sha256", ""), tokens))  # fmt: skip


def _propagation(replicas: list[Replica], model: str, ref: str | None) -> list[float]:
    """Seconds until each replica answers new requests for `model` with `ref` (None: with 404)."""
    started = time.monotonic()

    def wait(replica: Replica) -> float:
        with httpx.Client(base_url=replica.url, timeout=60) as http:
            while True:
                response = http.post("/v1/completions", json=_body(model, max_tokens=1))
                if (response.status_code == 404) if ref is None else response.headers.get("x-kvrun-adapter") == ref:
                    return time.monotonic() - started
                assert time.monotonic() - started < 30, f"{replica.name} never moved {model} to {ref}"
                time.sleep(0.01)

    with ThreadPoolExecutor(len(replicas)) as pool:
        return list(pool.map(wait, replicas))


def _report(what: str, seconds: list[float]) -> None:
    times = ", ".join(f"{value * 1000:.0f}" for value in seconds)
    print(f"{what}: every replica within {max(seconds) * 1000:.0f} ms (per replica {times} ms; "
          f"spread {(max(seconds) - min(seconds)) * 1000:.0f} ms)")  # fmt: skip


def test_three_replicas_follow_one_registry(model_dir, adapter_dirs, reference, redis_registry, tmp_path):
    store = open_store(redis_registry)
    shas = {1: store.push(adapter_dirs[VERSIONS[1]], "team/r", tags=["prod"]).sha256}
    args = ["--model", str(model_dir), "--registry", redis_registry, "--max-loras", "4", "--max-lora-rank", "16",
            "--max-cpu-loras", "8", "--num-blocks", "1024", "--block-size", "4", "--log-level", "warning"]  # fmt: skip
    replicas = [Replica(name, args, tmp_path) for name in ("a", "b", "c")]
    expected = {version: greedy(reference, [PROMPT], [reference_name(adapter)], 6, ignore_eos=True)[0]
                for version, adapter in VERSIONS.items()}  # fmt: skip
    in_flight_expected = greedy(reference, [PROMPT], [reference_name(VERSIONS[1])], 40, ignore_eos=True)[0]
    try:
        for replica in replicas:
            replica.start()
        for replica in replicas:
            replica.wait_ready()
        streams, readers = [], []
        for replica in replicas:  # one long stream per replica, started on version 1
            http = httpx.Client(base_url=replica.url, timeout=60)
            context = http.stream("POST", "/v1/completions", json=_body("team/r:prod", 1500, stream=True))
            response = context.__enter__()
            assert response.headers["x-kvrun-adapter"] == "team/r@1"
            streams.append((http, context))
            readers.append(response.iter_lines())
        received: list[list[int]] = [[] for _ in replicas]

        def read(index: int, count: int) -> None:
            for line in readers[index]:
                if line.startswith("data: {"):
                    received[index] += json.loads(line[6:])["choices"][0]["token_ids"]
                if len(received[index]) >= count:
                    return

        for index in range(len(replicas)):
            read(index, 3)

        with Traffic(replicas) as traffic:
            time.sleep(0.5)
            shas[2] = store.push(adapter_dirs[VERSIONS[2]], "team/r", tags=["prod"]).sha256
            pushed = _propagation(replicas, "team/r:prod", "team/r@2")
            _report("push of version 2", pushed)
            for index in range(len(replicas)):  # the streams outlived the push, on version 1 throughout
                read(index, 40)
                assert received[index][:40] == in_flight_expected, replicas[index].name
            for http, context in streams:
                context.__exit__(None, None, None)
                http.close()

            store.tag("team/r@1", "prod")
            moved = _propagation(replicas, "team/r:prod", "team/r@1")
            _report("tag prod moved back to version 1", moved)
            store.delete("team/r@2")
            deleted = _propagation(replicas, "team/r@2", None)
            _report("delete of version 2", deleted)
            assert max(_propagation(replicas, "team/r", "team/r@1")) < 30  # `latest` fell back to version 1

            replicas[2].kill()
            shas[3] = store.push(adapter_dirs[VERSIONS[3]], "team/r", tags=["prod"]).sha256
            replicas[2].start()  # rejoins on the same port, after changes it could not see
            replicas[2].wait_ready()
            with httpx.Client(base_url=replicas[2].url, timeout=60) as http:
                first = http.post("/v1/completions", json=_body("team/r:prod"))
            assert first.headers["x-kvrun-adapter"] == "team/r@3"
            assert first.json()["choices"][0]["token_ids"] == expected[3]
            store.tag("team/r@1", "prod")  # and it follows the change log from there on
            rejoined = _propagation(replicas, "team/r:prod", "team/r@1")
            _report("tag move after a replica restarted", rejoined)
            time.sleep(0.5)

        for seconds in (pushed, moved, deleted, rejoined):
            assert max(seconds) < PROPAGATION_S, seconds
        by_sha = {sha: version for version, sha in shas.items()}
        served = [answer for answer in traffic.answers if answer[2] == 200]
        # A registry call slower than its deadline (2 s) answers 503 + Retry-After by design: on a loaded 2-core
        # machine (three replicas and their engine cores, one of them loading its model) the re-resolve a change
        # event asks for can miss it. Anything else is a failure.
        retry = [error for error in traffic.errors
                 if error[2] == 503 and error[3].get("code") == "registry_unavailable"]  # fmt: skip
        failed = [error for error in traffic.errors if error not in retry]
        print(f"traffic: {len(traffic.answers)} answers, {len(served)} served, {traffic.unreachable} while a replica "
              f"was down, {len(retry)} told to retry (registry past its deadline), {len(failed)} failed")  # fmt: skip
        assert len(served) > 50 and not failed, failed[:5]
        assert len(retry) <= len(traffic.answers) // 20, retry[:5]
        for replica, model, _, ref, sha, tokens in served:
            version = by_sha[sha]
            assert ref == f"team/r@{version}" and tokens == expected[version], (replica, model, ref)
    finally:
        for replica in replicas:
            replica.stop()
        store.close()
    logs = "".join(replica.log() for replica in replicas)
    assert "Traceback" not in logs, logs[-3000:]
