"""Adapter identity is content: a version number the registry reuses after losing its data never serves the old
weights, and adapters loaded from a path can neither claim nor shadow a registry name. Both registry backends."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
import redis

from tests.serving.conftest import greedy, push, reference_name

PROMPT = "Once upon a time"
PROPAGATION_S = 1.0


def wipe_registry(url: str) -> None:
    """What a Redis restart without persistence (or a lost volume) does: every adapter, version and event gone."""
    parts = urlsplit(url)
    if parts.scheme == "file":
        shutil.rmtree(Path(parts.path))
        return
    prefix = parse_qs(parts.query)["prefix"][0]
    client = redis.Redis.from_url(url.split("?")[0])
    keys = list(client.scan_iter(match=f"{prefix}*"))
    if keys:
        client.delete(*keys)
    client.close()


def _completion(http: httpx.Client, model: str) -> httpx.Response:
    body = {"model": model, "prompt": PROMPT, "max_tokens": 6, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True}  # fmt: skip
    return http.post("/v1/completions", json=body)


def _served(http: httpx.Client, model: str) -> tuple[str, str, list[int]]:
    response = _completion(http, model)
    assert response.status_code == 200, response.text
    headers = response.headers
    return headers["x-kvrun-adapter"], headers["x-kvrun-adapter-sha256"], response.json()["choices"][0]["token_ids"]


def _expected(reference, adapter: str) -> list[int]:
    return greedy(reference, [PROMPT], [reference_name(adapter)], 6, ignore_eos=True)[0]


def _adapters(http: httpx.Client) -> dict[str, dict]:
    return {entry["id"]: entry for entry in http.get("/v1/adapters").json()["data"]}


def test_version_reused_after_registry_data_loss_serves_the_new_weights(serve, registry, adapter_dirs, reference):
    first = push(registry, adapter_dirs["attn-r4"], "team/a1")
    server = serve(registry)
    with server.client() as http:
        assert _served(http, "team/a1") == ("team/a1@1", first["sha256"], _expected(reference, "attn-r4"))
        wipe_registry(registry)
        started = time.monotonic()
        while _completion(http, "team/a1").status_code != 404:  # the server has seen the registry empty
            assert time.monotonic() - started < 5, "the server never noticed that the registry lost its data"
            time.sleep(0.02)
        second = push(registry, adapter_dirs["all-r8"], "team/a1")
        assert second["version"] == 1 and second["sha256"] != first["sha256"]
        started = time.monotonic()
        while _completion(http, "team/a1").status_code != 200:
            assert time.monotonic() - started < PROPAGATION_S
            time.sleep(0.02)
        expected = ("team/a1@1", second["sha256"], _expected(reference, "all-r8"))
        for model in ("team/a1", "team/a1@1", "team/a1:latest"):
            assert _served(http, model) == expected
        listed = _adapters(http)["team/a1"]
    assert (listed["ref"], listed["sha256"], listed["rank"]) == ("team/a1@1", second["sha256"], 8)


def _load(http: httpx.Client, name: str, path: Path, headers: dict) -> httpx.Response:
    return http.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)}, headers=headers)


@pytest.mark.parametrize("admin_key", [None, "admin-key"])
def test_path_loads_never_take_over_registry_names(serve, file_registry, adapter_dirs, reference, admin_key):
    pushed = push(file_registry, adapter_dirs["attn-r4"], "team/a1", "prod")
    server = serve(file_registry, admin_key=admin_key)
    admin = {"Authorization": f"Bearer {admin_key}"} if admin_key else {}
    registry_weights = ("team/a1@1", pushed["sha256"], _expected(reference, "attn-r4"))
    with server.client() as http:
        assert _served(http, "team/a1") == registry_weights  # resident before the attempts
        for name in ("team/a1@1", "team/a1", "team/a1:prod", "team/not-pushed-yet", "other/x"):
            response = _load(http, name, adapter_dirs["all-r8"], admin)
            assert response.status_code == 400, (name, response.text)
            error = response.json()["error"]
            assert error["param"] == "lora_name" and "registry" in error["message"]
            unload = http.post("/v1/unload_lora_adapter", json={"lora_name": name}, headers=admin)
            assert unload.status_code in (400, 404) and unload.json()["error"]["param"] == "lora_name"
        for model in ("team/a1", "team/a1@1", "team/a1:prod"):
            assert _served(http, model) == registry_weights
        assert _completion(http, "team/not-pushed-yet").status_code == 404
        # A name of its own is fine, and it is listed as loaded from a path.
        assert _load(http, "a1-local", adapter_dirs["all-r8"], admin).status_code == 200
        name, sha, tokens = _served(http, "a1-local")
        assert (name, tokens) == ("a1-local", _expected(reference, "all-r8"))
        listed = _adapters(http)
        assert listed["a1-local"]["source"] == "path" and listed["a1-local"]["sha256"] == sha
        assert listed["team/a1"]["sha256"] == pushed["sha256"]
        # LoRAX's adapter_source "local" is a path load too: same key, a name of its own.
        tgi = {"inputs": PROMPT, "parameters": {"adapter_id": str(adapter_dirs["o-r16"]), "adapter_source": "local"}}
        if admin_key:
            assert http.post("/generate", json=tgi).status_code == 401
        response = http.post("/generate", json=tgi, headers=admin)
        assert response.status_code == 200 and "/" not in response.headers["x-kvrun-adapter"], response.text
        assert _served(http, "team/a1") == registry_weights


def test_path_names_may_hold_slashes_without_a_registry(serve, adapter_dirs, reference):
    """With `--registry none` no registry name exists, so vLLM-style names such as `org/adapter` keep working."""
    server = serve(None)
    with server.client() as http:
        assert _load(http, "org/adapter", adapter_dirs["o-r16"], {}).status_code == 200
        assert _served(http, "org/adapter")[2] == _expected(reference, "o-r16")
