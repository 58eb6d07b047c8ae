"""Directory backend (the embedded default, `file:///path`): the same behaviour as Redis on one machine.

    {root}/.lock                        fcntl lock taken by every metadata change
    {root}/adapters/{ns}/{name}.json    AdapterState: counter, versions (VersionRecord), tags
    {root}/chunks/{sha[:2]}/{sha}       content-addressed chunks
    {root}/uploads/{id}.json            pushes in progress: lease (heartbeat, expiry) + the chunks they rely on
    {root}/events.log                   change log, one Event JSON per line, ids 1, 2, 3, ...
    {root}/tokens.json, bases.json      token records (hashed) and base model configs

Every file is replaced atomically (write a temporary file, then rename), so readers need no lock and never
see a half-written file; writers serialize on `.lock`, which also makes version numbers distinct across
processes. Watchers poll `events.log` (a stat per poll; the file is parsed again only when it changed).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import time
import uuid
from collections.abc import Callable, Collection, Iterator, Sequence
from pathlib import Path

import msgspec

from adapters_registry.errors import MissingChunksError, UnreachableError, UsageError
from adapters_registry.records import DEFAULT_UPLOAD_LEASE_S, AdapterState, Event, FileUpload, TokenRecord
from adapters_registry.redaction import redact_url
from adapters_registry.storage import Mutation, Result

log = logging.getLogger(__name__)

_state_decoder = msgspec.json.Decoder(AdapterState)
_event_decoder = msgspec.json.Decoder(Event)
_tokens_decoder = msgspec.json.Decoder(dict[str, TokenRecord])
_upload_decoder = msgspec.json.Decoder(FileUpload)
_POLL_INTERVAL_S = 0.05


def write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
    temporary.write_bytes(data)
    os.replace(temporary, path)


class FileStorage:
    def __init__(self, root: str | Path, events_maxlen: int = 10_000):
        self.root = Path(root).expanduser()
        self.url = redact_url(f"file://{self.root}")
        self.events_maxlen = events_maxlen
        self._events_cache: tuple[tuple[int, int, int], list[Event]] | None = None
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise UnreachableError(f"registry {self.url} is not usable: {error.strerror}") from None

    def __repr__(self) -> str:
        return f"FileStorage({self.url!r})"

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.root / ".lock", "a+b") as lock_file:
            fcntl.flock(lock_file, fcntl.LOCK_EX)  # released when the file closes, even if we are killed
            yield

    # -- chunks ----------------------------------------------------------------------------------------
    def _chunk_path(self, sha: str) -> Path:
        return self.root / "chunks" / sha[:2] / sha

    def missing_chunks(self, shas: Sequence[str]) -> set[str]:
        return {sha for sha in shas if not self._chunk_path(sha).is_file()}

    def put_chunk(self, sha: str, data: bytes) -> None:
        write_atomic(self._chunk_path(sha), data)

    def get_chunk(self, sha: str) -> bytes | None:
        try:
            return self._chunk_path(sha).read_bytes()
        except FileNotFoundError:
            return None

    def list_chunks(self) -> Iterator[str]:
        return (path.name for path in (self.root / "chunks").glob("*/*") if not path.name.startswith("."))

    # -- uploads ---------------------------------------------------------------------------------------
    def _upload_path(self, upload_id: str) -> Path:
        return self.root / "uploads" / f"{upload_id}.json"

    @staticmethod
    def _read_upload(path: Path) -> FileUpload | None:
        try:
            return _upload_decoder.decode(path.read_bytes())
        except (FileNotFoundError, msgspec.DecodeError):
            return None

    def touch_upload(self, upload_id: str, shas: Sequence[str], lease_s: float) -> None:
        # Under the lock, like sweep_chunks: a sweep never decides on a half-registered upload.
        with self._locked():
            now = time.time()
            path = self._upload_path(upload_id)
            known = self._read_upload(path)
            chunks = sorted(set(known.chunks if known else ()) | set(shas))
            write_atomic(path, msgspec.json.encode(FileUpload(now, now + lease_s, chunks)))

    def finish_upload(self, upload_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._upload_path(upload_id).unlink()

    def sweep_chunks(
        self, candidates: Collection[str] | None, in_use: Callable[[], set[str]], silent_s: float | None = None
    ) -> int:
        # The lock serializes this with touch_upload and commit, so nothing registers or publishes meanwhile.
        with self._locked():
            now = time.time()
            pool = set(self.list_chunks() if candidates is None else candidates)
            live: set[str] = set()
            over: dict[Path, list[str]] = {}
            for path in (self.root / "uploads").glob("*.json"):
                upload = self._read_upload(path)
                if upload is not None and not upload.is_over(now, silent_s):
                    live.update(upload.chunks)
                else:
                    over[path] = upload.chunks if upload is not None else []
            abandoned = {sha for chunks in over.values() for sha in chunks} - live
            pool = (pool | abandoned) - live
            if pool:
                pool -= in_use()
            deleted = sum(self._delete_chunk(sha) for sha in pool)
            for path in over:
                log.info("dropped upload %s (lease over)", path.stem)
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
            full_sweep_age = DEFAULT_UPLOAD_LEASE_S if silent_s is None else silent_s
            self._remove_temporaries(abandoned, now - full_sweep_age if candidates is None else None)
            return deleted

    def _delete_chunk(self, sha: str) -> bool:
        try:
            self._chunk_path(sha).unlink()
            return True
        except FileNotFoundError:
            return False

    def _remove_temporaries(self, shas: Collection[str], before: float | None) -> None:
        """Half-written chunk files of writers killed before their rename: those of `shas`, and when `before`
        is given every temporary file in the registry older than it (younger ones may still be in flight)."""
        for sha in shas:
            for path in self._chunk_path(sha).parent.glob(f".{sha}.*.tmp"):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
        for path in self.root.glob("**/.*.tmp") if before is not None else ():
            with contextlib.suppress(FileNotFoundError):
                if path.stat().st_mtime < before:
                    path.unlink()

    # -- adapters --------------------------------------------------------------------------------------
    def _adapter_path(self, name: str) -> Path:
        namespace, short_name = name.split("/")
        return self.root / "adapters" / namespace / f"{short_name}.json"

    def names(self) -> list[str]:
        names = []
        for path in sorted((self.root / "adapters").glob("*/*.json")):
            name = f"{path.parent.name}/{path.stem}"
            state = self.adapter(name)
            if state is not None and state.versions:
                names.append(name)
        return names

    def adapter(self, name: str) -> AdapterState | None:
        try:
            return _state_decoder.decode(self._adapter_path(name).read_bytes())
        except FileNotFoundError:
            return None

    def commit(
        self, name: str, mutation: Mutation, required_chunks: Sequence[tuple[str, int]] = ()
    ) -> tuple[AdapterState, list[Event]]:
        with self._locked():
            missing = sorted({sha for sha, size in required_chunks if self._chunk_size(sha) != size})
            if missing:
                raise MissingChunksError(missing)
            state = self.adapter(name) or AdapterState()
            events = mutation(state)
            write_atomic(self._adapter_path(name), msgspec.json.encode(state))
            return state, self._append_events(events)

    def _chunk_size(self, sha: str) -> int | None:
        try:
            return self._chunk_path(sha).stat().st_size
        except FileNotFoundError:
            return None

    # -- change log ------------------------------------------------------------------------------------
    @property
    def _events_path(self) -> Path:
        return self.root / "events.log"

    def _append_events(self, events: list[Event]) -> list[Event]:
        """Caller holds the lock. Ids continue from the last line; the log is trimmed with 10% slack."""
        logged = self._load_events()
        next_id = int(logged[-1].id) + 1 if logged else 1
        stamped = [msgspec.structs.replace(e, id=str(next_id + i)) for i, e in enumerate(events)]
        lines = b"".join(msgspec.json.encode(event) + b"\n" for event in stamped)
        if len(logged) + len(stamped) > self.events_maxlen + max(1, self.events_maxlen // 10):
            kept = (logged + stamped)[-self.events_maxlen :]
            write_atomic(self._events_path, b"".join(msgspec.json.encode(e) + b"\n" for e in kept))
        else:
            with open(self._events_path, "ab") as log_file:
                log_file.write(lines)  # one write of whole lines; readers skip an unterminated last line
        return stamped

    def _load_events(self) -> list[Event]:
        try:
            stat = self._events_path.stat()
        except FileNotFoundError:
            return []
        signature = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
        if self._events_cache is not None and self._events_cache[0] == signature:
            return self._events_cache[1]
        data = self._events_path.read_bytes()
        complete = data[: data.rfind(b"\n") + 1]
        events = [_event_decoder.decode(line) for line in complete.splitlines() if line]
        self._events_cache = (signature, events)
        return events

    def read_events(self, after_id: str | None, limit: int, block_ms: int) -> tuple[list[Event], bool]:
        if after_id is not None and not after_id.isdigit():
            raise UsageError(f"invalid event id {after_id!r}: event ids are decimal numbers")
        after = int(after_id or 0)
        deadline = time.monotonic() + block_ms / 1000
        while True:
            logged = self._load_events()
            gap = after_id is not None and self._trimmed_after(logged, after)
            newer = [event for event in logged if int(event.id) > after][:limit]
            if newer or gap or time.monotonic() >= deadline:
                return newer, gap
            time.sleep(_POLL_INTERVAL_S)

    @staticmethod
    def _trimmed_after(logged: list[Event], after: int) -> bool:
        """True if events after `after` are gone: trimmed away, or the whole log was reset."""
        if not logged:
            return after > 0
        return int(logged[0].id) > after + 1 or int(logged[-1].id) < after

    def last_event_id(self) -> str | None:
        logged = self._load_events()
        return logged[-1].id if logged else None

    # -- tokens and base configs -----------------------------------------------------------------------
    @property
    def _tokens_path(self) -> Path:
        return self.root / "tokens.json"

    def _read_tokens(self) -> dict[str, TokenRecord]:
        try:
            return _tokens_decoder.decode(self._tokens_path.read_bytes())
        except FileNotFoundError:
            return {}

    def get_token(self, token_id: str) -> TokenRecord | None:
        return self._read_tokens().get(token_id)

    def list_tokens(self) -> list[TokenRecord]:
        return list(self._read_tokens().values())

    def update_tokens(self, change: Callable[[dict[str, TokenRecord]], Result]) -> Result:
        with self._locked():
            tokens = self._read_tokens()
            result = change(tokens)
            write_atomic(self._tokens_path, msgspec.json.encode(tokens))
            return result

    @property
    def _bases_path(self) -> Path:
        return self.root / "bases.json"

    def _read_bases(self) -> dict[str, dict[str, object]]:
        try:
            return msgspec.json.decode(self._bases_path.read_bytes())
        except FileNotFoundError:
            return {}

    def get_base(self, name: str) -> dict[str, object] | None:
        return self._read_bases().get(name)

    def put_base(self, name: str, config: dict[str, object]) -> None:
        with self._locked():
            bases = self._read_bases()
            bases[name] = config
            write_atomic(self._bases_path, msgspec.json.encode(bases))

    def list_bases(self) -> list[str]:
        return sorted(self._read_bases())

    def close(self) -> None:
        pass
