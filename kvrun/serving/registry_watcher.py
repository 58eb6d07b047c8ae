"""Follows the registry's change log in a thread and hands each event to the resolver on the event loop.

The file backend polls its log every 50 ms and Redis blocks on its stream for at most 0.5 s, so a moved tag or a
delete reaches new requests well within a second, and every answer tells the RegistryClient the registry is alive.
When the registry cannot be read, the watcher retries every second and afterwards treats the gap as a resync
(every resolution must be asked again), since it cannot know what it missed. A log that was trimmed past our
position or reset (a Redis that restarted without its data numbers events from 1 again) is a resync too; reading
then restarts from the log's current end.
"""

from __future__ import annotations

import asyncio
import logging
import threading

from adapters_registry import RegistryError
from adapters_registry.records import Event

from kvrun.serving.adapter_resolver import AdapterResolver
from kvrun.serving.registry_client import RegistryClient

logger = logging.getLogger(__name__)

BLOCK_MS = 500
RETRY_S = 1.0


class RegistryWatcher:
    def __init__(self, registry: RegistryClient, resolver: AdapterResolver) -> None:
        self.registry = registry
        self.store = registry.store
        self.resolver = resolver
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        # Read the log's position now, so changes made while the server starts are not missed.
        try:
            after = await self.registry.call(self.store.last_event_id) or ""
        except Exception as error:  # noqa: BLE001 - the registry may be down at start; serving goes on without it
            logger.warning("registry %s is not answering (%s); will retry", self.registry.url, error)
            after = None
        self._thread = threading.Thread(target=self._run, args=(after,), name="kvrun-registry-watch", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 5)

    def _run(self, after: str | None) -> None:
        while not self._stop.is_set():
            try:
                if after is None:
                    after = self.store.last_event_id() or ""
                    self._hand_over(Event("resync"))
                events = self.store.events(after or None, block_ms=BLOCK_MS)
            except RegistryError as error:
                self.registry.failure(f"its change log cannot be read ({error})")
                after = None
                self._stop.wait(RETRY_S)
                continue
            self.registry.contact()
            for event in events:
                if event.kind == "resync":
                    after = None  # from the log's end, once every resolution is asked again
                elif after is not None:
                    after = event.id
                self._hand_over(event)

    def _hand_over(self, event: Event) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self.resolver.on_event, event)
