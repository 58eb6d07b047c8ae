"""The registry client keeps short calls (resolve, list) apart from fetches: a burst of first requests for many large
adapters must not make a resolve miss its deadline, which would answer 503 "registry unavailable" while the registry
is fine."""

from __future__ import annotations

import asyncio
import threading

import pytest

from adapters_registry import NotFoundError, open_store
from kvrun.serving.registry_client import WORKERS, RegistryClient


def test_resolves_answer_while_every_fetch_worker_is_busy(tmp_path):
    release = threading.Event()

    def slow_fetch() -> str:  # a large adapter's download and parse
        release.wait(10)
        return "files"

    async def burst(client: RegistryClient) -> None:
        fetches = [asyncio.ensure_future(client.fetch(slow_fetch)) for _ in range(2 * WORKERS)]
        await asyncio.sleep(0.2)  # every fetch worker is busy, and more fetches wait for one
        with pytest.raises(NotFoundError):  # the registry answered, within the 2 s deadline
            await client.call(client.store.resolve, "team/absent")
        assert client.reachable
        release.set()
        assert await asyncio.gather(*fetches) == ["files"] * 2 * WORKERS

    with open_store(f"file://{tmp_path / 'registry'}", token="") as store:
        client = RegistryClient(store)
        try:
            asyncio.run(burst(client))
        finally:
            release.set()
            client.close()
