"""Adapter names, tags, refs and token scopes: the strings users type, validated once here.

Names become file-system paths in the file backend and key segments in Redis, so the alphabet is narrow
(lowercase letters, digits, `.`, `_`, `-`), every segment starts with a letter or digit (no `.`/`..`
traversal, no hidden files) and lengths are bounded.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from adapters_registry.errors import UsageError

MAX_SEGMENT_LENGTH = 64
MAX_TAG_LENGTH = 64
LATEST_TAG = "latest"

_SEGMENT = r"[a-z0-9][a-z0-9._-]{0,63}"
_SEGMENT_RE = re.compile(rf"^{_SEGMENT}$")
_TAG_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
_SCOPE_RE = re.compile(rf"^(\*|{_SEGMENT}/\*|{_SEGMENT}/{_SEGMENT})$")
# Base-model names are Hugging Face ids (`HuggingFaceTB/SmolLM2-135M-Instruct`): mixed case allowed.
_BASE_MODEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?$")


def _check_segment(segment: str, what: str, full: str) -> None:
    if not _SEGMENT_RE.match(segment) or ".." in segment:
        raise UsageError(
            f"invalid {what} {segment!r} in {full!r}: use 1-{MAX_SEGMENT_LENGTH} lowercase letters, digits, "
            "'.', '_' or '-', starting with a letter or digit"
        )


def check_namespace(namespace: str) -> str:
    _check_segment(namespace, "namespace", namespace)
    return namespace


def check_name(name: str) -> str:
    """Validate `namespace/name` and return it unchanged."""
    parts = name.split("/")
    if len(parts) != 2:
        raise UsageError(f"invalid adapter name {name!r}: expected 'namespace/name'")
    _check_segment(parts[0], "namespace", name)
    _check_segment(parts[1], "name", name)
    return name


def check_tag(tag: str) -> str:
    if not _TAG_RE.match(tag) or ".." in tag:
        raise UsageError(f"invalid tag {tag!r}: use 1-{MAX_TAG_LENGTH} lowercase letters, digits, '.', '_' or '-'")
    return tag


def check_user_tag(tag: str) -> str:
    """A tag a user may set or remove: everything but the registry-managed `latest`."""
    check_tag(tag)
    if tag == LATEST_TAG:
        raise UsageError("tag 'latest' is managed by the registry (it always names the newest version)")
    return tag


def check_scope(scope: str) -> str:
    """Token scopes: `*`, `namespace/*` or one exact `namespace/name`."""
    if not _SCOPE_RE.match(scope) or ".." in scope:
        raise UsageError(f"invalid token scope {scope!r}: expected '*', 'namespace/*' or 'namespace/name'")
    return scope


def scope_allows(scope: str, name: str) -> bool:
    if scope == "*":
        return True
    if scope.endswith("/*"):
        return name.split("/", 1)[0] == scope[:-2]
    return scope == name


def check_base_model(base_model: str) -> str:
    if not _BASE_MODEL_RE.match(base_model) or ".." in base_model:
        raise UsageError(f"invalid base model name {base_model!r}: expected a Hugging Face style id 'org/model'")
    return base_model


@dataclass(frozen=True, slots=True)
class Ref:
    """A parsed adapter reference: `ns/name` (latest), `ns/name@3` (a version) or `ns/name:prod` (a tag)."""

    name: str
    version: int | None = None
    tag: str | None = None

    @property
    def selects_version(self) -> bool:
        return self.version is not None or self.tag is not None

    def __str__(self) -> str:
        if self.version is not None:
            return f"{self.name}@{self.version}"
        if self.tag is not None:
            return f"{self.name}:{self.tag}"
        return self.name


def parse_ref(ref: str | Ref) -> Ref:
    if isinstance(ref, Ref):
        return ref
    if "@" in ref:
        name, _, version_text = ref.partition("@")
        if not version_text.isdigit() or int(version_text) < 1 or len(version_text) > 12:
            raise UsageError(f"invalid ref {ref!r}: the version after '@' must be a positive integer")
        return Ref(check_name(name), version=int(version_text))
    if ":" in ref:
        name, _, tag = ref.partition(":")
        return Ref(check_name(name), tag=check_tag(tag))
    return Ref(check_name(ref))
