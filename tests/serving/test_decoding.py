"""Request decoding: strict types, `null` = not given, unknown fields ignored with one warning per name, and bodies
that are not UTF-8 JSON objects (or nest too deep) refused with 400 saying why — on every generating route."""

from __future__ import annotations

import logging

import openai
import pytest

from kvrun.serving import errors
from kvrun.serving.decoding import MAX_DEPTH, decode
from kvrun.serving.schemas import ChatCompletionRequest, CompletionRequest, GenerateRequest

PROMPT = "Hello there"
ROUTES = [("/v1/completions", "openai"), ("/v1/chat/completions", "openai"), ("/generate", "tgi"), ("/", "tgi"),
          ("/generate_stream", "tgi")]  # fmt: skip


def _message(response, shape: str) -> str:
    assert response.status_code == 400, response.text
    body = response.json()
    return body["error"]["message"] if shape == "openai" else body["error"]


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b"", "empty"),
        (b"   ", "empty"),
        (b'{"model": "x", "prompt": "\xff\xfe"}', "UTF-8"),
        (b"[" * (MAX_DEPTH + 1) + b"]" * (MAX_DEPTH + 1), f"deeper than {MAX_DEPTH}"),
        (b"[" * 5000 + b"]" * 5000, f"deeper than {MAX_DEPTH}"),  # past the JSON parser's own recursion bound
        (b'{"a": ' * 70 + b"1" + b"}" * 70, f"deeper than {MAX_DEPTH}"),
        (b"[1, 2]", "must be a JSON object"),
        (b'"text"', "must be a JSON object"),
        (b"{not json", "not valid JSON"),
    ],
)
@pytest.mark.parametrize(("route", "shape"), ROUTES)
def test_malformed_bodies_are_400_saying_why(shared_server, route, shape, body, expected):
    with shared_server.client() as http:
        response = http.post(route, content=body, headers={"Content-Type": "application/json"})
    assert expected in _message(response, shape)


def test_nulls_mean_not_given(shared_server):
    """What the openai SDK, LangChain and vLLM's own clients send for unset fields."""
    base = shared_server.serving.model_name
    body = {"model": base, "messages": [{"role": "user", "content": "Hi", "name": None}], "max_tokens": 4,
            "temperature": 0, "n": None, "stream": None, "logprobs": None, "top_logprobs": None,
            "presence_penalty": None, "frequency_penalty": None, "stop": None, "seed": None, "stream_options": None,
            "response_format": None, "tools": None, "tool_choice": None, "user": None, "ignore_eos": None,
            "min_p": None, "repetition_penalty": None, "skip_special_tokens": None}  # fmt: skip
    with shared_server.client() as http:
        with_nulls = http.post("/v1/chat/completions", json=body)
        plain = http.post("/v1/chat/completions", json={key: body[key] for key in ("model", "messages", "max_tokens",
                                                                                   "temperature")})  # fmt: skip
        tgi = http.post("/generate", json={"inputs": PROMPT, "parameters": {
            "max_new_tokens": 3, "merged_adapters": None, "adapter_source": None, "response_format": None,
            "return_k_alternatives": None, "repetition_penalty": None, "stop": None}})  # fmt: skip
    assert with_nulls.status_code == 200, with_nulls.text
    assert with_nulls.json()["choices"][0]["message"] == plain.json()["choices"][0]["message"]
    assert tgi.status_code == 200, tgi.text


def test_unknown_fields_are_ignored_with_one_warning_per_name(shared_server, caplog):
    client = openai.OpenAI(base_url=f"{shared_server.url}/v1", api_key="x", max_retries=0)
    extra = {"prompt_cache_key": "k", "reasoning_effort": "low", "kvrun_test_unknown_field": 1,
             "stream_options": {"include_usage": True, "kvrun_test_nested": 2}}  # fmt: skip
    caplog.set_level(logging.WARNING, logger="kvrun.serving.decoding")
    for _ in range(3):
        stream = client.chat.completions.create(model=shared_server.serving.model_name, max_tokens=2, stream=True,
                                                messages=[{"role": "user", "content": "Hi"}], extra_body=extra)
        assert list(stream)[-1].usage.completion_tokens == 2  # the known nested field still worked
    warned = [record.getMessage() for record in caplog.records if "kvrun_test_" in record.getMessage()]
    assert len(warned) == 2
    assert "'kvrun_test_unknown_field'" in warned[0] and "'stream_options.kvrun_test_nested'" in warned[1]


def test_decode_names_the_field_and_refuses_loose_types():
    cases = [
        (b'{"model": "m", "prompt": "p", "max_tokens": "3"}', CompletionRequest, "max_tokens"),
        (b'{"model": "m", "prompt": "p", "echo": "false"}', CompletionRequest, "echo"),
        (b'{"model": "m", "prompt": "p", "temperature": "0.5"}', CompletionRequest, "temperature"),
        (b'{"model": "m", "messages": [{"role": "robot", "content": "x"}]}', ChatCompletionRequest,
         "messages[0].role"),
        (b'{"model": "m", "messages": [{"role": "user", "content": 5}]}', ChatCompletionRequest,
         "messages[0].content"),
        (b'{"model": "m"}', ChatCompletionRequest, "messages"),
        (b'{"prompt": "p"}', CompletionRequest, "model"),
        (b'{"model": null, "prompt": "p"}', CompletionRequest, "model"),
        (b'{"inputs": "x", "parameters": {"seed": "1"}}', GenerateRequest, "parameters.seed"),
        (b'{"inputs": "x", "parameters": {"details": 1}}', GenerateRequest, "parameters.details"),
    ]
    for body, type_, field in cases:
        with pytest.raises(errors.ApiError) as raised:
            decode(body, type_)
        assert raised.value.status == 400 and raised.value.param == field, (body, raised.value.message)
        assert raised.value.message.startswith(f"{field}: ")


def test_decode_keeps_what_is_valid():
    request = decode(b'{"model": "m", "prompt": [1, 2], "temperature": 1, "n": null, "typo": 1}', CompletionRequest)
    assert request.prompt == [1, 2] and request.temperature == 1.0 and request.n == 1
    chat = decode(b'{"model": "m", "messages": [{"role": "assistant", "content": null, "refusal": null, '
                  b'"tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]}',
                  ChatCompletionRequest)  # fmt: skip
    assert chat.messages[0].tool_calls[0].function.name == "f"
