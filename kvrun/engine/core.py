"""EngineCore: an LLMEngine and what a server keeps beside it between steps, wherever the engine steps.

A server drives the engine from one place only, a thread (kvrun.serving.engine_client) or its own process
(kvrun.engine.core_process); both run this same state machine between steps:

- admission: publish the adapter version a request needs (parsed elsewhere), then queue the request;
- the queue timeout: a request not scheduled within `queue_timeout_s` is aborted (waiting is bounded, work is not);
- the adapter LRU: at most `max_adapters` names stay loaded; registry versions nobody uses go first;
- snapshots for /metrics and /ready, labelled with the adapter names clients used.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch

from kvrun.adapters.peft_format import ParsedAdapter
from kvrun.config import EngineConfig
from kvrun.engine.engine import LLMEngine
from kvrun.engine.request import RequestOutput
from kvrun.engine.sampling_params import SamplingParams
from kvrun.engine.snapshot import EngineSnapshot, take_snapshot
from kvrun.runtime.models.spec import ModelConfig

logger = logging.getLogger(__name__)

EXPIRY_CHECK_S = 0.1  # how often the core looks for requests that waited too long to be scheduled


@dataclass(frozen=True, slots=True)
class EngineInfo:
    """What a server needs to know of a loaded engine (fixed for its life), without touching the engine."""

    model_name: str
    model_config: ModelConfig
    config: EngineConfig  # with every automatic setting resolved
    max_model_len: int
    num_blocks: int
    block_size: int
    weight_dtype: torch.dtype
    device_type: str
    adapter_dtype: torch.dtype | None  # None: LoRA is off (max_loras=0)

    @classmethod
    def of(cls, engine: LLMEngine) -> EngineInfo:
        weight = next(engine.runner.model.parameters())
        return cls(
            engine.model_name, engine.model_config, engine.config, engine.max_model_len, engine.blocks.num_blocks,
            engine.blocks.block_size, weight.dtype, weight.device.type,
            engine.adapters.dtype if engine.adapters is not None else None,
        )  # fmt: skip

    @property
    def kv_capacity(self) -> int:
        return self.num_blocks * self.block_size


@dataclass(frozen=True, slots=True)
class AdapterPublication:
    """An adapter version parsed off the engine's loop, to be published under its name before a request uses it."""

    parsed: ParsedAdapter
    source: Callable[[], ParsedAdapter]  # re-parses it if the host cache dropped it; runs where the engine steps
    evictable: bool = True  # registry versions may be unloaded when unused; path-loaded adapters stay
    directory: str | None = None  # its PEFT files on local disk (an engine in another process parses them there)


@dataclass(frozen=True, slots=True)
class EngineRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    adapter: str | None = None  # engine-side adapter name, None = base model
    label: str | None = None  # the adapter name as the client wrote it (metrics, routing info)
    publication: AdapterPublication | None = None  # publish first when the engine lacks `adapter`


class EngineCore:
    def __init__(self, engine: LLMEngine, *, queue_timeout_s: float, max_adapters: int) -> None:
        self.engine = engine
        self.queue_timeout_s = queue_timeout_s
        self.max_adapters = max_adapters
        self._labels: dict[str, str | None] = {}  # live requests → the adapter name the client used
        self._deadlines: dict[str, float] = {}  # requests not yet scheduled → when they stop waiting (monotonic)
        self._next_expiry_check = 0.0
        self._evictable: OrderedDict[str, None] = OrderedDict()  # registry versions, least recently used first
        self.adapter_names: frozenset[str] = frozenset(engine.adapters.names()) if engine.adapters else frozenset()

    def has_unfinished(self) -> bool:
        return self.engine.has_unfinished()

    # -- requests ------------------------------------------------------------------------------------------------
    def add(self, request: EngineRequest) -> None:
        """Queue a request; raises (and queues nothing) for what the engine refuses."""
        engine = self.engine
        if request.adapter is not None:
            if request.publication is not None and request.adapter not in self.adapter_names:
                self.publish(request.adapter, request.publication)
            if request.adapter in self._evictable:
                self._evictable.move_to_end(request.adapter)
        engine.add_request(request.prompt_token_ids, request.params, request.adapter, request.request_id)
        self._labels[request.request_id] = request.label
        self._deadlines[request.request_id] = time.monotonic() + self.queue_timeout_s

    def abort(self, request_id: str) -> RequestOutput | None:
        self._forget(request_id)
        return self.engine.abort_request(request_id)

    def step(self) -> list[RequestOutput]:
        """One engine step; raises only when the engine itself is broken (a row's failure is its own output)."""
        outputs = self.engine.step()
        for output in outputs:
            self._deadlines.pop(output.request_id, None)
            if output.finished:
                self._labels.pop(output.request_id, None)
        return outputs

    def expire_waiting(self) -> list[str]:
        """Abort the requests that waited longer than the queue timeout without being scheduled; their ids."""
        now = time.monotonic()
        if not self._deadlines or now < self._next_expiry_check:
            return []
        self._next_expiry_check = now + EXPIRY_CHECK_S
        started = {request.request_id for request in self.engine.scheduler.running}
        expired = []
        for request_id, deadline in list(self._deadlines.items()):
            if request_id in started:
                del self._deadlines[request_id]  # scheduled: from here on it is work, not waiting
            elif deadline <= now:
                self.abort(request_id)
                expired.append(request_id)
        return expired

    def abort_all(self) -> list[str]:
        """Abort every live request (the core is stopping); their ids. Never raises: the engine may be what broke."""
        request_ids = list(self._labels)
        for request_id in request_ids:
            try:
                self.abort(request_id)
            except Exception:  # noqa: BLE001 - every stream must still end
                logger.exception("abort of %s failed", request_id)
        return request_ids

    def _forget(self, request_id: str) -> None:
        self._labels.pop(request_id, None)
        self._deadlines.pop(request_id, None)

    def snapshot(self) -> EngineSnapshot:
        return take_snapshot(self.engine, self._labels)

    # -- adapters ------------------------------------------------------------------------------------------------
    def publish(self, name: str, publication: AdapterPublication) -> None:
        manager = self.engine.adapters
        if manager is None:
            raise ValueError("LoRA is disabled on this server (--max-loras 0)")
        manager.add(publication.parsed, publication.source)
        if publication.evictable:
            self._evictable[name] = None
            self._evictable.move_to_end(name)
        else:
            self._evictable.pop(name, None)
        self._trim(keep=name)
        self.adapter_names = frozenset(manager.names())

    def remove(self, name: str) -> bool:
        manager = self.engine.adapters
        if manager is None or name not in manager.names():
            return False
        manager.remove(name)  # requests already holding it finish on it; new ones cannot start
        self._evictable.pop(name, None)
        self.adapter_names = frozenset(manager.names())
        return True

    def _trim(self, keep: str) -> None:
        """Keep at most max_adapters names: unload the least recently used registry versions nobody uses."""
        manager = self.engine.adapters
        excess = len(manager.names()) - self.max_adapters
        for name in list(self._evictable):
            if excess <= 0:
                break
            ref = manager.names().get(name)
            if name == keep or ref is None or manager.holds(ref) or manager.slots.pins(ref):
                continue
            manager.remove(name)
            del self._evictable[name]
            excess -= 1
            logger.info("unloaded %s (least recently used; over --max-cpu-loras)", name)
