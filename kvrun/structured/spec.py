"""What a request asks its output to be (vLLM's GuidedDecodingParams, in kvrun's words)."""

from __future__ import annotations

import json
from dataclasses import dataclass

KINDS = ("json", "json_object", "regex", "choice", "grammar")


@dataclass(frozen=True, slots=True)
class StructuredOutputParams:
    """Constrain generation to a language; exactly one field is set.

    - json: a JSON schema (an object, or its JSON text). Properties the schema does not declare are not generated
      (OpenAI's strict mode), and the JSON is written compactly (`{"a": 1, "b": [2, 3]}`).
    - json_object: any JSON object (OpenAI's response_format json_object).
    - regex: the whole output matches this regular expression.
    - choice: the output is exactly one of these strings.
    - grammar: an EBNF grammar (xgrammar's dialect of GBNF, rule `root` first).
    """

    json: str | dict | None = None
    json_object: bool = False
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None

    def __post_init__(self) -> None:
        if self.choice is not None:
            object.__setattr__(self, "choice", tuple(self.choice))
        chosen = [name for name in ("json", "regex", "choice", "grammar") if getattr(self, name) is not None]
        chosen += ["json_object"] if self.json_object else []
        if len(chosen) != 1:
            raise ValueError(f"structured output needs exactly one of {', '.join(KINDS)}; got {chosen or 'none'}")

    @property
    def kind(self) -> str:
        return next(name for name in KINDS if getattr(self, name) not in (None, False))

    def key(self) -> str:
        """The same language → the same key (a compiled-grammar cache key); a schema's key ignores key order."""
        value = getattr(self, self.kind)
        if self.kind == "json" and isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError:
                pass  # refused when parsed; the text itself is its key
        return self.kind + ":" + json.dumps(value, sort_keys=True, ensure_ascii=False)
