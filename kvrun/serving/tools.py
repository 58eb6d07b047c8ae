"""OpenAI tool calling on /v1/chat/completions, as vLLM does it.

- `tool_choice` naming a function: the output is constrained to a JSON object of that function's `parameters`
  schema and returned as one tool call.
- `"required"`: the output is constrained to a JSON array of `{"name", "parameters"}` objects, one of the tools
  each, and returned as that many tool calls.
- `"auto"` (the default when tools are given): only where the model's chat template renders tools; the model
  writes calls in the Hermes format its template teaches (`<tool_call>{"name": ..., "arguments": ...}</tool_call>`),
  which are parsed out of the text. A template that does not render tools is refused by name: the model would
  never have seen them.
- `"none"`: plain text.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from kvrun.engine.sampling_params import StructuredOutputParams
from kvrun.serving import errors
from kvrun.serving.schemas import ChatCompletionRequest, NamedToolChoice, TokenizeRequest

_HERMES_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
ANY_OBJECT: dict[str, Any] = {"type": "object"}


@dataclass(frozen=True, slots=True)
class ToolPlan:
    mode: str  # "named" | "required" | "auto"
    constraint: StructuredOutputParams | None
    function: str | None = None  # the named function


def template_renders_tools(tokenizer) -> bool:
    template = getattr(tokenizer, "chat_template", None) or ""
    return "tools" in template


def plan(body: ChatCompletionRequest, tokenizer) -> ToolPlan | None:
    """What the request's tools ask of generation; None: generate plain text."""
    choice = body.tool_choice
    if not body.tools:
        if choice not in (None, "none"):
            raise errors.invalid("tool_choice needs tools", "tool_choice")
        return None
    if choice == "none":
        return None
    schemas = {tool.function.name: tool.function.parameters or ANY_OBJECT for tool in body.tools}
    if isinstance(choice, NamedToolChoice):
        name = choice.function.name
        if name not in schemas:
            raise errors.invalid(f"tool_choice names function {name!r}, which is not among tools", "tool_choice")
        return ToolPlan("named", StructuredOutputParams(json=schemas[name]), name)
    if choice == "required":
        items = [{"type": "object", "properties": {"name": {"const": name}, "parameters": schema},
                  "required": ["name", "parameters"]} for name, schema in schemas.items()]  # fmt: skip
        array = {"type": "array", "minItems": 1, "items": {"anyOf": items}}
        return ToolPlan("required", StructuredOutputParams(json=array))
    if not template_renders_tools(tokenizer):
        raise errors.invalid("tool_choice 'auto' needs a chat template that renders tools, and this model's does not "
                             "(start kvrun with --chat-template, or send tool_choice 'required' or a named function)",
                             "tool_choice")  # fmt: skip
    return ToolPlan("auto", None)


def tool_dicts(body: ChatCompletionRequest | TokenizeRequest) -> list[dict] | None:
    """The tools as chat templates take them (OpenAI's JSON)."""
    if not body.tools:
        return None
    return [{"type": "function", "function": {"name": tool.function.name, "description": tool.function.description or "",
             "parameters": tool.function.parameters or ANY_OBJECT}} for tool in body.tools]  # fmt: skip


def _call(name: str, arguments: Any) -> dict:
    text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": {"name": name, "arguments": text}}


def parse(tool_plan: ToolPlan, text: str) -> tuple[str | None, list[dict]]:
    """(content, tool calls) of a finished generation. Text that is not the expected JSON (cut off by max_tokens)
    is returned as content with no calls."""
    if tool_plan.mode == "named":
        try:
            json.loads(text)
        except (ValueError, RecursionError):  # RecursionError: JSON nested deeper than Python parses
            return text, []
        return None, [_call(tool_plan.function or "", text)]
    if tool_plan.mode == "required":
        try:
            calls = json.loads(text)
            return None, [_call(call["name"], call["parameters"]) for call in calls]
        except (ValueError, TypeError, KeyError, RecursionError):
            return text, []
    calls = []
    for block in _HERMES_CALL.findall(text):
        try:
            call = json.loads(block)
            calls.append(_call(call["name"], call.get("arguments", call.get("parameters", {}))))
        except (ValueError, TypeError, KeyError, RecursionError):
            return text, []  # a malformed call: hand the text back rather than guess
    if not calls:
        return text, []
    content = text[: text.index("<tool_call>")].strip()
    return content or None, calls
