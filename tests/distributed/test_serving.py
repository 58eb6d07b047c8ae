"""`kvrun serve --tensor-parallel-size 2` on CPU: an adapter pushed to the registry while the server runs is
hot-loaded into a slot on both ranks and answers as on one device; /metrics and /v1/adapters report its residency
once; a worker that dies stops the server with the reason."""

from __future__ import annotations

import os
import shutil
import signal

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from kvrun import LLM, SamplingParams
from kvrun.runtime.loader import resolve_model
from kvrun.serving.main import _StartupFailure, _stop_when_a_worker_dies
from tests.factories import AdapterSpec, tiny_llama
from tests.serving.conftest import TOKENIZER_FILES, VOCAB, amplified_adapter, push, server_config
from tests.serving.server import start_server

PROMPT = "The sea is"
MAX_TOKENS = 6


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp-serving")
    base = tiny_llama(root / "base", num_heads=4, num_kv_heads=2, tie=False, vocab=VOCAB)
    for name in TOKENIZER_FILES:
        shutil.copy(resolve_model(None) / name, base / name)
    spec = AdapterSpec("all-r8", 8, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
    return base, amplified_adapter(base, spec, root / "adapter", seed=4)


def test_hot_loaded_adapter_on_two_ranks_reported_once(model, tmp_path):
    base, adapter = model
    single = LLM(str(base), max_loras=2, max_lora_rank=16, num_blocks=256, block_size=4)
    single.load_adapter("team/x", adapter)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    expected = {name: single.generate(PROMPT, params, adapters=name)[0].text for name in ("team/x", None)}
    assert expected["team/x"] != expected[None]

    registry = f"file://{tmp_path / 'registry'}"
    server = start_server(server_config(base, registry, tensor_parallel_size=2, max_loras=2))
    try:
        with server.client() as http:
            push(registry, adapter, "team/x")  # after start: loaded on first use, into both ranks' slots
            for name in ("team/x", server.serving.model_name):
                body = {"model": name, "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0.0,
                        "ignore_eos": True}  # fmt: skip
                reply = http.post("/v1/completions", json=body)
                assert reply.status_code == 200, reply.text
                want = expected["team/x" if name == "team/x" else None]
                assert reply.json()["choices"][0]["text"] == want
            families = {f.name: f for f in text_string_to_metric_families(http.get("/metrics").text)}
            assert families["kvrun_tensor_parallel_size"].samples[0].value == 2
            info = families["vllm:lora_requests_info"].samples[0].labels
            assert info["resident_lora_adapters"] == "team/x@1"
            listed = [entry for entry in http.get("/v1/adapters").json()["data"] if entry["id"].startswith("team/x")]
            assert len(listed) == 1 and listed[0]["state"] == "gpu" and listed[0]["slot"] is not None
    finally:
        server.stop()


def test_dead_worker_stops_the_server_with_the_reason(model):
    base, _ = model
    server = start_server(server_config(base, None, tensor_parallel_size=2, engine_process=False))  # its workers
    failure = _StartupFailure()
    _stop_when_a_worker_dies(server.serving.client.engine, server.server, failure)
    try:
        worker = server.serving.client.engine.runner.workers.processes[0]
        os.kill(worker.pid, signal.SIGKILL)
        server.thread.join(30)
        assert not server.thread.is_alive(), "the server kept running without its worker"
        assert "rank 1" in str(failure.error) and "exited with code -9" in str(failure.error)
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{server.url}/health", timeout=5)
    finally:
        server.stop()
