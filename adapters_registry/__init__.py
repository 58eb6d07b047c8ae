"""kvrun's adapter registry: versioned, validated PEFT LoRA adapters in Redis or a local directory.

Imports nothing from torch, numpy or kvrun, so training boxes can push with only this package installed.

    from adapters_registry import open_store
    store = open_store("redis://127.0.0.1:6379/0")       # or file:///path; default env KVRUN_REGISTRY
    record = store.push("out/pirate", "team-a/pirate", tags=["prod"])
    record = store.resolve("team-a/pirate:prod")           # VersionRecord: version, sha256, rank, files, ...
    files = store.fetch_files(record)                      # {"adapter_config.json": b"...", ...}, verified
    for event in store.watch():                            # publish / tag / untag / delete / resync
        ...

Print a registry URL only as `redact_url(url)`: it masks passwords and tokens (`store.url` already is).
See docs/registry.md for URLs, the Redis key schema, tokens, the CLI and its exit codes.
"""

from adapters_registry.errors import (
    AuthError,
    ConflictError,
    IntegrityError,
    NotFoundError,
    RegistryError,
    UnreachableError,
    UsageError,
    ValidationError,
    WeightMagnitudeError,
)
from adapters_registry.names import Ref, parse_ref
from adapters_registry.records import AdapterSummary, Event, FileEntry, TokenInfo, VersionRecord
from adapters_registry.redaction import redact_url
from adapters_registry.store import AdapterStore
from adapters_registry.urls import DEFAULT_REGISTRY, open_store
from adapters_registry.validate import LORA_MAGNITUDE_BOUND, Limits, check_lora_magnitude

__all__ = [
    "DEFAULT_REGISTRY",
    "LORA_MAGNITUDE_BOUND",
    "AdapterStore",
    "AdapterSummary",
    "AuthError",
    "ConflictError",
    "Event",
    "FileEntry",
    "IntegrityError",
    "Limits",
    "NotFoundError",
    "Ref",
    "RegistryError",
    "TokenInfo",
    "UnreachableError",
    "UsageError",
    "ValidationError",
    "VersionRecord",
    "WeightMagnitudeError",
    "check_lora_magnitude",
    "open_store",
    "parse_ref",
    "redact_url",
]
