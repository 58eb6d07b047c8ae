"""Request bodies → msgspec structs, as strictly as OpenAI and vLLM check types and as leniently as they treat
the rest.

- The body must be UTF-8 JSON, an object, nested at most MAX_DEPTH levels; anything else is a 400 that says which.
- Types are checked strictly: `"max_tokens": "3"` and `"stream": "false"` are refused, naming the field
  (OpenAI and vLLM refuse them too); an int where a float is expected is fine.
- `null` means "not given": a field whose type does not admit null takes its default, so `"n": null` works.
- Unknown fields are ignored, as vLLM ignores them, and each field name is logged once at warning level so an
  operator can spot a typo (`max_token`) or a client feature kvrun lacks; a struct declared with
  `forbid_unknown_fields` (where a typo would silently change the result) refuses them instead.
"""

from __future__ import annotations

import logging
import re
from functools import lru_cache
from typing import Any, TypeVar

import msgspec
from msgspec import inspect

from kvrun.serving import errors

logger = logging.getLogger(__name__)

T = TypeVar("T")
MAX_DEPTH = 64  # JSON nesting deeper than this is refused (a tool's JSON schema is the deepest thing clients send)
_PATH = re.compile(r" - at `\$(.*)`$")
_warned: set[str] = set()


class OpenFields:
    """Mixin marker: unknown fields of this struct are dropped without a warning (clients replay whole objects,
    e.g. assistant messages with `refusal` or `audio`, into a chat history)."""


def decode(body: bytes, type_: type[T]) -> T:
    if not body.strip():
        raise errors.invalid("The request body is empty: send a JSON object with Content-Type: application/json.")
    try:
        value = msgspec.json.decode(body)
    except UnicodeDecodeError as error:
        raise errors.invalid(f"The request body is not valid UTF-8 (byte {error.start}).") from None
    except RecursionError:
        raise errors.invalid(f"The request body nests deeper than {MAX_DEPTH} levels.") from None
    except msgspec.DecodeError as error:
        raise errors.invalid(f"The request body is not valid JSON: {error}") from None
    _check_depth(value)
    if not isinstance(value, dict):
        raise errors.invalid(f"The request body must be a JSON object, not {_json_type(value)}.")
    ignored: list[str] = []
    _normalize(value, _type_info(type_), "", ignored)
    for name in ignored:
        if name not in _warned and len(_warned) < 1000:  # bounded: clients control these names
            _warned.add(name)
            logger.warning("ignoring unknown request field %r (kvrun does not implement it)", name)
    try:
        return msgspec.convert(value, type_, strict=True)
    except msgspec.ValidationError as error:
        raise _validation_error(str(error)) from None


@lru_cache(maxsize=64)
def _type_info(type_: type) -> inspect.Type:
    return inspect.type_info(type_)


def _json_type(value: Any) -> str:
    return {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(type(value), "a number")


def _check_depth(value: Any) -> None:
    if not isinstance(value, (dict, list)):
        return
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise errors.invalid(f"The request body nests deeper than {MAX_DEPTH} levels.")
        children = item.values() if isinstance(item, dict) else item
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))


def _struct_of(info: inspect.Type) -> inspect.StructType | None:
    """The struct a field holds, looking through `X | None` and other unions (at most one struct type)."""
    if isinstance(info, inspect.StructType):
        return info
    if isinstance(info, inspect.UnionType):
        structs = [_struct_of(member) for member in info.types]
        structs = [struct for struct in structs if struct is not None]
        return structs[0] if len(structs) == 1 else None
    return None


def _list_item(info: inspect.Type) -> inspect.Type | None:
    members = info.types if isinstance(info, inspect.UnionType) else (info,)
    for member in members:
        if isinstance(member, inspect.ListType):
            return member.item_type
    return None


def _admits_null(info: inspect.Type) -> bool:
    if isinstance(info, (inspect.NoneType, inspect.AnyType)):
        return True
    return isinstance(info, inspect.UnionType) and any(_admits_null(member) for member in info.types)


def _normalize(value: dict, info: inspect.Type, prefix: str, ignored: list[str]) -> None:
    """Drop unknown keys (recording them) and nulls for fields that take no null, through nested structs."""
    struct = _struct_of(info)
    if struct is None:
        return
    fields = {field.encode_name: field for field in struct.fields}
    quiet = issubclass(struct.cls, OpenFields)
    for key in list(value):
        field = fields.get(key)
        name = f"{prefix}{key}"
        if field is None:
            if struct.forbid_unknown_fields:
                continue  # convert refuses it, naming the field: a typo there would change what is computed
            del value[key]
            if not quiet:
                ignored.append(name)
            continue
        item = value[key]
        if item is None and not _admits_null(field.type):
            if field.required:
                continue  # convert names the field: "Expected `str`, got `null`"
            del value[key]
        elif isinstance(item, dict):
            _normalize(item, field.type, f"{name}.", ignored)
        elif isinstance(item, list):
            item_type = _list_item(field.type)
            if item_type is not None:
                for index, element in enumerate(item):
                    if isinstance(element, dict):
                        _normalize(element, item_type, f"{name}[{index}].", ignored)


def _validation_error(message: str) -> errors.ApiError:
    """msgspec's `Expected `int`, got `str` - at `$.parameters.seed`` → 400 naming `parameters.seed`."""
    match = _PATH.search(message)
    path = match.group(1).replace("[...]", "").lstrip(".") if match else ""  # `[...]`: some key of a dict
    text = message[: match.start()] if match else message
    missing = re.search(r"missing required field `([^`]+)`", text)
    if missing:
        path = f"{path}.{missing.group(1)}" if path else missing.group(1)
    return errors.invalid(f"{path}: {text}" if path else text, param=path or None)
