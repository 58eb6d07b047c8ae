"""GET /v1/adapters, and vLLM's POST /v1/load_lora_adapter and /v1/unload_lora_adapter."""

from __future__ import annotations

import asyncio
import logging

from adapters_registry import AdapterSummary
from adapters_registry.records import VersionRecord
from litestar import Controller, Request, get, post
from litestar.response import Response

from kvrun.serving.adapter_names import merged_identity, parse_engine_name
from kvrun.serving.auth import require_admin_key, require_api_key
from kvrun.serving.controllers.models import registry_adapters, why_not_servable
from kvrun.serving.decoding import decode
from kvrun.serving.responses import AdapterInfo, AdapterList
from kvrun.serving.schemas import LoadLoraAdapterRequest, UnloadLoraAdapterRequest
from kvrun.serving.snapshot import AdapterResidency
from kvrun.serving.state import Serving

logger = logging.getLogger(__name__)


Content = tuple[str, int, str]  # (adapter name, version, sha256): a registry version's identity


def _info(serving: Serving, id: str, record: VersionRecord, resident: AdapterResidency | None, tags: list[str],
          stale: bool = False) -> AdapterInfo:  # fmt: skip
    return AdapterInfo(
        id=id, state=resident.location if resident else "registry", source="registry", version=record.version,
        ref=record.ref, sha256=record.sha256, rank=record.rank, slot=resident.slot if resident else None,
        in_flight=resident.holds if resident else 0, pinned=resident.pins if resident else 0, tags=tags, stale=stale,
        why_not_servable=why_not_servable(serving, record),
    )  # fmt: skip


def _from_registry(serving: Serving, summaries: list[AdapterSummary], known: dict[str, VersionRecord],
                   resident: dict[Content, AdapterResidency]) -> list[AdapterInfo]:  # fmt: skip
    """One entry per adapter (its latest version) and per tag naming another version."""
    entries = []
    for summary in summaries:
        latest = summary.latest
        for tag, version in [(None, latest.version), *sorted(summary.tags.items())]:
            if tag is not None and version == latest.version:
                continue
            id = summary.name if tag is None else f"{summary.name}:{tag}"
            # The summary holds only the latest record; another tagged version is described by the record this
            # server resolved for it, when it did.
            record = latest if version == latest.version else known.get(id) or known.get(f"{summary.name}@{version}")
            tags = sorted(name for name, tagged in summary.tags.items() if tagged == version)
            if record is not None and record.version == version:
                entries.append(_info(serving, id, record, resident.get((record.name, record.version, record.sha256)),
                                     tags))  # fmt: skip
                continue
            held = [(content, item) for content, item in resident.items() if content[:2] == (summary.name, version)]
            if len(held) == 1:
                entries.append(_held_info(id, *held[0], tags=tags))
            else:
                entries.append(AdapterInfo(id, "registry", "registry", version, f"{summary.name}@{version}", tags=tags))
    return entries


def _held_info(id: str, content: Content, item: AdapterResidency, *, tags: list[str] = (), stale: bool = False,
               serving: bool = True) -> AdapterInfo:  # fmt: skip
    """A registry version the engine holds, described by what the engine knows of it."""
    name, version, sha256 = content
    return AdapterInfo(
        id=id, state=item.location, source="registry", version=version, ref=f"{name}@{version}", sha256=sha256,
        rank=item.ref.rank, slot=item.slot, in_flight=item.holds, pinned=item.pins, tags=list(tags), serving=serving,
        stale=stale,
    )  # fmt: skip


class AdaptersController(Controller):
    path = "/v1"
    tags = ["Adapters"]

    @get("/adapters", guards=[require_api_key], summary="Every adapter: registry only, host memory or GPU slot")
    async def adapters(self, request: Request) -> AdapterList:
        """Registry adapters as the registry lists them, or, while it does not answer, the last known resolution of
        every ref this server served (marked stale); then every version the engine holds that neither covers."""
        serving: Serving = request.app.state.serving
        snapshot, summaries = await asyncio.gather(serving.client.snapshot(), registry_adapters(serving))
        resident: dict[Content, AdapterResidency] = {}
        for adapter in snapshot.adapters:
            content = parse_engine_name(adapter.engine_name)
            if content is not None:
                resident[content] = adapter
        known = serving.resolver.known()
        if summaries is not None:
            entries = _from_registry(serving, summaries, known, resident)
            current = {(summary.name, summary.latest.version): summary.latest.sha256 for summary in summaries}
        else:
            entries = [_info(serving, key, record, resident.get((record.name, record.version, record.sha256)), [],
                             stale=True) for key, record in sorted(known.items())]  # fmt: skip
            current = {}
        covered = {(entry.ref, entry.sha256) for entry in entries}
        for adapter in snapshot.adapters:
            content = parse_engine_name(adapter.engine_name)
            if content is None:
                source = "path" if adapter.name in serving.resolver.local else "registry"
                if merged_identity(adapter.name) is not None:
                    source = "merged"
                entries.append(AdapterInfo(
                    id=adapter.name, state=adapter.location, source=source,
                    version=adapter.ref.version or None, ref=adapter.name, sha256=adapter.ref.sha256,
                    rank=adapter.ref.rank, slot=adapter.slot, in_flight=adapter.holds, pinned=adapter.pins,
                    serving=adapter.aliased,
                ))  # fmt: skip
                continue
            name, version, sha256 = content
            if (f"{name}@{version}", sha256) in covered:
                continue
            # Content the registry no longer has under this version (it lost its data and the number was reused)
            # is never served to new requests; requests already running on it finish.
            replaced = current.get((name, version), sha256) != sha256
            entries.append(_held_info(f"{name}@{version}", content, adapter, stale=summaries is None,
                                      serving=adapter.aliased and not replaced))  # fmt: skip
        return AdapterList(entries, snapshot.max_loras, serving.config.max_cpu_loras)

    @post("/load_lora_adapter", guards=[require_admin_key], status_code=200, summary="Load a PEFT adapter from a path")
    async def load(self, request: Request) -> Response[str]:
        # Decoded as the OpenAI bodies are: null means "not given", unknown fields (vLLM adds some between
        # releases) are ignored with one warning each, and a wrong type is a 400 naming the field.
        data = decode(await request.body(), LoadLoraAdapterRequest)
        serving: Serving = request.app.state.serving
        await serving.resolver.load_local(data.lora_name, data.lora_path, replace=data.load_inplace)
        logger.info("loaded adapter %s from %s", data.lora_name, data.lora_path)
        return Response(f"Success: LoRA adapter '{data.lora_name}' added successfully.", media_type="text/plain")

    @post("/unload_lora_adapter", guards=[require_admin_key], status_code=200, summary="Unload an adapter")
    async def unload(self, request: Request) -> Response[str]:
        data = decode(await request.body(), UnloadLoraAdapterRequest)
        serving: Serving = request.app.state.serving
        await serving.resolver.unload(data.lora_name)
        logger.info("unloaded adapter %s", data.lora_name)
        return Response(f"Success: LoRA adapter '{data.lora_name}' removed successfully.", media_type="text/plain")
