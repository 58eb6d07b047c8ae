"""/metrics as Prometheus and gateways read it: parsed with prometheus_client's own parser; vLLM's names beside
kvrun's; `vllm:lora_requests_info` names adapters canonically (however clients spelled them) and lists idle ones
still resident in a slot."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.serving.conftest import push

PROMPT = "The sea is"


def _scrape(server) -> dict:
    text = httpx.get(f"{server.url}/metrics", timeout=30).text
    return {family.name: family for family in text_string_to_metric_families(text)}


def _samples(families: dict, name: str) -> list:
    return [sample for sample in families[name].samples]


def test_vllm_names_and_canonical_lora_info(serve, file_registry, adapter_dirs):
    push(file_registry, adapter_dirs["attn-r4"], "team/x", "prod")
    server = serve(file_registry)
    base = server.serving.model_name
    with server.client() as http:
        for model in ("team/x", "team/x:prod", "team/x@1", base):  # three spellings of one adapter version
            body = {"model": model, "prompt": PROMPT, "max_tokens": 3, "ignore_eos": True}
            assert http.post("/v1/completions", json=body).status_code == 200
        streamed = {"model": "team/x:prod", "prompt": PROMPT, "max_tokens": 4, "stream": True, "ignore_eos": True}
        assert http.post("/v1/completions", json=streamed).status_code == 200
    families = _scrape(server)
    # vLLM's histograms and counters, labelled with the served model's name
    for name in ("vllm:time_to_first_token_seconds", "vllm:inter_token_latency_seconds",
                 "vllm:e2e_request_latency_seconds", "vllm:time_per_output_token_seconds",
                 "vllm:request_queue_time_seconds"):  # fmt: skip
        assert families[name].type == "histogram"
        count = next(s for s in _samples(families, name) if s.name.endswith("_count"))
        assert count.labels == {"model_name": base} and count.value >= 4
    e2e = next(s for s in _samples(families, "vllm:e2e_request_latency_seconds") if s.name.endswith("_count"))
    assert e2e.value == 5
    queued = {s.name.rsplit("_", 1)[-1]: s.value for s in _samples(families, "vllm:request_queue_time_seconds")
              if not s.name.endswith("_bucket")}  # fmt: skip
    assert queued["count"] == 5 and 0 <= queued["sum"] < 5 * 60  # once per request, from arrival to its first step
    generated = _samples(families, "vllm:generation_tokens")
    assert generated[0].value == 4 * 3 + 4 and generated[0].labels == {"model_name": base}
    success = {s.labels["finished_reason"]: s.value for s in _samples(families, "vllm:request_success")}
    assert success == {"length": 5}
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"):
        assert families[name].type == "gauge" and _samples(families, name)[0].labels == {"model_name": base}
    # kvrun's own per-adapter counters keep the spelling clients used
    per_adapter = {s.labels["adapter"]: s.value for s in _samples(families, "kvrun_adapter_requests")}
    assert per_adapter == {"team/x": 1, "team/x:prod": 2, "team/x@1": 1, base: 1}
    # one canonical adapter, idle but resident in its slot
    info = _samples(families, "vllm:lora_requests_info")[0].labels
    assert info["max_lora"] == "4" and info["running_lora_adapters"] == "" and info["waiting_lora_adapters"] == ""
    assert info["resident_lora_adapters"] == "team/x@1"


def test_running_adapters_are_canonical_while_streaming(serve, file_registry, adapter_dirs):
    push(file_registry, adapter_dirs["ko-r2"], "team/y", "prod")
    server = serve(file_registry)
    body = {"model": "team/y:prod", "prompt": PROMPT, "max_tokens": 1500, "stream": True, "ignore_eos": True}
    with server.client() as http, http.stream("POST", "/v1/completions", json=body) as response:
        lines = response.iter_lines()
        next(lines)  # a token came: the request is running and pins its slot
        info = _samples(_scrape(server), "vllm:lora_requests_info")[0].labels
        running = _samples(_scrape(server), "vllm:num_requests_running")[0].value
    assert info["running_lora_adapters"] == "team/y@1" and running == 1
