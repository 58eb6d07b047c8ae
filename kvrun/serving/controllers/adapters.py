"""GET /v1/adapters, and vLLM's POST /v1/load_lora_adapter and /v1/unload_lora_adapter."""

from __future__ import annotations

import asyncio
import logging

from adapters_registry import AdapterSummary
from litestar import Controller, Request, get, post
from litestar.params import JSONBody
from litestar.response import Response

from kvrun.serving.auth import require_admin_key, require_api_key
from kvrun.serving.controllers.models import registry_adapters, why_not_servable
from kvrun.serving.responses import AdapterInfo, AdapterList
from kvrun.serving.schemas import LoadLoraAdapterRequest, UnloadLoraAdapterRequest
from kvrun.serving.snapshot import AdapterResidency
from kvrun.serving.state import Serving

logger = logging.getLogger(__name__)


def _registry_entry(id: str, summary: AdapterSummary, version: int, residency: dict[str, AdapterResidency],
                    serving: Serving) -> AdapterInfo:  # fmt: skip
    record = summary.latest
    canonical = f"{summary.name}@{version}"
    resident = residency.get(canonical)
    tags = sorted(tag for tag, tagged in summary.tags.items() if tagged == version)
    return AdapterInfo(
        id=id,
        state=resident.location if resident else "registry",
        source="registry",
        version=version,
        ref=canonical,
        sha256=record.sha256 if record.version == version else (resident.ref.sha256 if resident else None),
        rank=record.rank if record.version == version else (resident.ref.rank if resident else None),
        slot=resident.slot if resident else None,
        in_flight=resident.holds if resident else 0,
        pinned=resident.pins if resident else 0,
        tags=tags,
        why_not_servable=why_not_servable(serving, record) if record.version == version else None,
    )


class AdaptersController(Controller):
    path = "/v1"
    tags = ["Adapters"]

    @get("/adapters", guards=[require_api_key], summary="Every adapter: registry only, host memory or GPU slot")
    async def adapters(self, request: Request) -> AdapterList:
        serving: Serving = request.app.state.serving
        snapshot, summaries = await asyncio.gather(serving.client.snapshot(), registry_adapters(serving))
        residency = {adapter.name: adapter for adapter in snapshot.adapters}
        entries: list[AdapterInfo] = []
        covered: set[str] = set()
        for summary in summaries:
            latest = summary.latest.version
            entries.append(_registry_entry(summary.name, summary, latest, residency, serving))
            covered.add(f"{summary.name}@{latest}")
            for tag, version in sorted(summary.tags.items()):
                if version != latest:
                    entries.append(_registry_entry(f"{summary.name}:{tag}", summary, version, residency, serving))
                    covered.add(f"{summary.name}@{version}")
        for adapter in snapshot.adapters:
            if adapter.name in covered:
                continue
            from_path = adapter.name in serving.resolver.local
            entries.append(AdapterInfo(
                id=adapter.name, state=adapter.location, source="path" if from_path else "registry",
                version=adapter.ref.version or None, ref=adapter.name, sha256=adapter.ref.sha256,
                rank=adapter.ref.rank, slot=adapter.slot, in_flight=adapter.holds, pinned=adapter.pins,
                serving=adapter.aliased,
            ))  # fmt: skip
        return AdapterList(entries, snapshot.max_loras, serving.config.max_cpu_loras)

    @post("/load_lora_adapter", guards=[require_admin_key], status_code=200, summary="Load a PEFT adapter from a path")
    async def load(self, request: Request, data: JSONBody[LoadLoraAdapterRequest]) -> Response[str]:
        serving: Serving = request.app.state.serving
        await serving.resolver.load_local(data.lora_name, data.lora_path, replace=data.load_inplace)
        logger.info("loaded adapter %s from %s", data.lora_name, data.lora_path)
        return Response(f"Success: LoRA adapter '{data.lora_name}' added successfully.", media_type="text/plain")

    @post("/unload_lora_adapter", guards=[require_admin_key], status_code=200, summary="Unload an adapter")
    async def unload(self, request: Request, data: JSONBody[UnloadLoraAdapterRequest]) -> Response[str]:
        serving: Serving = request.app.state.serving
        await serving.resolver.unload(data.lora_name)
        logger.info("unloaded adapter %s", data.lora_name)
        return Response(f"Success: LoRA adapter '{data.lora_name}' removed successfully.", media_type="text/plain")
