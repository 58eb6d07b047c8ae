"""Registry URLs: `redis://host:port/db[?prefix=...]` (also rediss://, unix://) or `file:///path` (or a path).

The URL comes from the caller, else env `KVRUN_REGISTRY`, else the embedded default `~/.kvrun/registry`.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import SplitResult, parse_qsl, urlencode, urlsplit, urlunsplit

from adapters_registry.errors import UsageError
from adapters_registry.keys import DEFAULT_PREFIX
from adapters_registry.payload import DEFAULT_CHUNK_SIZE
from adapters_registry.records import DEFAULT_UPLOAD_LEASE_S
from adapters_registry.redaction import redact_url
from adapters_registry.store import AdapterStore
from adapters_registry.validate import Limits

DEFAULT_REGISTRY = "file://~/.kvrun/registry"
REDIS_SCHEMES = ("redis", "rediss", "unix")
MAX_CHUNK_SIZE = 16 * 1024 * 1024
DEFAULT_SOCKET_TIMEOUT_S = 5.0  # a Redis that stops answering fails each call after this, instead of hanging it


def registry_url(url: str | None = None) -> str:
    return url or os.environ.get("KVRUN_REGISTRY") or DEFAULT_REGISTRY


def _split(url: str) -> SplitResult:
    """urlsplit, port included: a malformed URL is a usage error whose message quotes none of its secrets."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - parsed lazily; its ValueError would quote part of a mistyped password
    except ValueError:
        raise UsageError(
            f"registry URL {redact_url(url)!r} is malformed (percent-encode any / ? # @ : in a password)"
        ) from None
    return parts


def _file_path(url: str) -> Path:
    parts = _split(url)
    if not parts.scheme:
        return Path(url).expanduser()
    if parts.netloc == "~":
        return Path("~" + parts.path).expanduser()
    if parts.netloc not in ("", "localhost"):
        raise UsageError(f"registry URL {redact_url(url)!r}: file URLs name a local path, e.g. file:///srv/registry")
    return Path(parts.path)


def _open_redis(url: str, events_maxlen: int) -> object:
    import redis  # imported here so file-only users never need a Redis client installed

    from adapters_registry.redis_store import RedisStorage

    parts = _split(url)
    query = dict(parse_qsl(parts.query))
    prefix = query.pop("prefix", DEFAULT_PREFIX)
    clean_url = urlunsplit(parts._replace(query=urlencode(query)))
    try:
        client = redis.Redis.from_url(  # options in the URL (?socket_timeout=30) take precedence
            clean_url, socket_connect_timeout=5, socket_timeout=DEFAULT_SOCKET_TIMEOUT_S, health_check_interval=30
        )
        # Connections open lazily; building one's settings now makes a misspelt option (`?pasword=`) a usage
        # error here instead of a TypeError at the first command.
        pool = client.connection_pool
        pool.connection_class(**pool.connection_kwargs)
    except (ValueError, TypeError) as error:  # their messages name options, never values
        raise UsageError(f"registry URL {redact_url(url)!r}: {error}") from None
    return RedisStorage(client, url, prefix, events_maxlen)


def open_store(
    url: str | None = None,
    *,
    token: str | None = None,
    limits: Limits | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    events_maxlen: int = 10_000,
    upload_lease_s: float = DEFAULT_UPLOAD_LEASE_S,
) -> AdapterStore:
    """Open the registry at `url` (default: env KVRUN_REGISTRY, else ~/.kvrun/registry).

    `token` authorizes writes (default: env KVRUN_REGISTRY_TOKEN); reads never need one. Nothing is
    contacted until the first operation, which raises UnreachableError if the registry cannot be reached.
    """
    url = registry_url(url)
    if not 1024 <= chunk_size <= MAX_CHUNK_SIZE:
        raise UsageError(f"chunk_size must be between 1 KiB and {MAX_CHUNK_SIZE // 1024**2} MiB")
    if not 0 < upload_lease_s < float("inf"):
        raise UsageError(f"upload_lease_s must be a positive number of seconds, not {upload_lease_s!r}")
    scheme = _split(url).scheme
    if scheme in REDIS_SCHEMES:
        storage = _open_redis(url, events_maxlen)
    elif scheme in ("file", ""):
        from adapters_registry.file_store import FileStorage

        storage = FileStorage(_file_path(url), events_maxlen)
    else:
        raise UsageError(f"registry URL {redact_url(url)!r}: use redis://host:port/db or file:///path")
    return AdapterStore(
        storage,  # type: ignore[arg-type]
        token=token if token is not None else os.environ.get("KVRUN_REGISTRY_TOKEN") or None,
        limits=limits or Limits(),
        chunk_size=chunk_size,
        upload_lease_s=upload_lease_s,
    )
