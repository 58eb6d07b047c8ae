"""Adapters pushed with the `kvrun-adapters` CLI are served without a restart; tag moves and deletes take effect
for new requests within a second while in-flight streams finish on their version. Both registry backends."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest

from tests.serving.conftest import greedy, push, reference_name, registry_cli

PROMPT = "Once upon a time"
PROPAGATION_S = 1.0  # the bound for a registry change to reach new requests


def _completion(http: httpx.Client, model: str, max_tokens: int = 6) -> tuple[str, list[int]]:
    body = {"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True}  # fmt: skip
    response = http.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    return response.headers["x-kvrun-adapter"], response.json()["choices"][0]["token_ids"]


def _wait_for_version(http: httpx.Client, model: str, version: str) -> float:
    """Seconds until new requests for `model` run on `version`."""
    started = time.monotonic()
    while time.monotonic() - started < 5:
        response = http.post("/v1/completions", json={"model": model, "prompt": PROMPT, "max_tokens": 1})
        if response.headers.get("x-kvrun-adapter") == version:
            return time.monotonic() - started
        time.sleep(0.02)
    raise AssertionError(f"{model} never moved to {version}")


def test_pushed_adapter_is_served_without_restart(serve, registry, adapter_dirs, reference):
    server = serve(registry)
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="team/fresh", prompt=PROMPT, max_tokens=2)
    push(registry, adapter_dirs["all-r8"], "team/fresh", "prod")
    expected = greedy(reference, [PROMPT], ["team/all-r8"], 6, ignore_eos=True)[0]
    with server.client() as http:
        for model in ("team/fresh", "team/fresh:prod", "team/fresh@1"):
            assert _completion(http, model) == ("team/fresh@1", expected)
        adapters = {entry["id"]: entry for entry in http.get("/v1/adapters").json()["data"]}
    assert adapters["team/fresh"]["state"] == "gpu" and adapters["team/fresh"]["tags"] == ["latest", "prod"]
    assert "team/fresh" in {model.id for model in client.models.list().data}


def test_new_version_under_a_tag_while_a_stream_is_in_flight(serve, registry, adapter_dirs, reference):
    push(registry, adapter_dirs["qkv-r8"], "team/moving", "prod")
    server = serve(registry)
    stream_body = {"model": "team/moving:prod", "prompt": PROMPT, "max_tokens": 1500, "temperature": 0,
                   "ignore_eos": True, "stream": True, "return_token_ids": True}  # fmt: skip
    received: list[int] = []
    with server.client() as http, http.stream("POST", "/v1/completions", json=stream_body) as stream:
        assert stream.headers["x-kvrun-adapter"] == "team/moving@1"
        lines = stream.iter_lines()
        for line in lines:
            if line.startswith("data: {"):
                received += json.loads(line[6:])["choices"][0]["token_ids"]
                break
        push(registry, adapter_dirs["mlp-r16"], "team/moving", "prod")
        assert _wait_for_version(http, "team/moving:prod", "team/moving@2") < PROPAGATION_S
        assert _completion(http, "team/moving:prod")[1] == greedy(reference, [PROMPT], ["team/mlp-r16"], 6,
                                                                    ignore_eos=True)[0]  # fmt: skip
        in_flight = {entry["ref"]: entry for entry in http.get("/v1/adapters").json()["data"]}["team/moving@1"]
        assert in_flight["in_flight"] == 1 and in_flight["pinned"] == 1  # the stream still runs on version 1
        for line in lines:  # tokens generated after version 2 took over new requests
            if line.startswith("data: {"):
                received += json.loads(line[6:])["choices"][0]["token_ids"]
            if len(received) >= 40:
                break
    assert received == greedy(reference, [PROMPT], ["qkv-r8"], len(received), ignore_eos=True)[0]


def test_deletes_take_effect_for_new_requests(serve, registry, adapter_dirs, reference):
    push(registry, adapter_dirs["down-r4"], "team/gone")
    push(registry, adapter_dirs["up-r2"], "team/gone")
    server = serve(registry)
    with server.client() as http:
        assert _completion(http, "team/gone")[0] == "team/gone@2"
        registry_cli(registry, "delete", "team/gone@2")
        assert _wait_for_version(http, "team/gone", "team/gone@1") < PROPAGATION_S
        expected = greedy(reference, [PROMPT], ["down-r4"], 6, ignore_eos=True)[0]
        assert _completion(http, "team/gone") == ("team/gone@1", expected)
        assert http.post("/v1/completions", json={"model": "team/gone@2", "prompt": PROMPT}).status_code == 404
        registry_cli(registry, "delete", "team/gone")
        started = time.monotonic()
        while http.post("/v1/completions", json={"model": "team/gone", "prompt": PROMPT}).status_code != 404:
            assert time.monotonic() - started < PROPAGATION_S
            time.sleep(0.02)
        refs = {entry["ref"] for entry in http.get("/v1/adapters").json()["data"]}
    assert not any(ref.startswith("team/gone") for ref in refs)  # deleted versions leave the engine too


def test_engine_keeps_at_most_max_cpu_loras_versions(serve, file_registry, adapter_dirs, reference):
    """Old versions nobody uses are unloaded (least recently used first); asking again fetches them again."""
    names = ["attn-r4", "ko-r2", "up-r2", "down-r4"]
    for name in names:
        push(file_registry, adapter_dirs[name], f"team/{name}")
    server = serve(file_registry, max_loras=1, max_cpu_loras=2)
    with server.client() as http:
        for name in [*names, names[0]]:
            expected = greedy(reference, [PROMPT], [reference_name(name)], 6, ignore_eos=True)[0]
            assert _completion(http, f"team/{name}")[1] == expected
        loaded = [entry["ref"] for entry in http.get("/v1/adapters").json()["data"] if entry["state"] != "registry"]
    assert sorted(loaded) == ["team/attn-r4@1", "team/down-r4@1"]
