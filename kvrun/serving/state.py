"""Everything the lifespan builds and the controllers use, reachable as `app.state.serving`."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from adapters_registry import AdapterStore

from kvrun.serving.adapter_resolver import AdapterResolver
from kvrun.serving.config import ServerConfig
from kvrun.serving.engine_client import EngineClient
from kvrun.serving.generation import GenerationService
from kvrun.serving.metrics import ServingMetrics
from kvrun.serving.openai_format import TokenText
from kvrun.serving.registry_client import RegistryClient
from kvrun.serving.registry_watcher import RegistryWatcher


@dataclass
class Serving:
    config: ServerConfig
    model_name: str  # the base model's id in API requests and responses
    client: EngineClient
    resolver: AdapterResolver
    service: GenerationService
    metrics: ServingMetrics
    tokenizer: object | None
    token_text: TokenText
    store: AdapterStore | None = None
    registry: RegistryClient | None = None  # the store behind its own bounded pool, with reachability
    watcher: RegistryWatcher | None = None
    started: int = field(default_factory=lambda: int(time.time()))
