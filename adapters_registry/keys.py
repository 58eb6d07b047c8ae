"""The Redis key schema of the registry. Every key starts with a prefix (default `kvrun:registry:`), so
several registries can share one Redis database; `redis://host:6379/0?prefix=team-x:` picks another one.

    {p}names                        SET    "ns/name" of every adapter that has at least one version
    {p}adapter:{ns/name}:versions   HASH   version number -> VersionRecord JSON
    {p}adapter:{ns/name}:tags       HASH   tag -> version number ("latest" is maintained by the registry)
    {p}adapter:{ns/name}:counter    STRING highest version ever assigned (kept after deletes: never reused)
    {p}chunk:{sha256}               STRING one piece (<= 4 MiB) of a file's bytes, content-addressed
    {p}uploads                      HASH   upload id -> lease JSON {"heartbeat", "expires"} of a push in progress
                                           (Redis server time, unix seconds)
    {p}upload:{id}                  SET    sha256 of every chunk that push relies on (guards them from GC)
    {p}events                       STREAM change log: entry id "N-0" for event N (1, 2, ...), one field
                                           "event" = Event JSON; bounded with exact MAXLEN
    {p}events  (pub/sub channel)    the same Event JSON, id included, published in the same transaction
    {p}tokens                       HASH   token id -> TokenRecord JSON (sha256 of the secret, never the secret)
    {p}bases                        HASH   base model name -> its Hugging Face config.json

Writes to one adapter happen in one MULTI/EXEC guarded by WATCH on its versions/tags/counter keys, the
chunks the new version needs and the event stream, so a version appears together with its change-log entry
and never before all its chunks exist. Chunks are written before that transaction; a push that dies leaves
only chunks, which the next push or delete collects once the push's lease is over (see `sweep_chunks`).
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_PREFIX = "kvrun:registry:"


@dataclass(frozen=True, slots=True)
class RedisKeys:
    prefix: str = DEFAULT_PREFIX

    @property
    def names(self) -> str:
        return f"{self.prefix}names"

    def versions(self, name: str) -> str:
        return f"{self.prefix}adapter:{name}:versions"

    def tags(self, name: str) -> str:
        return f"{self.prefix}adapter:{name}:tags"

    def counter(self, name: str) -> str:
        return f"{self.prefix}adapter:{name}:counter"

    def chunk(self, sha: str) -> str:
        return f"{self.prefix}chunk:{sha}"

    @property
    def chunk_pattern(self) -> str:
        """SCAN MATCH pattern for all chunk keys (glob characters in the prefix escaped)."""
        escaped = "".join(f"\\{char}" if char in "*?[]\\" else char for char in self.prefix)
        return f"{escaped}chunk:*"

    def chunk_sha(self, key: str) -> str:
        return key[len(self.prefix) + len("chunk:") :]

    @property
    def uploads(self) -> str:
        return f"{self.prefix}uploads"

    def upload(self, upload_id: str) -> str:
        return f"{self.prefix}upload:{upload_id}"

    @property
    def events(self) -> str:
        """Both the stream key and the pub/sub channel name."""
        return f"{self.prefix}events"

    @property
    def tokens(self) -> str:
        return f"{self.prefix}tokens"

    @property
    def bases(self) -> str:
        return f"{self.prefix}bases"
