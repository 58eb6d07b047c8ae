"""The registry's stored and returned records (msgspec Structs; JSON on the wire and at rest).

Version records and events are read by serving replicas that may be older than the registry that wrote
them, so they tolerate unknown fields (forward compatibility). Token records do not: a token record we do
not fully understand must never grant anything, so it fails closed.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from typing import Literal

import msgspec


def utc_now() -> datetime:
    return datetime.now(UTC)


class FileEntry(msgspec.Struct, frozen=True):
    name: str  # "adapter_config.json" | "adapter_model.safetensors"
    size: int  # bytes
    sha256: str  # hex digest of the whole file
    chunks: list[str]  # sha256 hex of each stored piece (<= chunk size), in file order


class VersionRecord(msgspec.Struct, frozen=True):
    """One immutable published version. `(name, version)` and `sha256` never change once published."""

    name: str  # "namespace/name"
    version: int  # 1, 2, ... never reused, even after deletes
    sha256: str  # content digest over the files (see content_digest); the identity serving caches key on
    files: list[FileEntry]
    base_model: str | None
    rank: int
    alpha: float
    target_modules: list[str]
    dtype: str  # safetensors dtype of the weights: "F32" | "F16" | "BF16"
    use_rslora: bool
    created_at: datetime
    pushed_by: str
    description: str = ""
    token_id: str | None = None  # the token that authorized the push, when the registry has tokens
    # layers the adapter holds whole copies of (PEFT's modules_to_save): a server needs full-module slots for them
    modules_to_save: list[str] = msgspec.field(default_factory=list)

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def size(self) -> int:
        return sum(entry.size for entry in self.files)

    @property
    def scaling(self) -> float:
        """PEFT's LoRA scaling: alpha / r, or alpha / sqrt(r) with rsLoRA."""
        return self.alpha / (self.rank**0.5 if self.use_rslora else self.rank)

    def file(self, name: str) -> FileEntry:
        for entry in self.files:
            if entry.name == name:
                return entry
        raise KeyError(name)


def content_digest(files: list[FileEntry]) -> str:
    """sha256 over the sorted `name sha256` lines: equal for byte-identical pushes, whatever their name."""
    lines = "".join(f"{entry.name} {entry.sha256}\n" for entry in sorted(files, key=lambda e: e.name))
    return hashlib.sha256(lines.encode()).hexdigest()


class AdapterState(msgspec.Struct):
    """Everything stored about one adapter name (what the file backend keeps in one JSON file)."""

    counter: int = 0  # highest version ever assigned; kept after deletes so numbers are never reused
    versions: dict[int, VersionRecord] = {}
    tags: dict[str, int] = {}

    def tags_of(self, version: int) -> list[str]:
        return sorted(tag for tag, tagged in self.tags.items() if tagged == version)


class AdapterSummary(msgspec.Struct, frozen=True):
    """One line of `list`: a name, its versions and tags, and the record `latest` points to."""

    name: str
    versions: list[int]
    tags: dict[str, int]
    latest: VersionRecord


EventKind = Literal["publish", "tag", "untag", "delete", "resync"]


class Event(msgspec.Struct, frozen=True, omit_defaults=True):
    """A change to the registry, in change-log order.

    `resync` is synthesized for a reader whose last-seen id fell off the bounded log: it must re-list
    everything it cares about, since some changes are lost to it.
    """

    kind: EventKind
    name: str = ""
    version: int | None = None  # None for a delete of the whole name
    tag: str | None = None  # the tag set or removed (tag / untag)
    tags: list[str] = []  # publish: tags pointing at the new version; delete: tags removed with it
    sha256: str | None = None  # publish: the new version's content digest
    time: datetime | None = None
    id: str = ""  # change-log position "1", "2", ... in both backends (Redis stream id "N-0")


DEFAULT_UPLOAD_LEASE_S = 900.0  # a push silent this long is presumed dead; its chunks become garbage


class UploadLease(msgspec.Struct, frozen=True):
    """A push in progress: when it last showed life and until when it counts as alive (backend clock, unix s)."""

    heartbeat: float
    expires: float | None = None  # None: written before uploads carried their own lease

    def is_over(self, now: float, silent_s: float | None = None) -> bool:
        """True once the lease ran out, or once the push has been silent for `silent_s` (an operator's override)."""
        expires = self.expires if self.expires is not None else self.heartbeat + DEFAULT_UPLOAD_LEASE_S
        return now >= expires or (silent_s is not None and now >= self.heartbeat + silent_s)


class FileUpload(UploadLease, frozen=True):
    """The directory backend's `uploads/{id}.json`: the lease and the chunks the push relies on."""

    chunks: list[str] = []


class TokenRecord(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A write token, stored by its sha256; the secret itself is shown once at creation and never stored."""

    id: str  # first 12 hex digits of sha256(secret); public, used to revoke
    sha256: str
    scopes: list[str]  # "*", "team-a/*", "team-a/pirate"
    admin: bool
    description: str
    created_at: datetime


class TokenInfo(msgspec.Struct, frozen=True):
    """What `token list` shows: a token record without its hash."""

    id: str
    scopes: list[str]
    admin: bool
    description: str
    created_at: datetime
