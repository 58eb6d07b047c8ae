"""Redis backend (production): see `keys.py` for the key schema and the transaction rules.

Every adapter change is one WATCH/MULTI/EXEC transaction that also appends its events to the stream with an
explicit id and publishes them on the pub/sub channel, so log, notification and data change together.
Watching the stream serializes all registry writes; that is deliberate (writes are rare, correctness is
not) and it keeps stream ids known before EXEC so the pub/sub message can carry them.
"""

from __future__ import annotations

import functools
import logging
import random
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from typing import Any

import msgspec
import redis
from redis.exceptions import AuthenticationError, AuthorizationError, NoPermissionError, ResponseError, WatchError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from adapters_registry.errors import (
    AuthError,
    ConflictError,
    MissingChunksError,
    RegistryError,
    UnreachableError,
    UsageError,
)
from adapters_registry.keys import DEFAULT_PREFIX, RedisKeys
from adapters_registry.records import AdapterState, Event, TokenRecord, UploadLease, VersionRecord
from adapters_registry.redaction import redact_url
from adapters_registry.storage import Mutation, Result

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 200  # optimistic-transaction retries before giving up with ConflictError
_record_decoder = msgspec.json.Decoder(VersionRecord)
_event_decoder = msgspec.json.Decoder(Event)
_token_decoder = msgspec.json.Decoder(TokenRecord)
_lease_decoder = msgspec.json.Decoder(UploadLease)


def _translate_errors(method: Callable[..., Any]) -> Callable[..., Any]:
    """Turn redis-py failures into registry errors: refused credentials into AuthError (exit code 5), connection
    failures and timeouts into UnreachableError (exit code 7); no traceback in the CLI."""

    @functools.wraps(method)
    def wrapper(self: RedisStorage, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except (AuthenticationError, AuthorizationError, NoPermissionError) as error:
            raise AuthError(
                f"registry {self.url} refused access: {error} (check the Redis user, password and ACL in the URL)"
            ) from None
        except (RedisConnectionError, RedisTimeoutError) as error:
            raise UnreachableError(f"registry {self.url} is unreachable: {error}") from None
        except ResponseError as error:
            raise RegistryError(f"registry {self.url}: Redis error: {error}") from None

    return wrapper


def _event_number(stream_id: bytes) -> int:
    return int(stream_id.split(b"-")[0])


def _decode_lease(raw: bytes) -> UploadLease:
    try:
        return _lease_decoder.decode(raw)
    except msgspec.DecodeError:
        pass
    try:
        return UploadLease(float(raw))  # a bare heartbeat, as written before uploads carried their own lease
    except ValueError:
        return UploadLease(0.0)  # unreadable: long over, so it is dropped rather than protecting chunks forever


def _parse_event_id(event_id: str | None) -> int:
    if event_id is None:
        return 0
    if not event_id.isdigit():
        raise UsageError(f"invalid event id {event_id!r}: event ids are decimal numbers")
    return int(event_id)


class RedisStorage:
    def __init__(self, client: redis.Redis, url: str, prefix: str = DEFAULT_PREFIX, events_maxlen: int = 10_000):
        self.redis = client
        self.url = redact_url(url)
        self.keys = RedisKeys(prefix)
        self.events_maxlen = events_maxlen
        # A blocking XREAD must return before the socket times out, or a quiet log reads as an outage.
        socket_timeout = client.connection_pool.connection_kwargs.get("socket_timeout")
        self.max_block_ms = int(1000 * max(socket_timeout - 1, socket_timeout / 2)) if socket_timeout else None

    def __repr__(self) -> str:
        return f"RedisStorage({self.url!r})"

    # -- chunks ----------------------------------------------------------------------------------------
    @_translate_errors
    def missing_chunks(self, shas: Sequence[str]) -> set[str]:
        pipe = self.redis.pipeline(transaction=False)
        for sha in shas:
            pipe.exists(self.keys.chunk(sha))
        return {sha for sha, exists in zip(shas, pipe.execute(), strict=True) if not exists}

    @_translate_errors
    def put_chunk(self, sha: str, data: bytes) -> None:
        self.redis.set(self.keys.chunk(sha), data)

    @_translate_errors
    def get_chunk(self, sha: str) -> bytes | None:
        return self.redis.get(self.keys.chunk(sha))

    @_translate_errors
    def list_chunks(self) -> Iterator[str]:
        keys = self.redis.scan_iter(match=self.keys.chunk_pattern, count=1000)
        return iter([self.keys.chunk_sha(key.decode()) for key in keys])

    # -- uploads ---------------------------------------------------------------------------------------
    @staticmethod
    def _now(client: Any) -> float:
        """Redis server time: one clock for every pusher and collector, whatever their own clocks say."""
        seconds, microseconds = client.time()
        return seconds + microseconds / 1e6

    @_translate_errors
    def touch_upload(self, upload_id: str, shas: Sequence[str], lease_s: float) -> None:
        now = self._now(self.redis)
        pipe = self.redis.pipeline(transaction=True)
        if shas:
            pipe.sadd(self.keys.upload(upload_id), *shas)
        pipe.hset(self.keys.uploads, upload_id, msgspec.json.encode(UploadLease(now, now + lease_s)))
        pipe.execute()

    @_translate_errors
    def finish_upload(self, upload_id: str) -> None:
        self.redis.pipeline(transaction=True).hdel(self.keys.uploads, upload_id).delete(
            self.keys.upload(upload_id)
        ).execute()

    @_translate_errors
    def sweep_chunks(
        self, candidates: Collection[str] | None, in_use: Callable[[], set[str]], silent_s: float | None = None
    ) -> int:
        # WATCH on the uploads hash (every touch_upload writes it) and the event stream (every commit appends
        # to it): if either changes while we decide, EXEC fails and we decide again.
        keys = self.keys
        with self.redis.pipeline(transaction=True) as pipe:
            for attempt in range(MAX_ATTEMPTS):
                try:
                    pipe.watch(keys.uploads, keys.events)
                    now = self._now(pipe)
                    leases = {key.decode(): _decode_lease(raw) for key, raw in pipe.hgetall(keys.uploads).items()}
                    over = sorted(upload_id for upload_id, lease in leases.items() if lease.is_over(now, silent_s))
                    pool = set(self.list_chunks() if candidates is None else candidates)
                    for upload_id in over:
                        pool.update(sha.decode() for sha in pipe.smembers(keys.upload(upload_id)))
                    live = [keys.upload(upload_id) for upload_id in leases if upload_id not in over]
                    if pool and live:
                        pool -= {sha.decode() for sha in pipe.sunion(live)}
                    if pool:
                        pool -= in_use()
                    if not pool and not over:
                        pipe.unwatch()
                        return 0
                    pipe.multi()
                    chunk_keys = [keys.chunk(sha) for sha in sorted(pool)]
                    batches = range(0, len(chunk_keys), 500)
                    for start in batches:
                        pipe.delete(*chunk_keys[start : start + 500])
                    for upload_id in over:
                        pipe.hdel(keys.uploads, upload_id).delete(keys.upload(upload_id))
                    replies = pipe.execute()
                    for upload_id in over:
                        log.info("dropped upload %s (lease over)", upload_id)
                    return sum(replies[: len(batches)])
                except WatchError:
                    time.sleep(random.uniform(0, 0.002 * min(attempt + 1, 20)))
        raise ConflictError("the registry changed too often during garbage collection; try again")

    # -- adapters --------------------------------------------------------------------------------------
    @_translate_errors
    def names(self) -> list[str]:
        return sorted(name.decode() for name in self.redis.smembers(self.keys.names))

    @_translate_errors
    def adapter(self, name: str) -> AdapterState | None:
        state, _raw = self._read_state(name)
        return state if state.counter else None

    def _read_state(self, name: str) -> tuple[AdapterState, dict[bytes, bytes]]:
        """One MULTI/EXEC snapshot of an adapter; also returns the raw versions hash for diffing."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.get(self.keys.counter(name)).hgetall(self.keys.versions(name)).hgetall(self.keys.tags(name))
        counter, versions, tags = pipe.execute()
        state = AdapterState(
            counter=int(counter or 0),
            versions={int(v): _record_decoder.decode(raw) for v, raw in versions.items()},
            tags={tag.decode(): int(v) for tag, v in tags.items()},
        )
        return state, versions

    @_translate_errors
    def commit(
        self, name: str, mutation: Mutation, required_chunks: Sequence[tuple[str, int]] = ()
    ) -> tuple[AdapterState, list[Event]]:
        keys = self.keys
        watched = [keys.counter(name), keys.versions(name), keys.tags(name), keys.events]
        watched += sorted({keys.chunk(sha) for sha, _size in required_chunks})
        with self.redis.pipeline(transaction=True) as pipe:
            for attempt in range(MAX_ATTEMPTS):
                try:
                    pipe.watch(*watched)
                    self._check_chunks(required_chunks)
                    state, raw_versions = self._read_state(name)
                    old_tags, old_counter = dict(state.tags), state.counter
                    events = mutation(state)
                    events = self._with_ids(events)
                    pipe.multi()
                    self._write_diff(pipe, name, state, raw_versions, old_tags, old_counter)
                    for event in events:
                        payload = msgspec.json.encode(event)
                        pipe.xadd(
                            keys.events,
                            {"event": payload},
                            id=f"{event.id}-0",
                            maxlen=self.events_maxlen,
                            approximate=False,
                        )
                        pipe.publish(keys.events, payload)
                    pipe.execute()
                    return state, events
                except WatchError:
                    time.sleep(random.uniform(0, 0.002 * min(attempt + 1, 20)))
        raise ConflictError(f"too many concurrent changes to {name}; try again")

    def _check_chunks(self, required: Sequence[tuple[str, int]]) -> None:
        if not required:
            return
        pipe = self.redis.pipeline(transaction=False)
        for sha, _size in required:
            pipe.strlen(self.keys.chunk(sha))
        lengths = pipe.execute()
        missing = sorted({sha for (sha, size), length in zip(required, lengths, strict=True) if length != size})
        if missing:
            raise MissingChunksError(missing)

    def _with_ids(self, events: list[Event]) -> list[Event]:
        """Number events 1, 2, 3, ... like the file backend (stream id `N-0`), so a reader can tell exactly
        whether the bounded log dropped anything after its last-seen id."""
        last = self.redis.xrevrange(self.keys.events, count=1)
        number = _event_number(last[0][0]) if last else 0
        return [msgspec.structs.replace(event, id=str(number + i)) for i, event in enumerate(events, start=1)]

    def _write_diff(
        self, pipe: Any, name: str, state: AdapterState, raw_versions: dict[bytes, bytes],
        old_tags: dict[str, int], old_counter: int,
    ) -> None:  # fmt: skip
        keys = self.keys
        if state.counter != old_counter:
            pipe.set(keys.counter(name), state.counter)
        old_versions = {int(v) for v in raw_versions}
        removed = old_versions - set(state.versions)
        if removed:
            pipe.hdel(keys.versions(name), *removed)
        added = {v: msgspec.json.encode(r) for v, r in state.versions.items() if v not in old_versions}
        if added:
            pipe.hset(keys.versions(name), mapping=added)
        removed_tags = set(old_tags) - set(state.tags)
        if removed_tags:
            pipe.hdel(keys.tags(name), *removed_tags)
        changed_tags = {t: v for t, v in state.tags.items() if old_tags.get(t) != v}
        if changed_tags:
            pipe.hset(keys.tags(name), mapping=changed_tags)
        if state.versions:
            pipe.sadd(keys.names, name)
        else:
            pipe.srem(keys.names, name)

    # -- change log ------------------------------------------------------------------------------------
    @_translate_errors
    def read_events(self, after_id: str | None, limit: int, block_ms: int) -> tuple[list[Event], bool]:
        after = _parse_event_id(after_id)
        gap = after_id is not None and self._trimmed_after(after)
        if block_ms > 0 and not gap:
            block_ms = max(1, min(block_ms, self.max_block_ms or block_ms))  # at most block_ms, as promised
            reply = self.redis.xread({self.keys.events: f"{after}-0"}, count=limit, block=block_ms)
            entries = reply[0][1] if reply else []
        else:
            entries = self.redis.xrange(self.keys.events, min=f"({after}-0", max="+", count=limit)
        return [_event_decoder.decode(fields[b"event"]) for _id, fields in entries], gap

    def _trimmed_after(self, after: int) -> bool:
        """True if events after `after` are gone: trimmed away, or the whole log was reset."""
        first = self.redis.xrange(self.keys.events, count=1)
        last = self.redis.xrevrange(self.keys.events, count=1)
        if not first:
            return after > 0
        return _event_number(first[0][0]) > after + 1 or _event_number(last[0][0]) < after

    @_translate_errors
    def last_event_id(self) -> str | None:
        last = self.redis.xrevrange(self.keys.events, count=1)
        return str(_event_number(last[0][0])) if last else None

    # -- tokens and base configs -----------------------------------------------------------------------
    @_translate_errors
    def get_token(self, token_id: str) -> TokenRecord | None:
        raw = self.redis.hget(self.keys.tokens, token_id)
        return _token_decoder.decode(raw) if raw else None

    @_translate_errors
    def list_tokens(self) -> list[TokenRecord]:
        return [_token_decoder.decode(raw) for raw in self.redis.hvals(self.keys.tokens)]

    @_translate_errors
    def update_tokens(self, change: Callable[[dict[str, TokenRecord]], Result]) -> Result:
        with self.redis.pipeline(transaction=True) as pipe:
            for attempt in range(MAX_ATTEMPTS):
                try:
                    pipe.watch(self.keys.tokens)
                    raw = pipe.hgetall(self.keys.tokens)
                    tokens = {key.decode(): _token_decoder.decode(value) for key, value in raw.items()}
                    before = dict(tokens)
                    result = change(tokens)
                    pipe.multi()
                    removed = set(before) - set(tokens)
                    if removed:
                        pipe.hdel(self.keys.tokens, *removed)
                    added = {key: msgspec.json.encode(r) for key, r in tokens.items() if before.get(key) != r}
                    if added:
                        pipe.hset(self.keys.tokens, mapping=added)
                    pipe.execute()
                    return result
                except WatchError:
                    time.sleep(random.uniform(0, 0.002 * min(attempt + 1, 20)))
        raise ConflictError("too many concurrent token changes; try again")

    @_translate_errors
    def get_base(self, name: str) -> dict[str, object] | None:
        raw = self.redis.hget(self.keys.bases, name)
        return msgspec.json.decode(raw) if raw else None

    @_translate_errors
    def put_base(self, name: str, config: dict[str, object]) -> None:
        self.redis.hset(self.keys.bases, name, msgspec.json.encode(config))

    @_translate_errors
    def list_bases(self) -> list[str]:
        return sorted(key.decode() for key in self.redis.hkeys(self.keys.bases))

    def close(self) -> None:
        self.redis.close()
