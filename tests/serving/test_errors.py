"""Every error path: status code, OpenAI's error shape on /v1/*, TGI's on /generate*, and the field named."""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from tests.serving.conftest import push

PROMPT = "Hello there"


def _openai_error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


def _tgi_error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "error_type"}
    return body


def test_unknown_adapter_is_404(shared_server):
    client = openai.OpenAI(base_url=f"{shared_server.url}/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.NotFoundError) as raised:
        client.completions.create(model="team/missing", prompt=PROMPT, max_tokens=2)
    assert raised.value.body["code"] == "model_not_found" and raised.value.body["param"] == "model"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="team/all-r8@99", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="Not A Ref!", prompt=PROMPT, max_tokens=2)
    with shared_server.client() as http:
        body = {"inputs": PROMPT, "parameters": {"adapter_id": "team/all-r8:nosuchtag"}}
        assert _tgi_error(http.post("/generate", json=body), 404)["error_type"] == "not_found"
        assert _tgi_error(http.post("/generate_stream", json=body), 404)["error_type"] == "not_found"
        _openai_error(http.post("/v1/unload_lora_adapter", json={"lora_name": "never-loaded"}), 404)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"temperature": 5}, "temperature"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"n": 0}, "n"),
        ({"top_p": 0}, "top_p"),
        ({"max_tokens": 5000}, "max_tokens"),  # prompt + max_tokens beyond the context
        ({"prompt": [1, 2, 10**9]}, "prompt"),
        ({"max_tokens": "3"}, "max_tokens"),  # numbers as strings are refused, as OpenAI and vLLM refuse them
        ({"stream": "false"}, "stream"),
        ({"stop": 5}, "stop"),
        ({"logit_bias": {"abc": 1}}, "logit_bias"),
        ({"logit_bias": {"7": 500}}, "logit_bias"),
        # Integers past 64 bits: refused by name, as the engine core's messages could not carry them.
        ({"seed": 2**64}, "seed"),
        ({"top_k": 2**64}, "top_k"),
        ({"stop_token_ids": [2**64]}, "stop_token_ids"),
        ({"response_format": {"type": "xml"}}, "response_format.type"),
        ({"stream_options": {"include_usage": "yes"}}, "stream_options.include_usage"),
        ({"guided_json": "{not json"}, "guided_json"),
        ({"guided_regex": "a+", "guided_choice": ["a"]}, "guided_choice"),
    ],
)
def test_invalid_completion_parameters_are_400_naming_the_field(shared_server, body, param):
    with shared_server.client() as http:
        response = http.post("/v1/completions", json={"model": "team/all-r8", "prompt": PROMPT, **body})
    error = _openai_error(response, 400)
    assert error["param"] == param and param.split(".")[-1] in error["message"]


def test_too_long_prompt_is_400(shared_server):
    with shared_server.client() as http:
        response = http.post("/v1/completions", json={"model": "o-r16", "prompt": "word " * 2100, "max_tokens": 1})
        assert "context length" in _openai_error(response, 400)["message"]
        chat = {"model": "o-r16", "messages": [{"role": "user", "content": "word " * 2100}]}
        assert _openai_error(http.post("/v1/chat/completions", json=chat), 400)["param"] == "messages"
        tgi = {"inputs": "word " * 2100, "parameters": {"max_new_tokens": 5}}
        assert "context length" in _tgi_error(http.post("/generate", json=tgi), 400)["error"]


def test_invalid_tgi_parameters_are_400(shared_server):
    with shared_server.client() as http:
        text = {"inputs": PROMPT, "parameters": {"max_new_tokens": "5"}}
        assert "parameters.max_new_tokens" in _tgi_error(http.post("/generate", json=text), 400)["error"]
        negative = {"inputs": PROMPT, "parameters": {"temperature": -1}}
        assert "temperature" in _tgi_error(http.post("/generate_stream", json=negative), 400)["error"]
        assert "temperature" in _tgi_error(http.post("/", json={**negative, "stream": True}), 400)["error"]
        unsupported = {"inputs": PROMPT, "parameters": {"watermark": True}}
        assert "watermark" in _tgi_error(http.post("/generate", json=unsupported), 400)["error"]
        assert _tgi_error(http.post("/generate", content=b"{not json"), 400)["error_type"] == "validation"
        _openai_error(http.post("/v1/chat/completions", json={"model": "o-r16", "messages": []}), 400)


def test_incompatible_adapter_is_422(serve, file_registry, foreign_adapter):
    push(file_registry, foreign_adapter, "team/foreign")
    server = serve(file_registry)
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.UnprocessableEntityError) as raised:
        client.completions.create(model="team/foreign", prompt=PROMPT, max_tokens=2)
    assert "shape" in raised.value.message
    with server.client() as http:
        body = {"inputs": PROMPT, "parameters": {"adapter_id": "team/foreign"}}
        assert _tgi_error(http.post("/generate", json=body), 422)["error_type"] == "adapter_incompatible"
        load = {"lora_name": "foreign", "lora_path": str(foreign_adapter)}
        _openai_error(http.post("/v1/load_lora_adapter", json=load), 422)
        missing = {"lora_name": "nowhere", "lora_path": "/no/such/dir"}
        assert _openai_error(http.post("/v1/load_lora_adapter", json=missing), 400)["param"] == "lora_path"


def test_keys_are_required(serve, adapter_dirs):
    server = serve(None, api_key="user-key", admin_key="admin-key")
    base = server.serving.model_name
    completion = {"model": base, "prompt": PROMPT, "max_tokens": 2}
    load = {"lora_name": "qkv", "lora_path": str(adapter_dirs["qkv-r8"])}
    with server.client() as http:
        assert _openai_error(http.post("/v1/completions", json=completion), 401)["type"] == "authentication_error"
        wrong = {"Authorization": "Bearer nope"}
        _openai_error(http.post("/v1/completions", json=completion, headers=wrong), 401)
        _openai_error(http.get("/v1/models"), 401)
        _tgi_error(http.post("/generate", json={"inputs": PROMPT}), 401)
        user, admin = {"Authorization": "Bearer user-key"}, {"Authorization": "Bearer admin-key"}
        assert http.post("/v1/completions", json=completion, headers=user).status_code == 200
        _openai_error(http.post("/v1/load_lora_adapter", json=load, headers=user), 401)
        assert http.post("/v1/load_lora_adapter", json=load, headers=admin).status_code == 200
        assert http.get("/health").status_code == 200  # probes need no key
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="user-key", max_retries=0)
    assert client.completions.create(model="qkv", prompt=PROMPT, max_tokens=2).choices[0].text is not None
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="bad", max_retries=0).models.list()


def test_full_queue_and_slot_wait_timeout(serve, adapter_dirs):
    """One slot and two sequences: a second adapter waits for the slot (bounded), a third request is refused."""
    server = serve(None, max_loras=1, max_cpu_loras=2, max_num_seqs=2, max_queue=0, queue_timeout_s=1.5)
    with server.client() as http:
        for name in ("down-r4", "o-r16"):
            load = {"lora_name": name, "lora_path": str(adapter_dirs[name])}
            assert http.post("/v1/load_lora_adapter", json=load).status_code == 200
        long = {"model": "down-r4", "prompt": PROMPT, "max_tokens": 1800, "ignore_eos": True, "stream": True}
        with http.stream("POST", "/v1/completions", json=long) as holder:
            lines = holder.iter_lines()  # kept: a dropped iterator closes the connection, which aborts the request
            next(lines)  # the slot is pinned by a running request now
            started = time.monotonic()
            waiting = http.post("/v1/completions", json={"model": "o-r16", "prompt": PROMPT, "max_tokens": 2})
            assert 1.4 < time.monotonic() - started < 10
            error = _openai_error(waiting, 503)
            assert waiting.headers["retry-after"] and error["code"] == "overloaded"
            with http.stream("POST", "/v1/completions", json={**long, "model": server.serving.model_name}) as base:
                base_lines = base.iter_lines()
                next(base_lines)
                full = http.post("/v1/completions", json={"model": "down-r4", "prompt": PROMPT, "max_tokens": 2})
                assert _openai_error(full, 503)["type"] == "server_overloaded"
                assert int(full.headers["retry-after"]) >= 1
                tgi = http.post("/generate", json={"inputs": PROMPT})
                assert _tgi_error(tgi, 429)["error_type"] == "overloaded" and tgi.headers["retry-after"]


def test_load_and_unload_bodies_are_read_as_vllm_sends_them(serve, adapter_dirs, caplog):
    """null means "not given", unknown fields are ignored (one warning each), a wrong type is a 400 naming it."""
    server = serve(None)
    path = str(adapter_dirs["qkv-r8"])
    with server.client() as http:
        load = {"lora_name": "lenient", "lora_path": path, "load_inplace": None, "lora_int_id": None,
                "base_model_name": "whatever", "kvrun_test_load_field": 1}  # fmt: skip
        with caplog.at_level("WARNING", logger="kvrun.serving.decoding"):
            assert http.post("/v1/load_lora_adapter", json=load).status_code == 200
        assert "kvrun_test_load_field" in caplog.text
        typed = _openai_error(http.post("/v1/load_lora_adapter", json={"lora_name": 7, "lora_path": path}), 400)
        assert typed["param"] == "lora_name"
        for bad_path in ("a" * 5000, "~kvrun-no-such-user/x", "a\u0000b"):  # too long, unknown ~user, a NUL byte
            response = http.post("/v1/load_lora_adapter", json={"lora_name": "p", "lora_path": bad_path})
            assert _openai_error(response, 400)["param"] == "lora_path"
        for bad_path in ("/" + "a/" * 3000, "~kvrun-no-such-user/x"):  # LoRAX's local source: 400, not 500
            body = {"inputs": "Hi", "parameters": {"adapter_id": bad_path, "adapter_source": "local"}}
            assert http.post("/generate", json=body).status_code == 400
        unload = {"lora_name": "lenient", "lora_int_id": None, "kvrun_test_unload_field": True}
        assert http.post("/v1/unload_lora_adapter", json=unload).status_code == 200
        _openai_error(http.post("/v1/unload_lora_adapter", json={"lora_name": "lenient"}), 404)


def test_a_request_template_runs_only_where_the_server_trusts_it(serve):
    """chat_template_kwargs carries template variables. A template of the request's own is code the server would
    run (a loop in it stalls every request): refused unless the server was started with
    --trust-request-chat-template. Arguments of the rendering itself (tokenize, ...) are never accepted."""
    messages = [{"role": "user", "content": "Hi"}]
    template = "{% for m in messages %}<{{ m.content }}>{% endfor %}"
    untrusted, trusted = serve(None), serve(None, trust_request_chat_template=True)
    with untrusted.client() as http:
        model = http.get("/v1/models").json()["data"][0]["id"]
        for key, value in (("chat_template", template), ("tokenize", True)):
            body = {"model": model, "messages": messages, "max_tokens": 1, "chat_template_kwargs": {key: value}}
            error = _openai_error(http.post("/v1/chat/completions", json=body), 400)
            assert error["param"] == f"chat_template_kwargs.{key}"
        variables = {"model": model, "messages": messages, "max_tokens": 1,
                     "chat_template_kwargs": {"enable_thinking": False}}  # fmt: skip
        assert http.post("/v1/chat/completions", json=variables).status_code == 200
    with trusted.client() as http:
        body = {"model": model, "messages": messages, "chat_template_kwargs": {"chat_template": template}}
        rendered = http.post("/tokenize", json=body)
        assert rendered.status_code == 200, rendered.text
        plain = http.post("/tokenize", json={"model": model, "prompt": "<Hi>"})
        assert rendered.json()["tokens"] == plain.json()["tokens"]
