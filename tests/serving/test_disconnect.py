"""Clients that hang up mid-request leave no KV blocks or slot pins behind; /metrics reports it all meanwhile."""

from __future__ import annotations

import re
import time

import httpx
import pytest

PROMPT = "A long story:"
LONG = {"prompt": PROMPT, "max_tokens": 1500, "temperature": 0, "ignore_eos": True}
SAMPLE = re.compile(r'^[a-zA-Z_:][a-zA-Z0-9_:]*(\{([a-zA-Z_]+="([^"\\]|\\.)*",?)*\})? -?[0-9.e+-]+(inf)?$')


def _metrics(http: httpx.Client) -> dict[str, float]:
    values = {}
    for line in http.get("/metrics").text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def _wait_until_idle(http: httpx.Client, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        metrics = _metrics(http)
        adapters = http.get("/v1/adapters").json()["data"]
        idle = (
            metrics["kvrun_kv_blocks_free"] == metrics["kvrun_kv_blocks_total"]
            and metrics["kvrun_requests_running"] == 0 and metrics["kvrun_requests_waiting"] == 0
            and metrics["kvrun_requests_in_flight"] == 0
            and all(entry["pinned"] == 0 and entry["in_flight"] == 0 for entry in adapters)
        )  # fmt: skip
        if idle:
            return
        assert time.monotonic() < deadline, f"still busy after the clients left: {metrics}, {adapters}"
        time.sleep(0.05)


def test_streaming_clients_that_disconnect_release_blocks_and_pins(shared_server):
    models = ["team/all-r8", "qkv-r8", "team/ko-r2", shared_server.serving.model_name]
    with shared_server.client() as http:
        _wait_until_idle(http)
        aborted_before = _metrics(http).get('kvrun_requests_total{endpoint="completions",outcome="abort"}', 0)
        streams, readers = [], []
        for model in models:
            body = {**LONG, "model": model, "stream": True}
            context = http.stream("POST", "/v1/completions", json=body)
            response = context.__enter__()
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")
            streams.append(context)
            readers.append(lines)
        metrics = _metrics(http)
        assert metrics["kvrun_kv_blocks_free"] < metrics["kvrun_kv_blocks_total"]
        info = next(name for name in metrics if name.startswith("vllm:lora_requests_info"))
        assert 'running_lora_adapters="' in info and "qkv-r8" in info and "team/all-r8" in info
        pinned = {entry["ref"]: entry["pinned"] for entry in http.get("/v1/adapters").json()["data"]}
        assert pinned["qkv-r8"] == 1 and pinned["team/all-r8@1"] == 1
        for context in streams:  # hang up mid-stream
            context.__exit__(None, None, None)
        _wait_until_idle(http)
        aborted = _metrics(http)['kvrun_requests_total{endpoint="completions",outcome="abort"}']
        assert aborted - aborted_before == len(models)


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/generate"])
def test_non_streaming_clients_that_disconnect_release_blocks_and_pins(shared_server, path):
    if path == "/generate":
        body = {"inputs": PROMPT, "parameters": {"adapter_id": "o-r16", "max_new_tokens": 1500}}
    else:
        body = {**LONG, "model": "o-r16", "messages": [{"role": "user", "content": PROMPT}]}
        del body["prompt"]
    endpoint = "generate" if path == "/generate" else "chat"
    counter = f'kvrun_requests_total{{endpoint="{endpoint}",outcome="abort"}}'
    with shared_server.client() as http:
        _wait_until_idle(http)
        aborted_before = _metrics(http).get(counter, 0)
        with pytest.raises(httpx.ReadTimeout):
            http.post(path, json=body, timeout=0.5)
        _wait_until_idle(http)
        assert _metrics(http)[counter] == aborted_before + 1


def test_metrics_are_prometheus_text(shared_server):
    with shared_server.client() as http:
        http.post("/v1/completions", json={"model": "down-r4", "prompt": PROMPT, "max_tokens": 3})
        response = http.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    lines = [line for line in response.text.splitlines() if line and not line.startswith("#")]
    bad = [line for line in lines if not SAMPLE.match(line)]
    assert not bad, bad[:3]
    text = response.text
    for name in ("kvrun_time_to_first_token_seconds_bucket", "kvrun_inter_token_latency_seconds_count",
                 "kvrun_request_latency_seconds_sum", "kvrun_generation_tokens_total", "kvrun_kv_cache_usage_ratio",
                 'kvrun_adapter_requests_total{adapter="down-r4"}', "vllm:num_requests_waiting",
                 'vllm:lora_requests_info{max_lora="4"', 'kvrun_adapter_resident{adapter="down-r4",location="gpu"}'):
        assert name in text, name  # fmt: skip
