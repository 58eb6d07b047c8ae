"""Write tokens: random secrets, stored only as sha256, scoped to namespaces, managed by admin tokens.

A registry with no tokens is open (the embedded, single-user default). `kvrun-adapters token init` creates
the first admin token (or adopts `KVRUN_REGISTRY_ADMIN_TOKEN` so deployments can provision it) and works
only while no token exists; from then on every write needs a token whose scopes cover the adapter's name, and
the registry never becomes open again: the last admin token cannot be revoked.
The token id is the first 12 hex digits of the secret's sha256: public, enough to revoke, useless to forge.

The CLI and library enforce this; anyone holding raw Redis credentials or write access to the registry
directory can bypass it, so restrict those to the registry's operators (Redis ACLs, file permissions).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Sequence

from adapters_registry.errors import AuthError, ConflictError, NotFoundError, UsageError
from adapters_registry.names import check_scope, scope_allows
from adapters_registry.records import TokenInfo, TokenRecord, utc_now
from adapters_registry.storage import Storage

TOKEN_PREFIX = "kvr_"
MIN_SECRET_LENGTH = 16
NO_TOKEN_HELP = "pass --token or set KVRUN_REGISTRY_TOKEN"


def new_secret() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def secret_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def token_id(secret: str) -> str:
    return secret_hash(secret)[:12]


def info(record: TokenRecord) -> TokenInfo:
    return TokenInfo(record.id, record.scopes, record.admin, record.description, record.created_at)


def _make_record(secret: str, scopes: Sequence[str], admin: bool, description: str) -> TokenRecord:
    digest = secret_hash(secret)
    return TokenRecord(digest[:12], digest, list(scopes), admin, description, utc_now())


def authenticate(storage: Storage, secret: str | None) -> TokenRecord:
    if not secret:
        raise AuthError(f"this registry requires a token for writes; {NO_TOKEN_HELP}")
    record = storage.get_token(token_id(secret))
    # compare_digest: the lookup above already keys on the hash, but equality of the full digest is
    # what grants access, and it should not leak timing.
    if record is None or not hmac.compare_digest(record.sha256, secret_hash(secret)):
        raise AuthError("invalid or revoked token")
    return record


def authorize_write(storage: Storage, secret: str | None, name: str) -> TokenRecord | None:
    """The token allowed to write `name`, or None on an open registry (no tokens configured)."""
    if not storage.list_tokens():
        return None
    record = authenticate(storage, secret)
    if not any(scope_allows(scope, name) for scope in record.scopes):
        raise AuthError(f"token {record.id} (scopes {', '.join(record.scopes)}) may not write {name}")
    return record


def authorize_admin(storage: Storage, secret: str | None, action: str, *, open_ok: bool = False) -> TokenRecord | None:
    if not storage.list_tokens():
        if open_ok:
            return None
        raise AuthError(
            f"{action} needs an admin token, and this registry has none yet: run `kvrun-adapters token init`"
        )
    record = authenticate(storage, secret)
    if not record.admin:
        raise AuthError(f"{action} needs an admin token; token {record.id} is not one")
    return record


def init_admin(storage: Storage, secret: str | None = None, description: str = "admin") -> str:
    """Create the first admin token; ConflictError if any token exists. Returns the secret (shown once)."""
    secret = secret or new_secret()
    if len(secret) < MIN_SECRET_LENGTH:
        raise UsageError(f"an admin token must be at least {MIN_SECRET_LENGTH} characters")
    record = _make_record(secret, ["*"], True, description)

    def add_if_first(tokens: dict[str, TokenRecord]) -> None:
        if tokens:
            raise ConflictError("this registry already has tokens; ask an admin to `token create` one for you")
        tokens[record.id] = record

    storage.update_tokens(add_if_first)
    return secret


def create(
    storage: Storage, admin_secret: str | None, scopes: Sequence[str], *, admin: bool = False, description: str = ""
) -> tuple[str, TokenInfo]:
    authorize_admin(storage, admin_secret, "token create")
    if not scopes:
        raise UsageError("a token needs at least one --scope ('team-a/*', 'team-a/name' or '*')")
    scopes = [check_scope(scope) for scope in scopes]
    secret = new_secret()
    record = _make_record(secret, scopes, admin, description)
    storage.update_tokens(lambda tokens: tokens.__setitem__(record.id, record))
    return secret, info(record)


def revoke(storage: Storage, admin_secret: str | None, revoked_id: str) -> TokenInfo:
    authorize_admin(storage, admin_secret, "token revoke")

    def remove(tokens: dict[str, TokenRecord]) -> TokenRecord:
        record = tokens.get(revoked_id)
        if record is None:
            raise NotFoundError(f"no token with id {revoked_id!r} (see `kvrun-adapters token list`)")
        # A registry with tokens always keeps an admin: without one nobody could manage tokens, and with no
        # tokens left at all the registry would silently fall back to open writes.
        if record.admin and sum(other.admin for other in tokens.values()) == 1:
            raise ConflictError(
                f"token {revoked_id} is the last admin token and cannot be revoked (a registry with tokens keeps "
                "an admin); create another with `token create --admin --scope '*'` first, then revoke this one"
            )
        del tokens[revoked_id]
        return record

    return info(storage.update_tokens(remove))


def list_tokens(storage: Storage, admin_secret: str | None) -> list[TokenInfo]:
    authorize_admin(storage, admin_secret, "token list")
    return sorted((info(record) for record in storage.list_tokens()), key=lambda t: t.created_at)
