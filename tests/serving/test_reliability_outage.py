"""Degraded mode: while the registry is down or frozen, adapters the server holds keep serving (marked stale), new
names get 503 with Retry-After, the replica stays ready, and nothing else waits on the registry. The registry here
is a redis-server of the test's own, with a password in its URL that must never reach a client or a log."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

import httpx
import pytest

from tests.serving.conftest import greedy, push, reference_name
from tests.serving.own_redis import OwnRedis

PROMPT = "Once upon a time"
SECRET = f"pw-{uuid.uuid4().hex}"
RESIDENT = ("team/a1", "team/a1@1", "team/a1:prod")
TTL_S = 0.2  # resolutions go stale quickly, so the test exercises the registry being asked (and not answering)


@pytest.fixture
def own_redis(tmp_path):
    directory = tmp_path / "redis"
    directory.mkdir()
    server = OwnRedis(directory, password=SECRET)
    server.start()
    yield server
    server.stop()


def _body(model: str) -> dict:
    return {"model": model, "prompt": PROMPT, "max_tokens": 6, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True}  # fmt: skip


def _expected(reference, adapter: str) -> list[int]:
    return greedy(reference, [PROMPT], [reference_name(adapter)], 6, ignore_eos=True)[0]


class Seen:
    """Every status line, header and body the client saw, to check that no secret is among them."""

    def __init__(self) -> None:
        self.texts: list[str] = []

    def __call__(self, response: httpx.Response) -> httpx.Response:
        response.read()
        self.texts.append(f"{response.status_code} {dict(response.headers)} {response.text}")
        return response


def test_resident_adapters_keep_serving_while_the_registry_is_down(serve, own_redis, adapter_dirs, reference, caplog):
    caplog.set_level(logging.INFO)
    url = own_redis.url()
    pushed = push(url, adapter_dirs["attn-r4"], "team/a1", "prod")
    push(url, adapter_dirs["ko-r2"], "team/b1")
    server = serve(url, resolve_ttl_s=TTL_S)
    expected = _expected(reference, "attn-r4")
    seen = Seen()
    with server.client(event_hooks={"response": [seen]}) as http:
        def served(model: str) -> httpx.Response:
            response = http.post("/v1/completions", json=_body(model))
            assert response.status_code == 200, (model, response.text)
            assert response.json()["choices"][0]["token_ids"] == expected
            assert response.headers["x-kvrun-adapter-sha256"] == pushed["sha256"]
            return response

        for model in RESIDENT:
            assert "x-kvrun-adapter-stale" not in served(model).headers
        assert http.get("/ready").json()["registry"]["reachable"] is True

        own_redis.kill()
        for _ in range(20):  # well past the resolutions' freshness: every answer now comes from memory
            for model in RESIDENT:
                served(model)
        for model in RESIDENT:
            assert served(model).headers["x-kvrun-adapter-stale"] == "true"
        unknown = http.post("/v1/completions", json=_body("team/b1"))
        assert unknown.status_code == 503 and int(unknown.headers["retry-after"]) >= 1, unknown.text
        assert unknown.json()["error"]["code"] == "registry_unavailable"
        tgi = http.post("/generate", json={"inputs": PROMPT, "parameters": {"adapter_id": "team/b1"}})
        assert tgi.status_code == 503 and tgi.headers["retry-after"]
        base = http.post("/v1/completions", json=_body(server.serving.model_name))
        assert base.status_code == 200
        ready = http.get("/ready")
        assert ready.status_code == 200 and ready.json()["status"] == "ready"
        assert ready.json()["registry"]["reachable"] is False and ready.json()["registry"]["error"]
        listed = {entry["id"]: entry for entry in http.get("/v1/adapters").json()["data"]}
        for model in RESIDENT:
            assert listed[model]["stale"] is True and listed[model]["sha256"] == pushed["sha256"]
            assert listed[model]["ref"] == "team/a1@1" and listed[model]["state"] == "gpu"

        own_redis.start()  # the same append-only file: the registry is back as it was
        for attempt in range(200):
            if http.post("/v1/completions", json=_body("team/b1")).status_code == 200:
                break
            assert attempt < 199, "new adapters are still refused after the registry came back"
            time.sleep(0.05)
        assert http.get("/ready").json()["registry"]["reachable"] is True
        assert "x-kvrun-adapter-stale" not in served("team/a1:prod").headers
    leaks = [text for text in [*seen.texts, caplog.text] if SECRET in text]
    assert not leaks, leaks[0][:500]


def test_a_frozen_registry_holds_up_nothing_else(serve, own_redis, adapter_dirs, reference):
    """Requests that must ask a registry that does not answer get 503 in bounded time; the API-key check, base-model
    requests and /ready answer meanwhile, ahead of all of them."""
    url = own_redis.url()
    push(url, adapter_dirs["attn-r4"], "team/a1")
    server = serve(url, api_key="user-key", resolve_ttl_s=TTL_S)
    auth = {"Authorization": "Bearer user-key"}
    base = server.serving.model_name

    async def run() -> tuple[list[str], list[httpx.Response], httpx.Response]:
        finished: list[str] = []

        async def post(http: httpx.AsyncClient, what: str, body: dict) -> httpx.Response:
            response = await http.post("/v1/completions", json=body, headers=auth)
            finished.append(what)
            return response

        async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
            assert (await post(http, "warm", _body("team/a1"))).status_code == 200
            own_redis.freeze()
            try:
                # More registry-bound requests than the registry pool has threads.
                lookups = [asyncio.ensure_future(post(http, "lookup", _body(f"team/new-{i}"))) for i in range(12)]
                await asyncio.sleep(0.2)  # they are all waiting on the registry now
                ready = await http.get("/ready")
                base_response = await post(http, "base", _body(base))
                refused = await http.post("/v1/completions", json=_body(base))  # no key: refused at once
                finished.append(f"no key {refused.status_code}")
                responses = await asyncio.gather(*lookups)
            finally:
                own_redis.thaw()
            assert ready.status_code == 200
        return finished, responses, base_response

    finished, responses, base_response = asyncio.run(run())
    assert base_response.status_code == 200
    assert finished[1:3] == ["base", "no key 401"], finished  # ahead of every request stuck on the registry
    for response in responses:
        assert response.status_code == 503 and response.headers["retry-after"], response.text
