"""`create_app()`: the Litestar application. Its lifespan owns the engine, its thread, and the registry clients."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import torch
from adapters_registry import open_store
from litestar import Litestar
from litestar.config.cors import CORSConfig
from litestar.datastructures import State
from litestar.openapi import OpenAPIConfig

from kvrun.engine.engine import LLMEngine
from kvrun.engine.tokenizer import load_tokenizer
from kvrun.runtime.loader import resolve_model
from kvrun.serving.adapter_resolver import AdapterResolver
from kvrun.serving.config import ServerConfig
from kvrun.serving.controllers.adapters import AdaptersController
from kvrun.serving.controllers.generate import GenerateController
from kvrun.serving.controllers.health import HealthController
from kvrun.serving.controllers.openai import OpenAIController
from kvrun.serving.engine_client import EngineClient
from kvrun.serving.errors import EXCEPTION_HANDLERS
from kvrun.serving.generation import GenerationService
from kvrun.serving.metrics import ServingMetrics
from kvrun.serving.openai_format import TokenText
from kvrun.serving.registry_watcher import RegistryWatcher
from kvrun.serving.state import Serving

logger = logging.getLogger(__name__)


def create_app(config: ServerConfig | None = None, on_ready: Callable[[Serving], None] | None = None) -> Litestar:
    """The app for `config`; `on_ready` runs once the engine is loaded and the server is about to take requests."""
    config = config or ServerConfig()
    cors = CORSConfig(allow_origins=list(config.cors_origins)) if config.cors_origins else None
    return Litestar(
        route_handlers=[OpenAIController, GenerateController, AdaptersController, HealthController],
        lifespan=[_lifespan],
        exception_handlers=EXCEPTION_HANDLERS,  # type: ignore[arg-type]
        openapi_config=OpenAPIConfig(title="kvrun", version="0.1.0", description="Multi-LoRA serving"),
        cors_config=cors,
        state=State({"config": config, "on_ready": on_ready}),
        logging_config=None,  # `kvrun serve` configures logging; the app must not replace it
    )


@asynccontextmanager
async def _lifespan(app: Litestar) -> AsyncIterator[None]:
    config: ServerConfig = app.state.config
    serving = await _build(config)
    app.state.serving = serving
    if app.state.on_ready is not None:
        app.state.on_ready(serving)
    try:
        yield
    finally:
        if serving.watcher is not None:
            await serving.watcher.stop()
        await serving.client.stop()
        if serving.store is not None:
            serving.store.close()


async def _build(config: ServerConfig) -> Serving:
    # Loading takes seconds; a worker thread keeps the loop (and its signal handling) responsive meanwhile.
    engine = await asyncio.to_thread(LLMEngine, config.engine_config())
    tokenizer = await asyncio.to_thread(load_tokenizer, resolve_model(config.model, needs_weights=False))
    model_name = config.served_model_name or engine.model_name
    store = open_store(config.registry) if config.use_registry else None
    client = EngineClient(
        engine,
        max_active=config.max_num_seqs + config.max_queue,
        queue_timeout_s=config.queue_timeout_s,
        max_adapters=config.max_cpu_loras,
    )
    await client.start()
    dtype = engine.adapters.dtype if engine.adapters is not None else torch.float32
    resolver = AdapterResolver(
        client, store, {model_name, engine.model_name}, engine.model_config, config.max_lora_rank, dtype,
        config.resolve_ttl_s,
    )  # fmt: skip
    watcher = None
    if store is not None:
        watcher = RegistryWatcher(store, resolver)
        await watcher.start()
    metrics = ServingMetrics(model_name)
    service = GenerationService(client, resolver, metrics, tokenizer)
    logger.info("serving %s (%d KV blocks) with registry %s", model_name, engine.blocks.num_blocks,
                store.url if store else "none")  # fmt: skip
    return Serving(config, model_name, client, resolver, service, metrics, tokenizer, TokenText(tokenizer), store,
                   watcher)  # fmt: skip
