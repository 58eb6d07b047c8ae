"""/v1/models lists only what this server can serve (the rest shows on /v1/adapters with the reason);
/v1/models/{id}; vLLM's /tokenize, /detokenize and /version; the periodic status line."""

from __future__ import annotations

import logging
import time

import openai
import pytest

from tests.serving.conftest import push, registry_cli


def test_models_lists_only_servable_adapters(serve, file_registry, adapter_dirs):
    push(file_registry, adapter_dirs["attn-r4"], "team/small", "prod")
    push(file_registry, adapter_dirs["mlp-r16"], "team/big", "prod")  # rank 16 > --max-lora-rank 8
    registry_cli(file_registry, "push", "--name", "team/other", "--base-model", "other-org/Other-Model-7B",
                 str(adapter_dirs["ko-r2"]))  # fmt: skip
    server = serve(file_registry, max_lora_rank=8)
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
    ids = {model.id for model in client.models.list().data}
    assert {"team/small", "team/small:prod", server.serving.model_name} <= ids
    assert not {"team/big", "team/big:prod", "team/other"} & ids
    with server.client() as http:
        adapters = {entry["id"]: entry for entry in http.get("/v1/adapters").json()["data"]}
    assert "exceeds this server's --max-lora-rank 8" in adapters["team/big"]["why_not_servable"]
    assert "other-org/Other-Model-7B" in adapters["team/other"]["why_not_servable"]
    assert adapters["team/small"]["why_not_servable"] is None
    assert client.models.retrieve("team/small:prod").root == "team/small@1"
    assert client.models.retrieve("team/small@1").parent == server.serving.model_name
    assert client.models.retrieve(server.serving.model_name).parent is None
    with pytest.raises(openai.NotFoundError) as raised:
        client.models.retrieve("team/big")
    assert "--max-lora-rank" in raised.value.message
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("team/never")


def test_tokenize_detokenize_version(shared_server, reference):
    base = shared_server.serving.model_name
    with shared_server.client() as http:
        tokens = http.post("/tokenize", json={"model": base, "prompt": "Hello world", "return_token_strs": True})
        assert tokens.status_code == 200, tokens.text
        body = tokens.json()
        assert body["tokens"] == reference.tokenizer.encode("Hello world") and body["count"] == len(body["tokens"])
        assert "".join(body["token_strs"]) == reference.tokenizer.decode(body["tokens"])
        text = http.post("/detokenize", json={"model": "team/all-r8", "tokens": body["tokens"]}).json()["prompt"]
        assert text == reference.tokenizer.decode(body["tokens"])
        assert http.post("/tokenize", json={"model": "team/none", "prompt": "x"}).status_code == 404
        assert http.post("/detokenize", json={"tokens": [10**9]}).json()["error"]["param"] == "tokens"
        assert http.post("/tokenize", json={"prompt": "x", "messages": []}).status_code == 400
        version = http.get("/version").json()["version"]
    assert version and version[0].isdigit()


def test_status_line_while_requests_run(serve, caplog):
    caplog.set_level(logging.INFO, logger="kvrun.serve")
    server = serve(None, log_interval_s=0.2)
    body = {"model": server.serving.model_name, "prompt": "The sea", "max_tokens": 40, "ignore_eos": True}
    with server.client() as http:
        assert http.post("/v1/completions", json=body).status_code == 200
    deadline = time.monotonic() + 10
    while not [r for r in caplog.records if "tok/s generated" in r.getMessage()] and time.monotonic() < deadline:
        time.sleep(0.1)
    lines = [record.getMessage() for record in caplog.records if "tok/s generated" in record.getMessage()]
    assert lines and "KV cache" in lines[0] and "adapters resident" in lines[0]
