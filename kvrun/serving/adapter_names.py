"""How the engine names a registry version: its canonical ref and its content digest, `ns/name@3:sha256:<hex>`.

The digest makes the name an identity of content, so a version number the registry reuses after losing its data
(same `ns/name@1`, other weights) never selects weights the engine holds under the old digest. Clients never see
this form: responses, /v1/adapters and /metrics show the ref (`ns/name@3`) and the digest separately.
A merged adapter is named by the identity of its merge (components' digests and parameters): `merged:sha256:<hex>`.
"""

from __future__ import annotations

import re

from adapters_registry.records import VersionRecord

_ENGINE_NAME = re.compile(r"^(?P<name>[^@]+)@(?P<version>\d+):sha256:(?P<sha256>[0-9a-f]{64})$")
MERGED_PREFIX = "merged:sha256:"  # a merged adapter (kvrun.adapters.merge): `merged:sha256:<its identity>`


def engine_name(record: VersionRecord) -> str:
    return f"{record.ref}:sha256:{record.sha256}"


def parse_engine_name(name: str) -> tuple[str, int, str] | None:
    """(adapter name, version, sha256) of a registry version's engine-side name; None for a path-loaded name."""
    match = _ENGINE_NAME.match(name)
    return (match["name"], int(match["version"]), match["sha256"]) if match else None


def merged_name(identity: str) -> str:
    return MERGED_PREFIX + identity


def merged_identity(name: str) -> str | None:
    """The identity of a merged adapter's engine-side name; None for any other name."""
    return name.removeprefix(MERGED_PREFIX) if name.startswith(MERGED_PREFIX) else None


def held_digests(names) -> set[str]:
    """The local copies (SpillDirectory entries) the engine's adapters need: registry digests, merge identities."""
    digests = {identity for identity in map(merged_identity, names) if identity is not None}
    return digests | {parts[2] for parts in map(parse_engine_name, names) if parts is not None}


def client_name(name: str) -> str:
    """What clients call an engine-side name: `ns/name@3` for a registry version, else the name itself."""
    parsed = parse_engine_name(name)
    return name if parsed is None else f"{parsed[0]}@{parsed[1]}"
