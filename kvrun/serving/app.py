"""`create_app()`: the Litestar application. Its lifespan owns the engine (its core process, or its thread) and the
registry clients."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from adapters_registry import open_store, redact_url
from litestar import Litestar
from litestar.config.cors import CORSConfig
from litestar.datastructures import State
from litestar.openapi import OpenAPIConfig

from kvrun.engine.core import EngineInfo
from kvrun.engine.core_process import CoreProcess
from kvrun.engine.engine import LLMEngine
from kvrun.engine.tokenizer import load_tokenizer
from kvrun.runtime.loader import resolve_model
from kvrun.serving.adapter_resolver import AdapterResolver
from kvrun.serving.config import ServerConfig
from kvrun.serving.controllers.adapters import AdaptersController
from kvrun.serving.controllers.generate import GenerateController
from kvrun.serving.controllers.health import HealthController
from kvrun.serving.controllers.models import ModelsController
from kvrun.serving.controllers.openai import OpenAIController
from kvrun.serving.engine_client import EngineClient, ThreadEngineClient
from kvrun.serving import errors
from kvrun.serving.errors import EXCEPTION_HANDLERS
from kvrun.serving.generation import GenerationService
from kvrun.serving.metrics import ServingMetrics
from kvrun.serving.openapi import OpenAPIJson, openapi_json, swagger_asset, swagger_page
from kvrun.serving.openai_format import TokenText
from kvrun.serving.process_client import ProcessEngineClient
from kvrun.serving.registry_client import RegistryClient
from kvrun.serving.registry_watcher import RegistryWatcher
from kvrun.serving.state import Serving
from kvrun.serving.status import status_lines
from kvrun.serving.version import kvrun_version

logger = logging.getLogger(__name__)


class StartupFailed(Exception):
    """The server cannot start as configured (the message says why, in one line)."""


@dataclass(frozen=True, slots=True)
class LoadedModel:
    """What loading takes seconds or minutes for, done before the server binds (so `kvrun serve` can report a bad
    model in one line and time the load): an engine core process that said ready, or an engine in this process."""

    info: EngineInfo
    tokenizer: object | None  # the serving side's own instance: the engine uses its own
    core: CoreProcess | None = None  # config.engine_process
    engine: LLMEngine | None = None  # otherwise


def load_model(config: ServerConfig) -> LoadedModel:
    if config.engine_process:
        core = CoreProcess.start(config.engine_config(), queue_timeout_s=config.queue_timeout_s,
                                 max_adapters=config.max_cpu_loras)  # fmt: skip
        engine, info = None, core.info
    else:
        core, engine = None, LLMEngine(config.engine_config())
        info = EngineInfo.of(engine)
    tokenizer = load_tokenizer(Path(config.tokenizer) if config.tokenizer else resolve_model(config.model,
                                                                                            needs_weights=False))
    if tokenizer is not None and config.chat_template is not None:
        tokenizer.chat_template = config.chat_template
    return LoadedModel(info, tokenizer, core, engine)


def create_app(
    config: ServerConfig | None = None,
    on_ready: Callable[[Serving], None] | None = None,
    loaded: LoadedModel | None = None,
    on_failure: Callable[[Exception], None] | None = None,
) -> Litestar:
    """The app for `config`; `on_ready` runs once the engine is loaded and the server is about to take requests,
    `on_failure` when start-up fails. `loaded`: the model, already loaded (else the lifespan loads it)."""
    config = config or ServerConfig()
    cors = CORSConfig(allow_origins=list(config.cors_origins)) if config.cors_origins else None
    return Litestar(
        route_handlers=[OpenAIController, GenerateController, ModelsController, AdaptersController, HealthController,
                        openapi_json, swagger_page, swagger_asset],  # fmt: skip
        lifespan=[_lifespan],
        exception_handlers=EXCEPTION_HANDLERS,  # type: ignore[arg-type]
        openapi_config=OpenAPIConfig(
            title="kvrun", version=kvrun_version(), path="/schema",
            description="One base model, many LoRA adapters: OpenAI, TGI / LoRAX and vLLM-compatible endpoints.",
            render_plugins=[OpenAPIJson()],
        ),  # fmt: skip
        cors_config=cors,
        state=State({"config": config, "on_ready": on_ready, "loaded": loaded, "on_failure": on_failure}),
        logging_config=None,  # `kvrun serve` configures logging; the app must not replace it
    )


@asynccontextmanager
async def _lifespan(app: Litestar) -> AsyncIterator[None]:
    config: ServerConfig = app.state.config
    try:
        serving = await _build(config, app.state.loaded)
    except Exception as error:
        if app.state.on_failure is not None:
            app.state.on_failure(error)
        raise
    app.state.serving = serving
    status = asyncio.ensure_future(status_lines(serving, config.log_interval_s)) if config.log_interval_s else None
    if app.state.on_ready is not None:
        app.state.on_ready(serving)
    try:
        yield
    finally:
        if status is not None:
            status.cancel()
        if serving.watcher is not None:
            await serving.watcher.stop()
        await serving.client.stop()  # tensor-parallel workers stop with the engine
        serving.resolver.close()
        if serving.registry is not None:
            serving.registry.close()
        if serving.store is not None:
            serving.store.close()


async def _build(config: ServerConfig, loaded: LoadedModel | None) -> Serving:
    if loaded is None:
        # Loading takes seconds; a worker thread keeps the loop (and its signal handling) responsive meanwhile.
        loaded = await asyncio.to_thread(load_model, config)
    config = config.resolved(loaded.info.config)
    limits = dict(max_active=config.max_num_seqs + config.max_queue, queue_timeout_s=config.queue_timeout_s,
                  max_adapters=config.max_cpu_loras)  # fmt: skip
    if loaded.core is not None:
        client: EngineClient = ProcessEngineClient(loaded.core, loaded.tokenizer, **limits)
    else:
        client = ThreadEngineClient(loaded.engine, **limits)
    await client.start()
    try:
        return await _serve_with(config, loaded, client)
    except BaseException:
        await client.stop()  # an engine core process never outlives a start-up that failed
        raise


async def _serve_with(config: ServerConfig, loaded: LoadedModel, client: EngineClient) -> Serving:
    info, tokenizer = loaded.info, loaded.tokenizer
    model_name = config.served_model_name or info.model_name
    store = open_store(config.registry) if config.use_registry else None
    registry = RegistryClient(store) if store is not None else None
    resolver = AdapterResolver(
        client, registry, {model_name, info.model_name}, info.model_config, config.max_lora_rank,
        info.adapter_dtype or torch.float32, config.resolve_ttl_s,
    )  # fmt: skip
    watcher = None
    if store is not None:
        watcher = RegistryWatcher(registry, resolver)
        await watcher.start()
    for name, path in config.lora_modules:
        try:
            await resolver.load_local(name, path, replace=False)
        except errors.ApiError as error:
            if watcher is not None:
                await watcher.stop()
            raise StartupFailed(f"--lora-modules {name}={path}: {error.message}") from None
        logger.info("loaded adapter %s from %s (--lora-modules)", name, path)
    metrics = ServingMetrics(model_name)
    service = GenerationService(client, resolver, metrics, tokenizer)
    logger.info("serving %s (%d KV blocks) with registry %s", model_name, info.num_blocks,
                redact_url(store.url) if store else "none")  # fmt: skip
    return Serving(config, model_name, client, resolver, service, metrics, tokenizer, TokenText(tokenizer), store,
                   registry, watcher)  # fmt: skip
