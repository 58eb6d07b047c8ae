"""What a request's `model` / `adapter_id` means: the base model, an adapter loaded from a path, or a registry ref.

Identity is content. A registry ref (`ns/name`, `ns/name@3`, `ns/name:prod`) resolves to a version record, and the
engine knows that version by its canonical ref *and* its content digest (see adapter_names.py), so a version number
the registry reuses after losing its data (same `ns/name@1`, other weights) can never select the weights the engine
already holds under the old digest.

Names are namespaced. Registry names always hold a `/` (`ns/name`); on a server with a registry, adapters loaded
from a path must use names without one, so a path load can neither claim a registry name (pushed or not) nor
shadow one, and /v1/unload_lora_adapter cannot remove registry versions.

Resolutions are remembered: fresh for `ttl_s` (a change event naming the adapter, or a resync, ends that early),
and afterwards as the last known answer. When the registry does not answer, a ref whose last known version the
engine holds keeps serving it (marked stale); anything else gets 503 with Retry-After. A version the engine lacks is
fetched and parsed on the registry pool, once however many requests want it, and published to the engine
with the request that needed it, so requests for other adapters never wait on the registry.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from adapters_registry import NotFoundError, UsageError, parse_ref
from adapters_registry.records import Event, VersionRecord

from kvrun.adapters.manager import check_adapter_name
from kvrun.adapters.peft_format import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    AdapterError,
    ParsedAdapter,
    load_peft_adapter,
    parse_adapter,
    read_adapter_config,
    read_weights_file,
)
from kvrun.adapters.ref import AdapterRef
from kvrun.runtime.models.spec import ModelConfig
from kvrun.serving import errors
from kvrun.serving.adapter_names import engine_name, held_digests, parse_engine_name
from kvrun.serving.engine_client import AdapterPublication, EngineClient
from kvrun.serving.registry_client import RETRY_AFTER_S, RegistryClient, RegistryUnavailable
from kvrun.serving.spill import SpillDirectory

if TYPE_CHECKING:
    from kvrun.serving.adapter_merger import MergePlan

logger = logging.getLogger(__name__)

MAX_KNOWN = 10_000  # remembered resolutions (refs as clients typed them); least recently used are forgotten


@dataclass(frozen=True, slots=True)
class Resolution:
    adapter: str | None  # engine-side adapter name; None = the base model
    label: str | None  # what the client wrote (None for the base model)
    record: VersionRecord | None = None  # the registry version, for registry refs
    sha256: str | None = None  # the content served: the registry's digest, or the weights' sha256 for path loads
    stale: bool = False  # the registry did not answer: its last known answer, for a version the engine holds
    merge: MergePlan | None = None  # a merged adapter: its components and parameters (sha256: the merge identity)

    @property
    def served(self) -> str | None:
        """What is served, as clients name it: `ns/name@3`, a path-loaded name, or `merged:<identity>`."""
        return self.record.ref if self.record is not None else self.adapter

    def headers(self) -> dict[str, str]:
        if self.adapter is None:
            return {}
        headers = {"x-kvrun-adapter": self.served, "x-kvrun-adapter-sha256": self.sha256 or ""}
        if self.stale:
            headers["x-kvrun-adapter-stale"] = "true"
        return headers


@dataclass(slots=True)
class KnownResolution:
    record: VersionRecord
    fresh_until: float  # time.monotonic(); afterwards (or once an event names the adapter) ask the registry again


def registry_unavailable(message: str) -> errors.ApiError:
    return errors.ApiError(503, message, type="server_error", code="registry_unavailable", tgi_type="unavailable",
                           headers={"Retry-After": str(RETRY_AFTER_S)})  # fmt: skip


class AdapterResolver:
    def __init__(
        self,
        client: EngineClient,
        registry: RegistryClient | None,
        base_names: set[str],
        model_config: ModelConfig,
        max_rank: int,
        dtype: torch.dtype,
        ttl_s: float,
    ) -> None:
        self.client = client
        self.registry = registry
        self.base_names = base_names
        self.model_config = model_config
        self.max_rank = max_rank
        self.dtype = dtype
        self.ttl_s = ttl_s
        self.local: dict[str, str] = {}  # adapters loaded from a path: name → path
        self._local_refs: dict[str, AdapterRef] = {}  # name → the identity of what was loaded
        self._known: OrderedDict[str, KnownResolution] = OrderedDict()  # ref as typed → its last resolution
        self._generation: dict[str, int] = {}  # adapter name → bumped by every change event naming it
        self._epoch = 0  # bumped on resync: every resolution is suspect
        self._fetches: dict[str, asyncio.Future] = {}  # engine name → fetch and parse in progress
        self._rejected: dict[str, str] = {}  # sha256 → why that content cannot be served here
        # Local copies of registry versions and of merged adapters, for re-parsing without I/O to the registry.
        self.spill = SpillDirectory()

    def close(self) -> None:
        self.spill.remove()

    # -- resolving ---------------------------------------------------------------------------------------------------
    async def resolve(self, model: str | None) -> Resolution:
        if model is None or model in self.base_names:
            return Resolution(None, None)
        if model in self.local:
            return Resolution(model, model, sha256=self._local_refs[model].sha256)
        if self.registry is None:
            raise errors.unknown_model(model, "This server has no adapter registry; load adapters by path.")
        try:
            ref = parse_ref(model)
        except UsageError as error:
            raise errors.unknown_model(model, str(error)) from None
        key = str(ref)
        known = self._known.get(key)
        if known is not None:
            self._known.move_to_end(key)
            if known.fresh_until > time.monotonic():
                return self._resolution(model, known.record)
            if not self.registry.reachable and self._holds(known.record):
                return self._resolution(model, known.record, stale=True)  # no need to wait for a registry that's down
        try:
            record = await self._lookup(key, ref.name)
        except RegistryUnavailable as error:
            known = self._known.get(key)  # a delete event may have dropped it meanwhile
            if known is not None and self._holds(known.record):
                return self._resolution(model, known.record, stale=True)
            raise registry_unavailable(f"{error}; adapter {model} is not loaded here, retry shortly") from None
        return self._resolution(model, record)

    def _resolution(self, model: str, record: VersionRecord, stale: bool = False) -> Resolution:
        return Resolution(engine_name(record), model, record, record.sha256, stale)

    def _holds(self, record: VersionRecord) -> bool:
        return engine_name(record) in self.client.adapter_names

    async def _lookup(self, key: str, name: str) -> VersionRecord:
        generation = (self._epoch, self._generation.get(name, 0))
        try:
            record = await self.registry.call(self.registry.store.resolve, key)
        except NotFoundError as error:  # the registry answered: the name, version or tag is gone
            self._known.pop(key, None)
            raise errors.unknown_model(key, str(error)) from None
        # A change event that arrived while we asked may have moved the tag: keep only an answer nothing superseded.
        if generation == (self._epoch, self._generation.get(name, 0)):
            self._remember(key, record)
        return record

    def _remember(self, key: str, record: VersionRecord) -> None:
        self._known[key] = KnownResolution(record, time.monotonic() + self.ttl_s)
        self._known.move_to_end(key)
        while len(self._known) > MAX_KNOWN:
            self._known.popitem(last=False)

    def known(self) -> dict[str, VersionRecord]:
        """The last known resolution of every ref clients used (what /v1/adapters shows while the registry is down)."""
        return {key: known.record for key, known in self._known.items()}

    # -- fetching ----------------------------------------------------------------------------------------------------
    async def publication(self, record: VersionRecord) -> AdapterPublication:
        """The parsed version, fetched and parsed on the registry pool; concurrent callers share one fetch."""
        rejected = self._rejected.get(record.sha256)
        if rejected is not None:
            raise errors.incompatible_adapter(rejected)
        name = engine_name(record)
        future = self._fetches.get(name)
        if future is None:
            future = asyncio.ensure_future(self.registry.fetch(self._fetch_and_parse, record))
            self._fetches[name] = future
            future.add_done_callback(lambda _: self._fetches.pop(name, None))
        try:
            parsed = await asyncio.shield(future)  # one impatient client must not cancel the others' fetch
        except AdapterError as error:
            self._rejected[record.sha256] = str(error)
            raise errors.incompatible_adapter(str(error)) from None
        except NotFoundError as error:
            raise errors.unknown_model(record.ref, str(error)) from None
        except RegistryUnavailable as error:
            raise registry_unavailable(f"fetching {record.ref}: {error}") from None
        directory = str(self.spill.root / record.sha256)
        return AdapterPublication(parsed, lambda: self._reparse(record), directory=directory)

    async def files(self, resolution: Resolution) -> tuple[dict, bytes]:
        """The PEFT config and weights of a registry version or a path-loaded adapter (for merging): from the local
        copy, else fetched (and checked) as a publication is."""
        if resolution.record is None:
            path = Path(self.local[resolution.adapter])
            name = resolution.adapter
            return await asyncio.to_thread(lambda: (read_adapter_config(path / CONFIG_FILE, name),
                                                    read_weights_file(path, name)))  # fmt: skip
        names = (CONFIG_FILE, WEIGHTS_FILE)
        files = self.spill.get(resolution.record.sha256, names)
        if files is None:
            await self.publication(resolution.record)  # fetches, parses (refusing what cannot be served), keeps a copy
            files = self.spill.get(resolution.record.sha256, names)
        if files is None:
            raise registry_unavailable(f"the local copy of {resolution.record.ref} vanished; retry")
        return json.loads(files[CONFIG_FILE]), files[WEIGHTS_FILE]

    def content_identity(self, resolution: Resolution) -> str:
        """What an adapter's outputs depend on: a registry version's content digest, or a path load's weights and
        settings."""
        if resolution.record is not None:
            return resolution.record.sha256
        return self._local_refs[resolution.adapter].identity

    def _fetch_and_parse(self, record: VersionRecord) -> ParsedAdapter:
        started = time.perf_counter()
        files = self.registry.store.fetch_files(record)
        parsed = self._parse(record, files)
        self.spill.prune(held_digests(self.client.adapter_names))
        self.spill.put(record.sha256, files)  # only content that parsed is kept for re-parsing
        logger.info("fetched and parsed %s in %.0f ms", record.ref, 1000 * (time.perf_counter() - started))
        return parsed

    def _reparse(self, record: VersionRecord) -> ParsedAdapter:
        """On the engine thread, when the host cache dropped a version the engine still names: from the local
        copy, so no registry I/O (and no registry outage) reaches the engine thread; the registry is the fallback.
        (An engine core process re-parses the same local copy, `AdapterPublication.directory`, and has no fallback.)"""
        files = self.spill.get(record.sha256, (CONFIG_FILE, WEIGHTS_FILE))
        if files is None:
            logger.warning("the local copy of %s is gone; fetching it from the registry again", record.ref)
            files = self.registry.store.fetch_files(record)
        return self._parse(record, files)

    def _parse(self, record: VersionRecord, files: dict[str, bytes]) -> ParsedAdapter:
        name = engine_name(record)
        try:
            config = json.loads(files[CONFIG_FILE])
        except (KeyError, ValueError) as error:
            raise AdapterError(f"adapter {record.ref!r}: {CONFIG_FILE} is missing or not JSON ({error})") from None
        if WEIGHTS_FILE not in files:
            raise AdapterError(f"adapter {record.ref!r}: {WEIGHTS_FILE} is missing")
        return parse_adapter(
            name, config, files[WEIGHTS_FILE], self.model_config, self.max_rank, self.dtype, record.version
        )

    # -- adapters loaded from a path (vLLM's /v1/load_lora_adapter) ------------------------------------------------
    def _check_local_name(self, name: str) -> None:
        if self.registry is not None and "/" in name:
            raise errors.invalid(
                f"lora_name {name!r} has the form of an adapter registry name (namespace/name); those belong to the "
                "registry, so an adapter loaded from a path cannot take one. Use a name without '/', or push the "
                "adapter with `kvrun-adapters push`.",
                "lora_name",
            )

    async def load_local(self, name: str, path: str, replace: bool) -> None:
        try:
            check_adapter_name(name)
        except ValueError as error:
            raise errors.invalid(str(error), "lora_name") from None
        self._check_local_name(name)
        if name in self.base_names:
            raise errors.invalid(f"{name!r} is the base model's name", "lora_name")
        if name in self.local and not replace:
            raise errors.invalid(f"The lora adapter '{name}' has already been loaded.", "lora_name")
        if self.client.info.adapter_dtype is None:
            raise errors.invalid("LoRA is disabled on this server (--max-loras 0)")
        if not _is_directory(path):
            raise errors.invalid(f"lora_path {path[:200]!r} is not a directory on the server", "lora_path")
        try:
            parsed = await asyncio.to_thread(self._parse_path, name, path)
        except AdapterError as error:
            raise errors.incompatible_adapter(str(error)) from None
        source = lambda: self._parse_path(name, path, parsed.ref.version)  # noqa: E731
        await self.client.publish(name, AdapterPublication(parsed, source, evictable=False, directory=path))
        self.local[name] = path
        self._local_refs[name] = parsed.ref

    def _parse_path(self, name: str, path: str, version: int = 0) -> ParsedAdapter:
        return load_peft_adapter(path, name, self.model_config, self.max_rank, self.dtype, version)

    async def unload(self, name: str) -> None:
        if name not in self.local:
            self._check_local_name(name)  # a registry version is removed from the registry, not from one replica
            raise errors.ApiError(404, f"The lora adapter '{name}' cannot be found.", type="not_found_error",
                                  param="lora_name", code="adapter_not_found", tgi_type="not_found")  # fmt: skip
        await self.client.remove_adapter(name)
        self.local.pop(name, None)
        self._local_refs.pop(name, None)

    # -- change events (called on the event loop by the registry watcher) ------------------------------------------
    def on_event(self, event: Event) -> None:
        if event.kind == "resync":
            self._epoch += 1
            for known in self._known.values():
                known.fresh_until = 0.0
            return
        self._generation[event.name] = self._generation.get(event.name, 0) + 1
        deleted = event.kind == "delete"
        for key, known in list(self._known.items()):
            if known.record.name != event.name:
                continue
            if deleted and event.version in (None, known.record.version):
                del self._known[key]  # never served again, not even while the registry is down
            else:
                known.fresh_until = 0.0
        loaded = [name for name in self.client.adapter_names if (parse_engine_name(name) or ("",))[0] == event.name]
        if deleted:
            for name in loaded:
                if event.version in (None, parse_engine_name(name)[1]):  # in-flight requests hold it and finish on it
                    _background(self.client.remove_adapter(name), f"unloading {name}")
        elif event.kind in ("publish", "tag") and loaded and event.version is not None:
            # The adapter is in use here: load the version its tags now name before requests ask for it.
            tags = event.tags if event.kind == "publish" else [event.tag]
            _background(self._prefetch(event.name, event.version, tags), f"prefetching {event.name}@{event.version}")
        logger.info("registry %s %s%s: resolutions refreshed", event.kind, event.name,
                    "" if event.version is None else f"@{event.version}")  # fmt: skip

    async def _prefetch(self, name: str, version: int, tags: list[str | None]) -> None:
        generation = (self._epoch, self._generation.get(name, 0))
        record = await self.registry.call(self.registry.store.resolve, f"{name}@{version}")
        if engine_name(record) not in self.client.adapter_names:
            publication = await self.publication(record)
            if generation != (self._epoch, self._generation.get(name, 0)):
                return  # a later change (e.g. a delete) makes it moot
            await self.client.publish(engine_name(record), publication)
        if generation == (self._epoch, self._generation.get(name, 0)):
            # The event said which tags name this version now: new requests need not ask the registry.
            for tag in tags:
                if tag == "latest":
                    self._remember(name, record)
                if tag:
                    self._remember(f"{name}:{tag}", record)


def _background(coroutine, what: str) -> None:
    """Run a best-effort task; a failure is logged (the next request that needs it retries the same work)."""

    def report(task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            logger.warning("%s failed: %s", what, task.exception())

    asyncio.ensure_future(coroutine).add_done_callback(report)


def _is_directory(path: str) -> bool:
    """False also for a path the OS cannot look up (too long, a NUL byte, an unknown ~user)."""
    try:
        return Path(path).expanduser().is_dir()
    except (OSError, ValueError, RuntimeError):
        return False
