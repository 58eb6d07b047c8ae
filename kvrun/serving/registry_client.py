"""The serving side's one door to the adapter registry, and its record of whether the registry answers.

Every blocking registry call (resolve, list; fetches on a pool apart) runs on a small thread pool with a deadline, so a
slow, frozen or unreachable registry never holds up the event loop, the API-key check, base-model requests, the
engine thread or the default executor: the caller gets RegistryUnavailable in bounded time and decides what to do
(serve the last known resolution of an adapter the engine holds, or answer 503 with Retry-After).

Reachability is learned from every call and from the change-log watcher, which reports in at least twice a second
while the registry answers; silence longer than STALL_S (a frozen Redis blocks reads without failing them) counts
as unreachable too.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from functools import partial
from typing import TypeVar

from adapters_registry import AdapterStore, NotFoundError, RegistryError, UsageError, redact_url

logger = logging.getLogger(__name__)

Result = TypeVar("Result")

WORKERS = 4  # registry calls (and, apart, fetches) in progress at once; more wait their turn within their deadline
CALL_TIMEOUT_S = 2.0  # a resolve or list slower than this counts as the registry being down
FETCH_TIMEOUT_S = 120.0  # downloading a large adapter's files may take a while
STALL_S = 5.0  # the watcher reports every 0.5 s; this long without any answer means the registry is unreachable
RETRY_AFTER_S = 2  # what 503s caused by the registry tell clients


class RegistryUnavailable(Exception):
    """The registry did not answer in time, or failed; the message names no secret and may be shown to clients."""


class RegistryClient:
    def __init__(self, store: AdapterStore, *, workers: int = WORKERS, timeout_s: float = CALL_TIMEOUT_S) -> None:
        self.store = store
        self.url = redact_url(store.url)  # what is printed and returned: passwords and tokens masked
        self.timeout_s = timeout_s
        self._pool = _DaemonPool(workers, "kvrun-registry")
        # Fetches (an adapter's files, parsed: seconds for a large one) have workers of their own, so a burst of
        # first requests for many adapters never makes a resolve wait past its deadline behind them.
        self._fetch_pool = _DaemonPool(workers, "kvrun-registry-fetch")
        # Written by the event loop and the watcher thread; single assignments, read as a consistent-enough pair.
        self._last_contact = time.monotonic()
        self._error: str | None = None
        self._down_since: datetime | None = None

    # -- state --------------------------------------------------------------------------------------------------
    @property
    def reachable(self) -> bool:
        return self._error is None and time.monotonic() - self._last_contact < STALL_S

    def contact(self) -> None:
        """The registry answered (any thread)."""
        if self._error is not None:
            logger.info("registry %s answers again", self.url)
        self._last_contact = time.monotonic()
        self._error = None
        self._down_since = None

    def failure(self, message: str) -> None:
        """The registry did not answer, or failed (any thread)."""
        if self._error is None:
            logger.warning("registry %s: %s; serving adapters the engine holds with their last known versions",
                           self.url, message)  # fmt: skip
            self._down_since = datetime.now(UTC)
        self._error = message

    def status(self) -> dict:
        """What /ready reports: the registry's URL (secrets masked) and whether it answers."""
        reachable = self.reachable
        error = self._error
        if error is None and not reachable:
            error = f"no answer for {time.monotonic() - self._last_contact:.0f}s"
        since = self._down_since.isoformat() if self._down_since is not None and not reachable else None
        return {"url": self.url, "reachable": reachable, "error": None if reachable else error, "down_since": since}

    # -- calls --------------------------------------------------------------------------------------------------
    async def call(self, function: Callable[..., Result], *args: object) -> Result:
        """function(*args) on the registry pool, within the call deadline. NotFoundError and UsageError pass through
        (the registry answered); a timeout or any other registry failure raises RegistryUnavailable."""
        return await self._run(self._pool, partial(function, *args), self.timeout_s)

    async def fetch(self, function: Callable[..., Result], *args: object) -> Result:
        """function(*args), a download (and parse) of an adapter's files, on the fetch pool within FETCH_TIMEOUT_S;
        failures as for call()."""
        return await self._run(self._fetch_pool, partial(function, *args), FETCH_TIMEOUT_S)

    async def _run(self, pool: _DaemonPool, function: Callable[[], Result], timeout_s: float) -> Result:
        try:
            result = await asyncio.wait_for(asyncio.wrap_future(pool.submit(function)), timeout_s)
        except TimeoutError:
            self.failure(f"no answer within {timeout_s:g}s")
            raise RegistryUnavailable(f"the adapter registry did not answer within {timeout_s:g}s") from None
        except (NotFoundError, UsageError):
            self.contact()
            raise
        except RegistryError as error:
            self.failure(str(error))
            raise RegistryUnavailable(f"the adapter registry failed: {error}") from None
        self.contact()
        return result

    def close(self) -> None:
        self._pool.shutdown()
        self._fetch_pool.shutdown()


class _DaemonPool:
    """A fixed set of daemon worker threads. Not concurrent.futures' pool: its threads are joined at exit, and one
    stuck on a frozen registry would keep a stopping server alive; these are abandoned instead."""

    def __init__(self, workers: int, name: str) -> None:
        self._work: queue.SimpleQueue = queue.SimpleQueue()
        for index in range(workers):
            threading.Thread(target=self._run, name=f"{name}-{index}", daemon=True).start()
        self._workers = workers

    def submit(self, function: Callable[[], Result]) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._work.put((function, future))
        return future

    def shutdown(self) -> None:
        for _ in range(self._workers):
            self._work.put(None)

    def _run(self) -> None:
        while (item := self._work.get()) is not None:
            function, future = item
            if not future.set_running_or_notify_cancel():  # its caller gave up while it waited for a worker
                continue
            try:
                future.set_result(function())
            except BaseException as error:  # noqa: BLE001 - handed to the awaiting caller
                future.set_exception(error)
