"""A consistent picture of the engine (queues, KV pool, adapter residency), taken between steps.

A server's /metrics, /v1/adapters and /ready read this instead of touching the engine, which is not thread-safe
(and may live in another process). Adapters are named as the engine names them; the server renames them for clients.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvrun.adapters.ref import AdapterRef
from kvrun.engine.engine import LLMEngine


@dataclass(frozen=True, slots=True)
class AdapterResidency:
    name: str  # as clients name it (a server renames registry versions `ns/name@3`); here the engine's alias
    engine_name: str  # the engine's alias (for a server's registry version `ns/name@3:sha256:…`)
    ref: AdapterRef
    location: str  # "gpu" (in a model slot) | "host" (parsed, in the host LRU) | "registered" (reloaded on use)
    slot: int | None
    pins: int  # running requests using the slot
    holds: int  # live requests (running or waiting) on this version
    aliased: bool  # False: a superseded version kept only until its in-flight requests finish


@dataclass(frozen=True, slots=True)
class EngineSnapshot:
    num_running: int
    num_waiting: int
    num_blocks: int
    num_free_blocks: int
    block_size: int
    max_loras: int
    tensor_parallel_size: int  # devices every adapter slot spans (one residency, the same slot on every rank)
    running_adapters: tuple[str, ...]  # adapter labels (as clients named them) of running requests
    waiting_adapters: tuple[str, ...]
    adapters: tuple[AdapterResidency, ...]

    @property
    def kv_usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks if self.num_blocks else 0.0

    def pins_total(self) -> int:
        return sum(adapter.pins for adapter in self.adapters)


def take_snapshot(engine: LLMEngine, labels: dict[str, str | None]) -> EngineSnapshot:
    """Must run where the engine steps, between steps. `labels` maps request id → the adapter name the client used."""
    scheduler = engine.scheduler

    def adapter_labels(requests) -> tuple[str, ...]:
        names = []
        for request in requests:
            label = labels.get(request.request_id) or (request.adapter.name if request.adapter else None)
            if label and label not in names:
                names.append(label)
        return tuple(names)

    manager = engine.adapters
    residency: list[AdapterResidency] = []
    if manager is not None:
        aliases = manager.names()
        slots = manager.slots.resident()
        refs: dict[AdapterRef, str] = {ref: name for name, ref in aliases.items()}
        for request in [*scheduler.running, *scheduler.waiting]:
            if request.adapter is not None:
                refs.setdefault(request.adapter, request.adapter.name)
        for ref in slots:
            refs.setdefault(ref, ref.name)
        for ref, name in refs.items():
            slot = slots.get(ref)
            location = "gpu" if slot is not None else "host" if ref in manager.host else "registered"
            residency.append(
                AdapterResidency(name, name, ref, location, slot, manager.slots.pins(ref),
                                 manager.holds(ref), aliases.get(name) == ref)
            )  # fmt: skip
    return EngineSnapshot(
        num_running=len(scheduler.running),
        num_waiting=len(scheduler.waiting),
        num_blocks=engine.blocks.num_blocks,
        num_free_blocks=engine.blocks.num_free,
        block_size=engine.blocks.block_size,
        max_loras=engine.config.lora.max_loras if manager is not None else 0,
        tensor_parallel_size=engine.config.tensor_parallel_size,
        running_adapters=adapter_labels(scheduler.running),
        waiting_adapters=adapter_labels(scheduler.waiting),
        adapters=tuple(sorted(residency, key=lambda item: item.name)),
    )
