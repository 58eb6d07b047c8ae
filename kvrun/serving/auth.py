"""Bearer-key guards: `--api-key` for the inference APIs, `--admin-key` for loading and unloading adapters.

The guards are coroutines on purpose: Litestar runs a plain-function guard on a worker thread, where the key check
of every request would queue behind whatever else occupies those threads. A comparison needs no thread.
"""

from __future__ import annotations

import hmac

from litestar.connection import ASGIConnection
from litestar.handlers import BaseRouteHandler

from kvrun.serving import errors


def _presented(connection: ASGIConnection) -> str | None:
    header = connection.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() == "bearer" and token:
        return token.strip()
    return connection.headers.get("x-api-key")  # what some TGI clients send


def _matches(presented: str | None, expected: str) -> bool:
    # Constant-time, so response timing does not leak how much of a guess was right.
    return presented is not None and hmac.compare_digest(presented.encode(), expected.encode())


async def require_api_key(connection: ASGIConnection, _: BaseRouteHandler) -> None:
    config = connection.app.state.serving.config
    if config.api_key and not _matches(_presented(connection), config.api_key):
        raise errors.unauthorized()


async def require_admin_key(connection: ASGIConnection, _: BaseRouteHandler) -> None:
    """The admin key when one is set; else the api key when one is set; else open (a local, single-user server)."""
    config = connection.app.state.serving.config
    expected = config.admin_key or config.api_key
    if expected and not _matches(_presented(connection), expected):
        raise errors.unauthorized("Adapter administration needs the admin key (`Authorization: Bearer <key>`).")
