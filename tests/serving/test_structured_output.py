"""Structured output over HTTP, through the clients users have: the openai SDK (`parse` with a pydantic model,
streaming, vLLM's guided_* extras), TGI's `text-generation` (grammar) and LoRAX's `lorax-client` (response_format).

The server runs a tiny random model, so every schema here has a finite language: whatever the model prefers, the
grammar ends it within max_tokens, and what comes back must parse."""

from __future__ import annotations

import json
import re
from typing import Literal

import lorax
import openai
import pytest
import text_generation
from pydantic import BaseModel
from text_generation.types import Grammar, GrammarType


class Verdict(BaseModel):
    answer: Literal["yes", "no", "maybe"]
    sure: bool


MESSAGES = [{"role": "user", "content": "Is the sky blue?"}]


def _client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)


@pytest.mark.parametrize("adapter", [None, "team/all-r8"])
def test_openai_parse_returns_the_pydantic_model(shared_server, adapter):
    client = _client(shared_server)
    model = adapter or shared_server.serving.model_name
    reply = client.chat.completions.parse(model=model, messages=MESSAGES, response_format=Verdict, max_tokens=48,
                                          temperature=0)  # fmt: skip
    choice = reply.choices[0]
    assert choice.finish_reason == "stop" and isinstance(choice.message.parsed, Verdict)
    stream = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=48, temperature=0, stream=True,
                                            response_format={"type": "json_schema", "json_schema": {
                                                "name": "verdict", "strict": True, "schema": Verdict.model_json_schema()}})  # fmt: skip
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert Verdict.model_validate_json(text) == choice.message.parsed  # greedy: the same JSON, streamed


def test_completions_guided_extras_and_n(shared_server):
    client = _client(shared_server)
    model = shared_server.serving.model_name
    choices = ["red", "green", "blue"]
    picked = client.completions.create(model=model, prompt="Colour:", max_tokens=8, n=3, temperature=1.0, seed=7,
                                       extra_body={"guided_choice": choices})  # fmt: skip
    assert len(picked.choices) == 3 and all(choice.text in choices for choice in picked.choices)
    number = client.completions.create(model=model, prompt="Code:", max_tokens=12, temperature=0,
                                       extra_body={"guided_regex": "[0-9]{3}-[A-Z]{2}"})  # fmt: skip
    assert re.fullmatch("[0-9]{3}-[A-Z]{2}", number.choices[0].text) and number.choices[0].finish_reason == "stop"
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    guided = client.completions.create(model=model, prompt="JSON:", max_tokens=16, temperature=0,
                                       extra_body={"guided_json": schema})  # fmt: skip
    assert isinstance(json.loads(guided.choices[0].text)["ok"], bool)
    unconstrained = client.completions.create(model=model, prompt="Colour:", max_tokens=4, temperature=0)
    assert unconstrained.choices[0].finish_reason == "length"


@pytest.mark.parametrize(
    ("path", "body", "param", "words"),
    [
        ("/v1/chat/completions", {"response_format": {"type": "json_schema", "json_schema": {
            "name": "x", "schema": {"type": "frob"}}}}, "response_format", 'Unsupported type "frob"'),
        ("/v1/completions", {"guided_regex": "(ab"}, "guided_regex", "regular expression"),
        ("/v1/completions", {"guided_choice": []}, "guided_choice", "at least one string"),
        ("/v1/completions", {"guided_grammar": "root ::= "}, "guided_grammar", "EBNF grammar"),
        ("/v1/completions", {"guided_json": {"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}},
         "guided_json", "nowhere"),
    ],
)  # fmt: skip
def test_specs_that_cannot_be_followed_are_400_naming_the_field(shared_server, path, body, param, words):
    request = {"model": shared_server.serving.model_name, "max_tokens": 4, **body}
    request.update({"messages": MESSAGES} if "chat" in path else {"prompt": "hi"})
    with shared_server.client() as http:
        response = http.post(path, json=request)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["message"].startswith(param) and words in error["message"]
    assert ".cc:" not in error["message"]


def test_tgi_grammar_and_lorax_response_format(shared_server):
    tgi = text_generation.Client(shared_server.url, timeout=60)
    regex = tgi.generate("Code:", max_new_tokens=12, grammar=Grammar(type=GrammarType.Regex, value="[0-9]{4}"))
    assert re.fullmatch("[0-9]{4}", regex.generated_text)
    as_json = tgi.generate("JSON:", max_new_tokens=48, grammar=Grammar(type=GrammarType.Json, value=Verdict.model_json_schema()))
    Verdict.model_validate_json(as_json.generated_text)
    client = lorax.Client(shared_server.url, timeout=60)
    response = client.generate("JSON:", adapter_id="team/all-r8", max_new_tokens=48,
                               response_format={"type": "json_object", "schema": Verdict.model_json_schema()})  # fmt: skip
    Verdict.model_validate_json(response.generated_text)
    with pytest.raises(text_generation.errors.ValidationError, match="parameters.grammar"):
        tgi.generate("x", max_new_tokens=2, grammar=Grammar(type=GrammarType.Regex, value="(ab"))
