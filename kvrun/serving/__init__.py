"""The HTTP edge: a Litestar app (OpenAI, TGI/LoRAX and vLLM-style endpoints) in front of one in-process engine.

    HTTP request (msgspec schema) → AdapterResolver (model/adapter_id → engine adapter name, registry fetch)
      → EngineClient (async bridge; the engine steps in its own process, or thread) → RequestOutput stream → JSON / SSE
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kvrun.serving.app import create_app
    from kvrun.serving.config import ServerConfig

__all__ = ["ServerConfig", "create_app"]


def __getattr__(name: str):
    # Lazy: `kvrun --help` imports kvrun.serving.main for its flags and should not pay for torch and Litestar.
    if name == "create_app":
        from kvrun.serving.app import create_app

        return create_app
    if name == "ServerConfig":
        from kvrun.serving.config import ServerConfig

        return ServerConfig
    raise AttributeError(name)
