"""The seam between the registry's logic (`AdapterStore`) and where bytes live (Redis or a directory).

A backend offers a few primitives, each atomic on its own; all policy (version numbering, the `latest`
tag, which events a change emits, token rules, garbage collection) lives once in `store.py`, so the two
backends cannot drift apart. The central primitive is `commit`: an atomic read-modify-write of one
adapter's state that also appends the change's events to the log, retried by the backend on contention.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Sequence
from typing import Protocol, TypeVar

from adapters_registry.records import AdapterState, Event, TokenRecord

Result = TypeVar("Result")

# A mutation receives a fresh copy of the state (the backend may call it again after a conflict) and
# returns the events describing what it changed, without ids: the backend assigns those.
Mutation = Callable[[AdapterState], list[Event]]


class Storage(Protocol):
    url: str  # for messages; never contains a password

    # -- content-addressed chunks ------------------------------------------------------------------
    def missing_chunks(self, shas: Sequence[str]) -> set[str]: ...
    def put_chunk(self, sha: str, data: bytes) -> None: ...
    def get_chunk(self, sha: str) -> bytes | None: ...
    def list_chunks(self) -> Iterator[str]: ...
    def delete_chunks(self, shas: Collection[str]) -> int: ...

    # -- pushes in progress (protect their chunks from garbage collection) --------------------------
    def touch_upload(self, upload_id: str, shas: Sequence[str], lease_s: float) -> None:
        """Create or extend an upload: add `shas` to it and renew its lease to `lease_s` from now.

        "Now" is the backend's clock (Redis server time), so pushers with skewed clocks agree on expiry.
        """

    def finish_upload(self, upload_id: str) -> None: ...

    def sweep_chunks(
        self, candidates: Collection[str] | None, in_use: Callable[[], set[str]], silent_s: float | None = None
    ) -> int:
        """Delete garbage chunks; returns how many. Atomic with respect to touch_upload and commit.

        Uploads whose lease ran out (or, given `silent_s`, not touched for that long) are dropped and their
        chunks join `candidates` (None: every stored chunk). A candidate is deleted unless a live upload holds
        it or `in_use()` (the chunks published versions reference) names it. If an upload or a commit changes
        meanwhile, the sweep starts over, so a chunk a push has just found already stored cannot vanish
        between that push's publish and this deletion.
        """

    # -- adapter metadata ----------------------------------------------------------------------------
    def names(self) -> list[str]: ...
    def adapter(self, name: str) -> AdapterState | None: ...

    def commit(
        self, name: str, mutation: Mutation, required_chunks: Sequence[tuple[str, int]] = ()
    ) -> tuple[AdapterState, list[Event]]:
        """Apply `mutation` atomically; `required_chunks` (sha, size) must exist, else MissingChunksError."""

    # -- change log ------------------------------------------------------------------------------------
    def read_events(self, after_id: str | None, limit: int, block_ms: int) -> tuple[list[Event], bool]:
        """Events after `after_id` (None: from the oldest kept), waiting up to block_ms for the first one.

        The flag is True when events after `after_id` were already trimmed from the bounded log.
        """

    def last_event_id(self) -> str | None: ...

    # -- tokens and base model configs -----------------------------------------------------------------
    def get_token(self, token_id: str) -> TokenRecord | None: ...
    def list_tokens(self) -> list[TokenRecord]: ...

    def update_tokens(self, change: Callable[[dict[str, TokenRecord]], Result]) -> Result:
        """Atomic read-modify-write of the token table: `change` edits the dict in place."""

    def get_base(self, name: str) -> dict[str, object] | None: ...
    def put_base(self, name: str, config: dict[str, object]) -> None: ...
    def list_bases(self) -> list[str]: ...

    def close(self) -> None: ...
