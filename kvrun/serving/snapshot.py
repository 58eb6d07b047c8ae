"""The engine's snapshot as clients see it: registry versions named `ns/name@3`, never by their engine alias."""

from __future__ import annotations

from dataclasses import replace

from kvrun.engine.snapshot import AdapterResidency, EngineSnapshot
from kvrun.serving.adapter_names import client_name

__all__ = ["AdapterResidency", "EngineSnapshot", "for_clients"]


def for_clients(snapshot: EngineSnapshot) -> EngineSnapshot:
    adapters = tuple(replace(adapter, name=client_name(adapter.engine_name)) for adapter in snapshot.adapters)
    return replace(snapshot, adapters=tuple(sorted(adapters, key=lambda adapter: adapter.name)))
