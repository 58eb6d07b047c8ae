"""LoRAX's `merged_adapters`: resolve the components, name the merge by content, compute it once, serve it as an
adapter.

A merge is named `merged:sha256:<identity>`, the identity hashing the components' content identities (a registry
version's digest, a path load's weights and settings), in order, with the merge parameters
(kvrun.adapters.merge.merge_identity). Each request resolves its components as single-adapter requests do (tags and
`latest` follow the registry, unknown ones are 404), so a re-pushed component gives the merge a new identity and
the old merge is never served to new requests; it leaves the engine as unused registry versions do.

The merge itself runs off the event loop and off the engine (in a worker thread), once however many requests want
it; its PEFT files go to the resolver's local copies (SpillDirectory), from which the engine (in this process or in
its own) parses it like any adapter: same validation, host cache, slots and eviction.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from kvrun.adapters.merge import MergeError, MergeSpec, merge_adapters, merge_identity
from kvrun.adapters.peft_format import CONFIG_FILE, WEIGHTS_FILE, AdapterError, load_peft_adapter, parse_adapter
from kvrun.serving import errors
from kvrun.serving.adapter_names import merged_name
from kvrun.serving.adapter_resolver import AdapterResolver, Resolution
from kvrun.serving.engine_client import AdapterPublication

logger = logging.getLogger(__name__)

@dataclass(frozen=True, slots=True)
class MergePlan:
    components: tuple[Resolution, ...]
    spec: MergeSpec
    field: str  # where the request holds the merge, for errors


def merge_refused(error: MergeError, prefix: str) -> errors.ApiError:
    field = f"{prefix}.{error.field}"
    return errors.invalid(f"{field}: {error}", field)


class AdapterMerger:
    def __init__(self, resolver: AdapterResolver) -> None:
        self.resolver = resolver
        self._merges: dict[str, asyncio.Future] = {}  # engine name → merge in progress

    async def resolve(self, ids: list[str], spec: MergeSpec, resolve: Callable[[str], Awaitable[Resolution]],
                      field: str) -> Resolution:  # fmt: skip
        """The merged adapter of the adapters ids name (each resolved by `resolve`, as adapter_id would be);
        field: where the request holds the merge (`parameters.merged_adapters`), for errors."""
        try:
            spec.check(len(ids))
        except MergeError as error:
            raise merge_refused(error, field) from None
        components = []
        for index, adapter_id in enumerate(ids):
            component = await resolve(adapter_id)
            if component.adapter is None:
                raise errors.invalid(f"{field}.ids[{index}]: {adapter_id!r} is the base model, not an adapter",
                                     f"{field}.ids")  # fmt: skip
            components.append(component)
        identity = merge_identity([self.resolver.content_identity(component) for component in components], spec)
        label = f"merged:{identity[:16]}"
        return Resolution(merged_name(identity), label, sha256=identity, stale=any(c.stale for c in components),
                          merge=MergePlan(tuple(components), spec, field))  # fmt: skip

    async def publication(self, resolution: Resolution) -> AdapterPublication:
        """The merged adapter, computed once however many requests want it."""
        name = resolution.adapter
        future = self._merges.get(name)
        if future is None:
            future = asyncio.ensure_future(self._build(resolution))
            self._merges[name] = future
            future.add_done_callback(lambda _: self._merges.pop(name, None))
        return await asyncio.shield(future)  # one impatient client must not cancel the others' merge

    async def _build(self, resolution: Resolution) -> AdapterPublication:
        plan = resolution.merge
        sources = [await self.resolver.files(component) for component in plan.components]
        try:
            return await asyncio.to_thread(self._merge, resolution, sources)
        except MergeError as error:
            raise merge_refused(error, plan.field) from None
        except AdapterError as error:
            raise errors.incompatible_adapter(str(error)) from None

    def _merge(self, resolution: Resolution, sources: list[tuple[dict, bytes]]) -> AdapterPublication:
        started = time.perf_counter()
        resolver = self.resolver
        plan, name, identity = resolution.merge, resolution.adapter, resolution.sha256
        labels = [component.label for component in plan.components]
        components = []
        for component, label, (config, weights) in zip(plan.components, labels, sources):
            # fp32: the merge is computed at full precision, and rounded once to the model's dtype at load.
            parsed = parse_adapter(label, config, weights, resolver.model_config, resolver.max_rank, torch.float32)
            if component.record is None and parsed.ref.identity != resolver.content_identity(component):
                raise MergeError(f"adapter {label!r} changed on disk since it was loaded; load it again")
            components.append(parsed)
        files = merge_adapters(components, plan.spec, labels, resolver.max_rank,
                               sources[0][0].get("base_model_name_or_path"))  # fmt: skip
        resolver.spill.put(identity, files)
        directory = resolver.spill.root / identity
        config = json.loads(files[CONFIG_FILE])
        parsed = parse_adapter(name, config, files[WEIGHTS_FILE], resolver.model_config, resolver.max_rank,
                               resolver.dtype)  # fmt: skip
        logger.info("merged %s (%s) into %s in %.0f ms", ", ".join(labels), plan.spec.effective_strategy(len(labels)),
                    resolution.label, 1000 * (time.perf_counter() - started))  # fmt: skip
        source = lambda: self._reparse(name, directory)  # noqa: E731
        return AdapterPublication(parsed, source, evictable=True, directory=str(directory))

    def _reparse(self, name: str, directory: Path):
        resolver = self.resolver
        return load_peft_adapter(directory, name, resolver.model_config, resolver.max_rank, resolver.dtype)
