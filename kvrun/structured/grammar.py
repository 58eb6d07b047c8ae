"""A StructuredOutputParams as an xgrammar Grammar, or the reason it cannot be one (independent of the tokenizer,
so a bad schema or regex is refused when the request's parameters are built, before anything is queued)."""

from __future__ import annotations

import json
import re

from kvrun.structured.spec import StructuredOutputParams

# JSON: compact separators, no free whitespace. A small model given free whitespace may write newlines until
# max_tokens; every JSON parser reads the compact form.
JSON_OPTIONS = {"any_whitespace": False, "strict_mode": True}

# xgrammar's errors open with a timestamp and its own source position: "[01:00:45] /project/cpp/x.cc:83: ".
_SOURCE_PREFIX = re.compile(r"^\[[0-9:]+\]\s+\S+:\d+:\s*")


class GrammarError(ValueError):
    """The spec does not describe a language kvrun can constrain generation to."""


def parse(spec: StructuredOutputParams):
    """The spec's xgrammar.Grammar; raises GrammarError with the reason (xgrammar's, without its source position)."""
    import xgrammar

    kind = spec.kind
    try:
        if kind == "json":
            return xgrammar.Grammar.from_json_schema(_schema_text(spec.json), **JSON_OPTIONS)
        if kind == "json_object":
            return xgrammar.Grammar.from_json_schema('{"type": "object"}', **JSON_OPTIONS)
        if kind == "regex":
            return xgrammar.Grammar.from_regex(spec.regex)
        if kind == "choice":
            return xgrammar.Grammar.from_ebnf(choice_ebnf(spec.choice))
        return xgrammar.Grammar.from_ebnf(spec.grammar)
    except GrammarError:
        raise
    except Exception as error:  # xgrammar raises RuntimeError (and a few of its own types) for every parse error
        what = {"json": "a JSON schema", "json_object": "a JSON object grammar", "regex": "a regular expression",
                "choice": "a choice", "grammar": "an EBNF grammar"}[kind]  # fmt: skip
        raise GrammarError(f"is not {what} kvrun can follow: {reason(error)}") from None


def reason(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return _SOURCE_PREFIX.sub("", text.splitlines()[0] if text else text)


def _schema_text(schema: str | dict) -> str:
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as error:
            raise GrammarError(f"is not valid JSON: {error}") from None
    if not isinstance(schema, dict):
        raise GrammarError("must be a JSON schema object")
    return json.dumps(schema)


def choice_ebnf(choices: tuple[str, ...]) -> str:
    """One alternative per string. JSON's string escapes are EBNF's too (quotes, backslashes, newlines)."""
    if not choices:
        raise GrammarError("must list at least one string")
    if not all(isinstance(choice, str) for choice in choices):
        raise GrammarError("must list strings only")
    return "root ::= " + " | ".join(json.dumps(choice, ensure_ascii=False) for choice in choices)
