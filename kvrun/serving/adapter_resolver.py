"""What a request's `model` / `adapter_id` means: the base model, an adapter loaded from a path, or a registry ref.

Registry refs (`ns/name`, `ns/name@3`, `ns/name:prod`) resolve to an immutable version whose canonical string
`ns/name@3` is the engine-side adapter name: a version never changes content, so the engine, its slots and its
caches never see weights change under a name. Resolutions are cached and dropped when a change event names the
adapter (see registry_watcher.py), with a TTL as a backstop. A version the engine lacks is fetched and parsed in a
worker thread — once, however many requests want it — and published on the engine thread with the request that
needed it, so requests for other adapters never wait on the registry.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from adapters_registry import AdapterStore, NotFoundError, RegistryError, UnreachableError, UsageError, parse_ref
from adapters_registry.records import Event, VersionRecord

from kvrun.adapters.manager import check_adapter_name
from kvrun.adapters.peft_format import CONFIG_FILE, WEIGHTS_FILE, AdapterError, ParsedAdapter, parse_adapter
from kvrun.config import ModelConfig
from kvrun.serving import errors
from kvrun.serving.engine_client import AdapterPublication, EngineClient

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Resolution:
    adapter: str | None  # engine-side adapter name; None = the base model
    label: str | None  # what the client wrote (None for the base model)
    record: VersionRecord | None = None  # the registry version, for registry refs


class AdapterResolver:
    def __init__(
        self,
        client: EngineClient,
        store: AdapterStore | None,
        base_names: set[str],
        model_config: ModelConfig,
        max_rank: int,
        dtype: torch.dtype,
        ttl_s: float,
    ) -> None:
        self.client = client
        self.store = store
        self.base_names = base_names
        self.model_config = model_config
        self.max_rank = max_rank
        self.dtype = dtype
        self.ttl_s = ttl_s
        self.local: dict[str, str] = {}  # adapters loaded from a path: name → path
        self._cache: dict[str, tuple[VersionRecord, float]] = {}  # ref as typed → (version, expiry)
        self._generation: dict[str, int] = {}  # adapter name → bumped by every change event naming it
        self._epoch = 0  # bumped on resync: every cached resolution is suspect
        self._fetches: dict[str, asyncio.Future] = {}  # canonical ref → parse in progress
        self._rejected: dict[tuple[str, str], str] = {}  # (canonical ref, sha256) → why it cannot be served

    # -- resolving ---------------------------------------------------------------------------------------------------
    async def resolve(self, model: str | None) -> Resolution:
        if model is None or model in self.base_names:
            return Resolution(None, None)
        if model in self.local:
            return Resolution(model, model)
        if self.store is None:
            raise errors.unknown_model(model, "This server has no adapter registry; load adapters by path.")
        try:
            ref = parse_ref(model)
        except UsageError as error:
            raise errors.unknown_model(model, str(error)) from None
        key = str(ref)
        cached = self._cache.get(key)
        if cached is not None and cached[1] > time.monotonic():
            record = cached[0]
        else:
            record = await self._lookup(key, ref.name)
        return Resolution(record.ref, model, record)

    async def _lookup(self, key: str, name: str) -> VersionRecord:
        generation = (self._epoch, self._generation.get(name, 0))
        try:
            record = await asyncio.to_thread(self.store.resolve, key)
        except NotFoundError as error:
            raise errors.unknown_model(key, str(error)) from None
        except UnreachableError as error:
            raise errors.unavailable(f"the adapter registry is unreachable: {error}") from None
        except RegistryError as error:
            raise errors.unavailable(f"the adapter registry failed: {error}") from None
        # A change event that arrived while we asked may have moved the tag: cache only an answer nothing superseded.
        if generation == (self._epoch, self._generation.get(name, 0)):
            self._cache[key] = (record, time.monotonic() + self.ttl_s)
        return record

    # -- fetching ----------------------------------------------------------------------------------------------------
    async def publication(self, record: VersionRecord) -> AdapterPublication:
        """The parsed version, fetched and parsed off the event loop; concurrent callers share one fetch."""
        canonical = record.ref
        rejected = self._rejected.get((canonical, record.sha256))
        if rejected is not None:
            raise errors.incompatible_adapter(rejected)
        future = self._fetches.get(canonical)
        if future is None:
            future = asyncio.ensure_future(asyncio.to_thread(self._fetch_and_parse, record))
            self._fetches[canonical] = future
            future.add_done_callback(lambda _: self._fetches.pop(canonical, None))
        try:
            parsed = await asyncio.shield(future)  # one impatient client must not cancel the others' fetch
        except AdapterError as error:
            self._rejected[(canonical, record.sha256)] = str(error)
            raise errors.incompatible_adapter(str(error)) from None
        except NotFoundError as error:
            raise errors.unknown_model(canonical, str(error)) from None
        except RegistryError as error:
            raise errors.unavailable(f"fetching {canonical} from the registry failed: {error}") from None
        return AdapterPublication(parsed, lambda: self._fetch_and_parse(record))

    def _fetch_and_parse(self, record: VersionRecord) -> ParsedAdapter:
        started = time.perf_counter()
        files = self.store.fetch_files(record)
        name = record.ref
        try:
            config = json.loads(files[CONFIG_FILE])
        except (KeyError, ValueError) as error:
            raise AdapterError(f"adapter {name!r}: {CONFIG_FILE} is missing or not JSON ({error})") from None
        if WEIGHTS_FILE not in files:
            raise AdapterError(f"adapter {name!r}: {WEIGHTS_FILE} is missing")
        parsed = parse_adapter(
            name, config, files[WEIGHTS_FILE], self.model_config, self.max_rank, self.dtype, record.version
        )
        logger.info("fetched and parsed %s in %.0f ms", name, 1000 * (time.perf_counter() - started))
        return parsed

    # -- adapters loaded from a path (vLLM's /v1/load_lora_adapter) ------------------------------------------------
    async def load_local(self, name: str, path: str, replace: bool) -> None:
        try:
            check_adapter_name(name)
        except ValueError as error:
            raise errors.invalid(str(error), "lora_name") from None
        if name in self.base_names:
            raise errors.invalid(f"{name!r} is the base model's name", "lora_name")
        if name in self.local and not replace:
            raise errors.invalid(f"The lora adapter '{name}' has already been loaded.", "lora_name")
        manager = self.client.engine.adapters
        if manager is None:
            raise errors.invalid("LoRA is disabled on this server (--max-loras 0)")
        if not Path(path).expanduser().is_dir():
            raise errors.invalid(f"lora_path {path!r} is not a directory on the server", "lora_path")
        try:
            # parse_path reads only the manager's immutable config, so it is safe off the engine thread.
            parsed = await asyncio.to_thread(manager.parse_path, name, path)
        except AdapterError as error:
            raise errors.incompatible_adapter(str(error)) from None
        source = lambda: manager.parse_path(name, path, parsed.ref.version)  # noqa: E731
        await self.client.publish(name, AdapterPublication(parsed, source, evictable=False))
        self.local[name] = path

    async def unload(self, name: str) -> None:
        removed = await self.client.remove_adapter(name)
        self.local.pop(name, None)
        if not removed:
            raise errors.ApiError(404, f"The lora adapter '{name}' cannot be found.", type="not_found_error",
                                  param="lora_name", code="adapter_not_found", tgi_type="not_found")  # fmt: skip

    # -- change events (called on the event loop by the registry watcher) ------------------------------------------
    def on_event(self, event: Event) -> None:
        if event.kind == "resync":
            self._epoch += 1
            self._cache.clear()
            return
        self._generation[event.name] = self._generation.get(event.name, 0) + 1
        for key in [key for key, (record, _) in self._cache.items() if record.name == event.name]:
            del self._cache[key]
        loaded = [name for name in self.client.adapter_names if _version_of(name, event.name, None)]
        if event.kind == "delete":
            for name in loaded:
                if _version_of(name, event.name, event.version):  # in-flight requests hold it and finish on it
                    _background(self.client.remove_adapter(name), f"unloading {name}")
        elif event.kind in ("publish", "tag") and loaded and event.version is not None:
            # The adapter is in use here: load the version its tag now names before requests ask for it.
            _background(self._prefetch(event.name, event.version), f"prefetching {event.name}@{event.version}")
        logger.info("registry %s %s%s: resolutions refreshed", event.kind, event.name,
                    "" if event.version is None else f"@{event.version}")  # fmt: skip

    async def _prefetch(self, name: str, version: int) -> None:
        canonical = f"{name}@{version}"
        generation = self._generation.get(name, 0)
        if canonical in self.client.adapter_names:
            return
        record = await asyncio.to_thread(self.store.resolve, canonical)
        publication = await self.publication(record)
        if self._generation.get(name, 0) == generation:  # a later change (e.g. a delete) makes it moot
            await self.client.publish(canonical, publication)


def _background(coroutine, what: str) -> None:
    """Run a best-effort task; a failure is logged (the next request that needs it retries the same work)."""

    def report(task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            logger.warning("%s failed: %s", what, task.exception())

    asyncio.ensure_future(coroutine).add_done_callback(report)


def _version_of(engine_name: str, adapter: str, version: int | None) -> bool:
    if version is None:
        return engine_name.startswith(f"{adapter}@")
    return engine_name == f"{adapter}@{version}"
