"""kvrun's version, as installed (GET /version, /info, the OpenAPI document)."""

from __future__ import annotations

from functools import lru_cache
from importlib import metadata


@lru_cache(maxsize=1)
def kvrun_version() -> str:
    try:
        return metadata.version("kvrun")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "0.0.0+source"
