"""`AdapterStore`: the registry's one API, used by the CLI, training scripts and serving replicas alike.

Reads (resolve, fetch, list, events) are open; writes check the caller's token first, validate second and
store last, so a refused or rejected push changes nothing. Where bytes live is the `Storage` backend's
business (`redis_store.py`, `file_store.py`); `open_store` in `urls.py` picks one from a URL.
"""

from __future__ import annotations

import getpass
import logging
import socket
import threading
from collections.abc import Collection, Iterator, Mapping, Sequence
from pathlib import Path

from adapters_registry import changes, payload, tokens
from adapters_registry.base_model import BaseShapes, base_shapes, parse_base_config
from adapters_registry.errors import MissingChunksError, NotFoundError, RegistryError
from adapters_registry.file_store import write_atomic
from adapters_registry.names import Ref, check_base_model, check_name, check_namespace, check_user_tag, parse_ref
from adapters_registry.records import (
    DEFAULT_UPLOAD_LEASE_S,
    AdapterSummary,
    Event,
    TokenInfo,
    VersionRecord,
    content_digest,
    utc_now,
)
from adapters_registry.storage import Storage
from adapters_registry.validate import DEFAULT_LIMITS, Limits, read_adapter_dir, validate_adapter

log = logging.getLogger(__name__)

PUBLISH_ATTEMPTS = 3


def _default_pusher() -> str:
    try:
        return f"{getpass.getuser()}@{socket.gethostname()}"
    except (KeyError, OSError):  # no passwd entry in some containers
        return f"unknown@{socket.gethostname()}"


class AdapterStore:
    def __init__(
        self,
        storage: Storage,
        *,
        token: str | None = None,
        limits: Limits = DEFAULT_LIMITS,
        chunk_size: int = payload.DEFAULT_CHUNK_SIZE,
        upload_lease_s: float = DEFAULT_UPLOAD_LEASE_S,
    ):
        self.storage = storage
        self.token = token
        self.limits = limits
        self.chunk_size = chunk_size
        self.upload_lease_s = upload_lease_s

    @property
    def url(self) -> str:
        """The registry's URL for messages, credentials masked (see `redact_url`)."""
        return self.storage.url

    def __repr__(self) -> str:
        return f"AdapterStore({self.url!r})"

    def close(self) -> None:
        self.storage.close()

    def __enter__(self) -> AdapterStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- reads -------------------------------------------------------------------------------------------
    def resolve(self, ref: str | Ref) -> VersionRecord:
        """The version a ref names: `ns/name` (latest), `ns/name@3`, `ns/name:prod`."""
        ref = parse_ref(ref)
        state = self.storage.adapter(ref.name)
        version = changes.version_in(state, ref)
        return state.versions[version]  # type: ignore[union-attr]  # version_in raised if state is None

    def tags_of(self, record: VersionRecord) -> list[str]:
        state = self.storage.adapter(record.name)
        return state.tags_of(record.version) if state else []

    def versions(self, name: str) -> list[VersionRecord]:
        state = self.storage.adapter(check_name(name))
        if state is None or not state.versions:
            raise NotFoundError(f"adapter {name} not found")
        return [state.versions[v] for v in sorted(state.versions)]

    def list_adapters(self, namespace: str | None = None) -> list[AdapterSummary]:
        if namespace is not None:
            check_namespace(namespace)
        summaries = []
        for name in self.storage.names():
            if namespace is not None and not name.startswith(f"{namespace}/"):
                continue
            state = self.storage.adapter(name)
            if state and state.versions:  # a name deleted since names() was read
                latest = state.versions[state.tags.get("latest", max(state.versions))]
                summaries.append(AdapterSummary(name, sorted(state.versions), dict(sorted(state.tags.items())), latest))
        return summaries

    def fetch_files(
        self, ref: str | Ref | VersionRecord, *, progress: payload.Progress | None = None
    ) -> dict[str, bytes]:
        """The files of a version, each verified against its sha256 (IntegrityError otherwise)."""
        record = ref if isinstance(ref, VersionRecord) else self.resolve(ref)
        return {entry.name: payload.read_file(self.storage, entry, progress) for entry in record.files}

    def pull(
        self, ref: str | Ref | VersionRecord, directory: str | Path, *, progress: payload.Progress | None = None
    ) -> VersionRecord:
        """Write a version's files into `directory` (created if needed), each file replaced atomically."""
        record = ref if isinstance(ref, VersionRecord) else self.resolve(ref)
        files = self.fetch_files(record, progress=progress)
        for name, data in files.items():
            write_atomic(Path(directory) / name, data)
        return record

    # -- writes ------------------------------------------------------------------------------------------
    def push(
        self,
        source: str | Path | Mapping[str, bytes],
        name: str,
        *,
        tags: Sequence[str] = (),
        description: str = "",
        base_model: str | None = None,
        base_config: Mapping[str, object] | bytes | None = None,
        pushed_by: str | None = None,
        progress: payload.Progress | None = None,
    ) -> VersionRecord:
        """Validate and publish an adapter (a PEFT save_pretrained directory or {filename: bytes}) as the
        next version of `name`; `latest` and `tags` point at it. Raises before storing anything if refused."""
        check_name(name)
        tags = [check_user_tag(tag) for tag in tags]
        token = tokens.authorize_write(self.storage, self.token, name)
        files = dict(source) if isinstance(source, Mapping) else read_adapter_dir(source, self.limits)
        adapter = validate_adapter(files, self.limits)
        settings = adapter.settings
        base_model = base_model or settings.base_model
        base = self._base_shapes(base_model, base_config)
        if base is not None:
            base.check_adapter(adapter.shapes)
        upload = payload.prepare_upload(files, self.chunk_size, self.upload_lease_s)
        succeeded = False
        try:
            payload.store_chunks(self.storage, upload, progress)
            draft = VersionRecord(
                name=name, version=0, sha256=content_digest(upload.entries), files=upload.entries,
                base_model=base_model, rank=settings.rank, alpha=settings.alpha,
                target_modules=settings.target_list, dtype=adapter.dtype, use_rslora=settings.use_rslora,
                created_at=utc_now(), pushed_by=pushed_by or _default_pusher(), description=description,
                token_id=token.id if token else None, modules_to_save=list(settings.modules_to_save),
            )  # fmt: skip
            record = self._publish(draft, tags, upload)
            succeeded = True
            log.info("published %s (%s)", record.ref, record.sha256[:12])
            return record
        finally:
            self._clean_up(f"pushing {name}", () if succeeded else upload.written, upload.upload_id)

    def _clean_up(self, after: str, candidates: Collection[str], upload_id: str | None = None) -> None:
        """End `upload_id`, then collect `candidates` and the chunks of pushes whose lease is over (killed ones).
        Never raises: the push or delete stands, and whatever is left a later sweep collects."""
        try:
            if upload_id is not None:
                self.storage.finish_upload(upload_id)
            payload.collect_garbage(self.storage, candidates)
        except RegistryError as error:
            log.warning("cleaning up after %s in %s failed; a later sweep retries: %s", after, self.url, error)

    def _base_shapes(
        self, base_model: str | None, base_config: Mapping[str, object] | bytes | None
    ) -> BaseShapes | None:
        """Shapes to check against: an explicit config, else the one registered for the adapter's base model."""
        name = base_model or "the given base config"
        if base_config is not None:
            config = parse_base_config(base_config if isinstance(base_config, bytes) else dict(base_config), name)
            return base_shapes(config, name)
        stored = self.storage.get_base(base_model) if base_model else None
        return base_shapes(stored, name) if stored is not None else None

    def _publish(self, draft: VersionRecord, tags: Sequence[str], upload: payload.Upload) -> VersionRecord:
        outcome = changes.Outcome()
        for attempt in range(PUBLISH_ATTEMPTS):
            try:
                self.storage.commit(draft.name, changes.publish(draft, tags, outcome), upload.required_chunks)
                return outcome.records[0]
            except MissingChunksError as error:
                # A concurrent garbage collection took chunks this push found already stored; write them back.
                if attempt == PUBLISH_ATTEMPTS - 1:
                    raise
                log.warning("%s; re-uploading them", error)
                self.storage.touch_upload(upload.upload_id, error.shas, upload.lease_s)  # if our lease lapsed
                payload.write_chunks(self.storage, upload, error.shas)
        raise AssertionError("unreachable")

    def tag(self, ref: str | Ref, tag: str) -> VersionRecord:
        """Point `tag` at the version `ref` names (moving it if it pointed elsewhere)."""
        ref, tag = parse_ref(ref), check_user_tag(tag)
        tokens.authorize_write(self.storage, self.token, ref.name)
        outcome = changes.Outcome()
        self.storage.commit(ref.name, changes.set_tag(ref, tag, outcome))
        return outcome.records[0]

    def untag(self, name: str, tag: str) -> None:
        check_name(name)
        check_user_tag(tag)
        tokens.authorize_write(self.storage, self.token, name)
        self.storage.commit(name, changes.remove_tag(name, tag))

    def delete(self, ref: str | Ref) -> list[VersionRecord]:
        """Delete one version (`ns/name@3`, `ns/name:prod`) or, for a bare `ns/name`, every version."""
        ref = parse_ref(ref)
        tokens.authorize_write(self.storage, self.token, ref.name)
        outcome = changes.Outcome()
        mutation = (
            changes.delete_version(ref, outcome) if ref.selects_version else changes.delete_name(ref.name, outcome)
        )
        self.storage.commit(ref.name, mutation)
        freed = {sha for record in outcome.records for entry in record.files for sha in entry.chunks}
        self._clean_up(f"deleting {ref}", freed)
        return outcome.records

    def collect_garbage(self, lease_s: float | None = None) -> int:
        """Delete every chunk no version references and no live push holds. A push counts as dead once its
        own lease is over or, given `lease_s`, once it has been silent that long (0: every push in flight)."""
        tokens.authorize_admin(self.storage, self.token, "garbage collection", open_ok=True)
        return payload.collect_garbage(self.storage, None, silent_s=lease_s)

    # -- change events -------------------------------------------------------------------------------------
    def events(self, after_id: str | None = None, *, block_ms: int = 0, limit: int = 1000) -> list[Event]:
        """Events after `after_id` (None: from the oldest kept), waiting up to `block_ms` for one to arrive.

        If events after `after_id` were trimmed from the bounded log, the list starts with a `resync` event
        (carrying `after_id`): the caller missed changes and must re-read the adapters it cares about.
        """
        events, gap = self.storage.read_events(after_id, limit, block_ms)
        return [Event("resync", id=after_id or "", time=utc_now()), *events] if gap else events

    def last_event_id(self) -> str | None:
        return self.storage.last_event_id()

    def watch(
        self, after_id: str | None = None, *, block_ms: int = 1000, stop: threading.Event | None = None
    ) -> Iterator[Event]:
        """Yield events forever (until `stop` is set): after `after_id`, or from now when it is None."""
        last = after_id if after_id is not None else self.storage.last_event_id()
        while stop is None or not stop.is_set():
            for event in self.events(last, block_ms=block_ms):
                if event.kind != "resync":
                    last = event.id
                yield event

    # -- tokens and base models ------------------------------------------------------------------------
    def init_admin_token(self, secret: str | None = None, description: str = "admin") -> str:
        return tokens.init_admin(self.storage, secret, description)

    def create_token(
        self, scopes: Sequence[str], *, admin: bool = False, description: str = ""
    ) -> tuple[str, TokenInfo]:
        return tokens.create(self.storage, self.token, scopes, admin=admin, description=description)

    def revoke_token(self, token_id: str) -> TokenInfo:
        return tokens.revoke(self.storage, self.token, token_id)

    def list_tokens(self) -> list[TokenInfo]:
        return tokens.list_tokens(self.storage, self.token)

    def set_base_config(self, name: str, config: Mapping[str, object] | bytes) -> None:
        """Register a base model's config.json so pushes naming that base get their shapes checked."""
        check_base_model(name)
        tokens.authorize_admin(self.storage, self.token, "base set", open_ok=True)
        self.storage.put_base(name, parse_base_config(config if isinstance(config, bytes) else dict(config), name))

    def base_config(self, name: str) -> dict[str, object] | None:
        return self.storage.get_base(name)

    def list_base_models(self) -> list[str]:
        return self.storage.list_bases()
