"""Tool calling: what `tools` / `tool_choice` ask of generation (the JSON-schema constraint), how finished text
becomes OpenAI tool calls, and the refusals (unknown function, `auto` without a template that renders tools)."""

from __future__ import annotations

import json
from typing import Literal

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


CITY = {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]}, "days": {"type": "integer",
        "minimum": 1, "maximum": 9}}, "required": ["city", "days"]}  # fmt: skip
FINITE_TOOLS = [{"type": "function", "function": {"name": "forecast", "parameters": CITY}},
                {"type": "function", "function": {"name": "clock", "parameters": {
                    "type": "object", "properties": {"utc": {"type": "boolean"}}, "required": ["utc"]}}}]  # fmt: skip


def test_http_named_and_required_tool_calls_follow_the_schemas(shared_server):
    """A tiny random model: only the grammar makes its output a call, and every schema here has a finite language."""
    client = openai.OpenAI(base_url=f"{shared_server.url}/v1", api_key="x", max_retries=0)
    base = shared_server.serving.model_name
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    named = client.chat.completions.create(model=base, messages=messages, tools=FINITE_TOOLS, max_tokens=40,
                                           temperature=0, tool_choice={"type": "function",
                                                                       "function": {"name": "forecast"}})  # fmt: skip
    choice = named.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    arguments = json.loads(call.function.arguments)
    assert call.function.name == "forecast" and arguments["city"] in ("Paris", "Oslo") and 1 <= arguments["days"] <= 9
    required = client.chat.completions.create(model=base, messages=messages, tools=FINITE_TOOLS, max_tokens=120,
                                              temperature=0.8, seed=3, tool_choice="required", n=2)  # fmt: skip
    for choice in required.choices:
        assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
        for call in choice.message.tool_calls:
            arguments = json.loads(call.function.arguments)
            assert call.function.name in ("forecast", "clock")
            assert set(arguments) == ({"city", "days"} if call.function.name == "forecast" else {"utc"})
    stream = client.chat.completions.create(model=base, messages=messages, tools=FINITE_TOOLS, max_tokens=40,
                                            temperature=0, stream=True, tool_choice={
                                                "type": "function", "function": {"name": "forecast"}})  # fmt: skip
    calls = [call for chunk in stream if chunk.choices for call in chunk.choices[0].delta.tool_calls or []]
    assert [json.loads(call.function.arguments) for call in calls] == [json.loads(named.choices[0].message.tool_calls[0].function.arguments)]


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_langchain_with_structured_output(shared_server, method):
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel, Field

    class Forecast(BaseModel):
        """A forecast request."""

        city: Literal["Paris", "Oslo"]
        days: int = Field(ge=1, le=9)

    chat = ChatOpenAI(base_url=f"{shared_server.url}/v1", api_key="x", model=shared_server.serving.model_name,
                      max_tokens=40, temperature=0, max_retries=0)  # fmt: skip
    result = chat.with_structured_output(Forecast, method=method).invoke("Weather in Oslo for 3 days?")
    assert isinstance(result, Forecast)


def test_tool_json_nested_deeper_than_python_parses_is_returned_as_text():
    """A recursive schema lets the grammar force `[[[[...`; parsing that must hand the text back, not raise (a 500, or
    a stream cut without an error event)."""
    from kvrun.serving.tools import ToolPlan

    deep = "[" * 100_000 + "]" * 100_000
    for mode in ("named", "required", "auto"):
        text = deep if mode != "auto" else f"<tool_call>{deep}</tool_call>"
        assert parse(ToolPlan(mode, None, "f"), text) == (text, [])
