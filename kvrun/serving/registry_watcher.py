"""Follows the registry's change log in a thread and hands each event to the resolver on the event loop.

The file backend polls its log every 50 ms and Redis blocks on its stream, so a moved tag or a delete reaches new
requests well within a second. If the registry is unreachable the watcher retries, and afterwards treats the gap
as a resync (every cached resolution is dropped), since it cannot know what it missed.
"""

from __future__ import annotations

import asyncio
import logging
import threading

from adapters_registry import AdapterStore, RegistryError
from adapters_registry.records import Event

from kvrun.serving.adapter_resolver import AdapterResolver

logger = logging.getLogger(__name__)

BLOCK_MS = 500
RETRY_S = 1.0


class RegistryWatcher:
    def __init__(self, store: AdapterStore, resolver: AdapterResolver) -> None:
        self.store = store
        self.resolver = resolver
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.connected = False

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        # Read the log's position now, so changes made while the server starts are not missed.
        try:
            after = await asyncio.to_thread(self.store.last_event_id)
            self.connected = True
        except RegistryError as error:
            logger.warning("registry %s is unreachable (%s); will retry", self.store.url, error)
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
                self.connected = True
            except RegistryError as error:
                if self.connected:
                    logger.warning("lost the registry's change log (%s); retrying", error)
                self.connected = False
                after = None
                self._stop.wait(RETRY_S)
                continue
            for event in events:
                if event.kind != "resync":
                    after = event.id
                self._hand_over(event)

    def _hand_over(self, event: Event) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self.resolver.on_event, event)
