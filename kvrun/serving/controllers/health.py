"""GET /health (process and engine alive), /ready (able to take traffic), /metrics (Prometheus), /info (TGI)."""

from __future__ import annotations

import asyncio

from adapters_registry import redact_url
from litestar import Controller, Request, get
from litestar.response import Response

from kvrun.serving.responses import TgiInfo, VersionResponse
from kvrun.serving.state import Serving
from kvrun.serving.version import kvrun_version

SNAPSHOT_TIMEOUT_S = 10.0  # a step longer than this means the engine is wedged


class HealthController(Controller):
    path = "/"
    tags = ["Operations"]

    @get("/health", summary="Liveness: the engine runs")
    async def health(self, request: Request) -> Response[dict]:
        client = request.app.state.serving.client
        if not client.alive:
            return Response({"status": "engine stopped", "error": client.last_error}, status_code=503)
        return Response({"status": "ok"})

    @get("/ready", summary="Readiness: the engine answers; the registry's state is reported, not required")
    async def ready(self, request: Request) -> Response[dict]:
        """Ready while the engine can serve. A registry outage leaves the replica ready: the base model and the
        adapters it holds keep serving, and pulling every replica out of rotation at once would drop them all."""
        serving: Serving = request.app.state.serving
        problems = []
        try:
            snapshot = await asyncio.wait_for(serving.client.snapshot(), SNAPSHOT_TIMEOUT_S)
        except Exception as error:  # noqa: BLE001 - any failure means not ready
            problems.append(f"engine: {type(error).__name__}: {error}")
            snapshot = None
        body = {
            "status": "not ready" if problems else "ready",
            "problems": problems,
            "model": serving.model_name,
            "registry": serving.registry.status() if serving.registry is not None else None,
            "running": snapshot.num_running if snapshot else None,
            "waiting": snapshot.num_waiting if snapshot else None,
        }
        return Response(body, status_code=503 if problems else 200)

    @get("/metrics", summary="Prometheus metrics", media_type="text/plain; version=0.0.4; charset=utf-8")
    async def metrics(self, request: Request) -> Response[str]:
        serving: Serving = request.app.state.serving
        snapshot = await asyncio.wait_for(serving.client.snapshot(), SNAPSHOT_TIMEOUT_S)
        text = serving.metrics.render(snapshot, serving.client.num_active)
        return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    @get("/info", summary="Model and server limits (TGI's /info, with LoRAX's adapter limits)")
    async def info(self, request: Request) -> TgiInfo:
        serving: Serving = request.app.state.serving
        config = serving.config
        info = serving.client.info
        context = serving.service.context_limit
        return TgiInfo(
            model_id=serving.model_name,
            model_sha=None,
            model_dtype=str(info.weight_dtype).removeprefix("torch."),
            model_device_type=info.device_type,
            model_pipeline_tag="text-generation",
            max_concurrent_requests=serving.client.max_active,
            max_best_of=1,
            max_stop_sequences=16,
            max_input_tokens=context - 1,
            max_input_length=context - 1,
            max_total_tokens=context,
            max_batch_total_tokens=serving.service.kv_capacity,
            max_batch_size=config.max_num_seqs,
            max_waiting_tokens=0,  # TGI scheduler knobs kvrun does not have
            waiting_served_ratio=0.0,
            validation_workers=1,
            max_client_batch_size=1,
            router="kvrun",
            version=kvrun_version(),
            sha=None,
            docker_label=None,
            max_loras=config.max_loras,
            max_lora_rank=config.max_lora_rank,
            max_cpu_loras=config.max_cpu_loras,
            registry=redact_url(serving.store.url) if serving.store else None,
        )

    @get("/version", summary="kvrun's version (vLLM's /version)")
    async def version(self) -> VersionResponse:
        return VersionResponse(kvrun_version())
