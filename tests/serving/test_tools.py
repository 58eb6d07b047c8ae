"""Tool calling: what `tools` / `tool_choice` ask of generation (the JSON-schema constraint), how finished text
becomes OpenAI tool calls, and the refusals (unknown function, `auto` without a template that renders tools)."""

from __future__ import annotations

import json

import openai
import pytest

from kvrun.serving import errors
from kvrun.serving.decoding import decode
from kvrun.serving.schemas import ChatCompletionRequest
from kvrun.serving.tools import parse, plan

WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
TOOLS = [{"type": "function", "function": {"name": "weather", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "time", "description": "now"}}]  # fmt: skip
TOOLS_TEMPLATE = "{% if tools %}TOOLS {{ tools | tojson }}{% endif %}{% for m in messages %}{{ m['content'] }}{% endfor %}"


class _Tokenizer:
    def __init__(self, template: str) -> None:
        self.chat_template = template


def _request(**fields) -> ChatCompletionRequest:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "tools": TOOLS, **fields}
    return decode(json.dumps(body).encode(), ChatCompletionRequest)


def test_named_function_is_constrained_to_its_parameters():
    tool_plan = plan(_request(tool_choice={"type": "function", "function": {"name": "weather"}}), _Tokenizer(""))
    assert tool_plan.mode == "named" and tool_plan.constraint.json == WEATHER
    content, calls = parse(tool_plan, '{"city": "Paris"}')
    assert content is None and calls[0]["function"] == {"name": "weather", "arguments": '{"city": "Paris"}'}
    assert calls[0]["type"] == "function" and calls[0]["id"].startswith("call_")
    assert parse(tool_plan, '{"city": "Par') == ('{"city": "Par', [])  # cut off by max_tokens: text, no call


def test_required_is_an_array_of_calls_to_the_given_tools():
    tool_plan = plan(_request(tool_choice="required"), _Tokenizer(""))
    schema = tool_plan.constraint.json
    assert schema["type"] == "array" and schema["minItems"] == 1
    names = [item["properties"]["name"]["const"] for item in schema["items"]["anyOf"]]
    assert names == ["weather", "time"] and schema["items"]["anyOf"][1]["properties"]["parameters"] == {"type": "object"}
    _, calls = parse(tool_plan, '[{"name": "time", "parameters": {}}, {"name": "weather", "parameters": {"city": "X"}}]')
    assert [(call["function"]["name"], json.loads(call["function"]["arguments"])) for call in calls] == [
        ("time", {}), ("weather", {"city": "X"})]  # fmt: skip


def test_auto_needs_a_template_that_renders_tools():
    with pytest.raises(errors.ApiError) as raised:
        plan(_request(), _Tokenizer("{% for m in messages %}{{ m['content'] }}{% endfor %}"))
    assert raised.value.param == "tool_choice" and "renders tools" in raised.value.message
    tool_plan = plan(_request(tool_choice="auto"), _Tokenizer(TOOLS_TEMPLATE))
    assert tool_plan.mode == "auto" and tool_plan.constraint is None
    text = 'Let me look.\n<tool_call>\n{"name": "weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    content, calls = parse(tool_plan, text)
    assert content == "Let me look." and json.loads(calls[0]["function"]["arguments"]) == {"city": "Oslo"}
    assert parse(tool_plan, "no calls here") == ("no calls here", [])


def test_refusals_name_the_field():
    with pytest.raises(errors.ApiError) as raised:
        plan(_request(tool_choice={"type": "function", "function": {"name": "nope"}}), _Tokenizer(""))
    assert raised.value.param == "tool_choice" and "'nope'" in raised.value.message
    with pytest.raises(errors.ApiError) as raised:
        plan(_request(tools=None, tool_choice="required"), _Tokenizer(""))
    assert raised.value.param == "tool_choice"
    assert plan(_request(tool_choice="none"), _Tokenizer("")) is None


def test_http_tool_choice_none_and_auto_refusal(shared_server):
    client = openai.OpenAI(base_url=f"{shared_server.url}/v1", api_key="x", max_retries=0)
    base = shared_server.serving.model_name
    reply = client.chat.completions.create(model=base, messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                           tools=TOOLS, tool_choice="none")  # fmt: skip
    assert reply.choices[0].message.tool_calls in (None, []) and reply.choices[0].message.content is not None
    with pytest.raises(openai.BadRequestError) as raised:  # the bundled template does not render tools
        client.chat.completions.create(model=base, messages=[{"role": "user", "content": "hi"}], tools=TOOLS)
    assert raised.value.body["param"] == "tool_choice"


def test_http_auto_renders_tools_into_the_prompt(serve):
    server = serve(None, chat_template=TOOLS_TEMPLATE)
    with server.client() as http:
        body = {"model": server.serving.model_name, "messages": [{"role": "user", "content": "hi"}], "tools": TOOLS}
        tokens = http.post("/tokenize", json=body).json()["tokens"]
        reply = http.post("/v1/chat/completions", json={**body, "max_tokens": 2})
    assert reply.status_code == 200, reply.text
    prompt = server.serving.tokenizer.decode(tokens)
    assert prompt.startswith("TOOLS [") and '"name": "weather"' in prompt
