"""Moving file bytes in and out of a backend: content-addressed chunks, verification, garbage collection.

A push first registers every chunk it needs under its upload id with a lease (so garbage collection keeps
them), then writes only the chunks the registry lacks, identical data being stored once, renewing the lease
as it goes. A push that is killed stops renewing; once its lease is over, the next push, delete or `gc`
collects what it wrote. A chunk is never trusted on the way out: each is checked against its sha256, and
the whole file against its own.
"""

from __future__ import annotations

import hashlib
import logging
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from adapters_registry.errors import IntegrityError
from adapters_registry.records import FileEntry
from adapters_registry.storage import Storage

log = logging.getLogger(__name__)

DEFAULT_CHUNK_SIZE = 4 * 1024 * 1024
HEARTBEAT_INTERVAL_S = 5.0
Progress = Callable[[int], None]  # receives byte increments


@dataclass
class Upload:
    """Chunks written for one push; `pieces` keeps the bytes so a publish retry can write them again."""

    upload_id: str
    lease_s: float  # the push counts as dead when silent this long
    entries: list[FileEntry]
    pieces: dict[str, memoryview]
    written: set[str]

    @property
    def required_chunks(self) -> list[tuple[str, int]]:
        return [(sha, len(piece)) for sha, piece in self.pieces.items()]


def split_file(name: str, data: bytes, chunk_size: int) -> tuple[FileEntry, dict[str, memoryview]]:
    view = memoryview(data)
    pieces = {}
    chunks = []
    for start in range(0, max(len(data), 1), chunk_size):
        piece = view[start : start + chunk_size]
        sha = hashlib.sha256(piece).hexdigest()
        pieces[sha] = piece
        chunks.append(sha)
    return FileEntry(name, len(data), hashlib.sha256(data).hexdigest(), chunks), pieces


def prepare_upload(files: Mapping[str, bytes], chunk_size: int, lease_s: float) -> Upload:
    """Split and hash the files; nothing is stored yet."""
    upload = Upload(uuid.uuid4().hex, lease_s, [], {}, set())
    for name in sorted(files):
        entry, pieces = split_file(name, files[name], chunk_size)
        upload.entries.append(entry)
        upload.pieces.update(pieces)
    return upload


def store_chunks(storage: Storage, upload: Upload, progress: Progress | None = None) -> None:
    """Register the upload (protecting its chunks from GC), then write the chunks the registry lacks."""
    storage.touch_upload(upload.upload_id, list(upload.pieces), upload.lease_s)
    missing = storage.missing_chunks(list(upload.pieces))
    if progress:
        progress(sum(len(piece) for sha, piece in upload.pieces.items() if sha not in missing))
    write_chunks(storage, upload, missing, progress)


def write_chunks(storage: Storage, upload: Upload, shas: Iterable[str], progress: Progress | None = None) -> None:
    heartbeat_s = min(HEARTBEAT_INTERVAL_S, upload.lease_s / 3)  # renew well before the lease can run out
    last_heartbeat = time.monotonic()
    for sha in sorted(shas):
        piece = upload.pieces[sha]
        storage.put_chunk(sha, piece.tobytes())
        upload.written.add(sha)
        if progress:
            progress(len(piece))
        if time.monotonic() - last_heartbeat > heartbeat_s:
            storage.touch_upload(upload.upload_id, [], upload.lease_s)
            last_heartbeat = time.monotonic()


def read_file(storage: Storage, entry: FileEntry, progress: Progress | None = None) -> bytes:
    parts = []
    for index, sha in enumerate(entry.chunks):
        piece = storage.get_chunk(sha)
        if piece is None:
            raise IntegrityError(f"{entry.name}: chunk {index} ({sha[:12]}) is missing from the registry")
        if hashlib.sha256(piece).hexdigest() != sha:
            raise IntegrityError(f"{entry.name}: chunk {index} ({sha[:12]}) does not match its sha256")
        parts.append(piece)
        if progress:
            progress(len(piece))
    data = b"".join(parts)
    if len(data) != entry.size or hashlib.sha256(data).hexdigest() != entry.sha256:
        raise IntegrityError(f"{entry.name}: content does not match its recorded sha256 {entry.sha256[:12]}")
    return data


def referenced_chunks(storage: Storage) -> set[str]:
    referenced: set[str] = set()
    for name in storage.names():
        state = storage.adapter(name)
        for record in state.versions.values() if state else ():
            for entry in record.files:
                referenced.update(entry.chunks)
    return referenced


def collect_garbage(storage: Storage, candidates: Iterable[str] | None = (), silent_s: float | None = None) -> int:
    """Delete chunks no published version references and no live push holds; returns how many were deleted.

    Always considers the chunks of pushes whose lease is over (killed midway); `candidates` adds chunks to
    consider (None: every stored chunk), and `silent_s` also counts pushes silent that long as dead.
    """
    pool = None if candidates is None else set(candidates)
    deleted = storage.sweep_chunks(pool, lambda: referenced_chunks(storage), silent_s)
    if deleted:
        log.info("collected %d unreferenced chunk(s) from %s", deleted, storage.url)
    return deleted
