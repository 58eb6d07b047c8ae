"""Concurrent pushers get distinct versions; a push that dies midway leaves nothing visible and its
partial payload is cleaned up (at once when it fails, by garbage collection when it is killed)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from adapters_registry import AdapterStore, NotFoundError, open_store
from tests.adapters_registry.conftest import TEST_CHUNK_SIZE, AdapterFactory, assert_empty, stored_chunks

REPOSITORY = Path(__file__).resolve().parents[2]


def test_concurrent_pushers_get_distinct_versions(
    registry_url: str, store: AdapterStore, make_adapter: AdapterFactory
) -> None:
    pushers = 8
    sources = [make_adapter(seed=seed) for seed in range(pushers)]
    results: list[int] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(pushers)

    def push(source: Path) -> None:
        try:
            with open_store(registry_url, token="", chunk_size=TEST_CHUNK_SIZE) as own_store:
                barrier.wait()
                results.append(own_store.push(source, "team-a/busy").version)
        except BaseException as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=push, args=(source,)) for source in sources]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    assert sorted(results) == list(range(1, pushers + 1))
    records = store.versions("team-a/busy")
    assert len({record.sha256 for record in records}) == pushers  # each version kept its own content
    assert store.resolve("team-a/busy").version == pushers
    publishes = [event for event in store.events() if event.kind == "publish"]
    assert sorted(event.version for event in publishes) == list(range(1, pushers + 1))


def test_failed_push_leaves_nothing(
    store: AdapterStore, make_adapter: AdapterFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = store.storage.put_chunk
    calls = 0

    def failing_put(sha: str, data: bytes) -> None:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise OSError("disk full (injected)")
        original(sha, data)

    monkeypatch.setattr(store.storage, "put_chunk", failing_put)
    with pytest.raises(OSError, match="injected"):
        store.push(make_adapter(hidden=64), "team-a/broken")
    with pytest.raises(NotFoundError):
        store.resolve("team-a/broken")
    assert_empty(store)  # the two chunks it did write were collected right away
    assert store.events() == []


KILLED_PUSH = textwrap.dedent(
    """
    import sys, time
    from adapters_registry import open_store

    store = open_store(sys.argv[1], token="", chunk_size=int(sys.argv[3]))
    put_chunk = store.storage.put_chunk
    written = 0

    def put_then_stall(sha, data):
        global written
        put_chunk(sha, data)
        written += 1
        if written == 3:
            print("three chunks stored", flush=True)
            time.sleep(120)

    store.storage.put_chunk = put_then_stall
    store.push(sys.argv[2], "team-a/killed")
    """
)


def test_killed_push_leaves_nothing_visible_and_is_collected(
    registry_url: str, store: AdapterStore, make_adapter: AdapterFactory
) -> None:
    source = make_adapter(hidden=64)
    process = subprocess.Popen(
        [sys.executable, "-c", KILLED_PUSH, registry_url, str(source), str(TEST_CHUNK_SIZE)],
        stdout=subprocess.PIPE, text=True, cwd=REPOSITORY,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        assert process.stdout.readline().strip() == "three chunks stored"
    finally:
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=10)

    assert store.list_adapters() == []
    with pytest.raises(NotFoundError):
        store.resolve("team-a/killed")
    assert store.events() == []
    assert len(stored_chunks(store)) == 3  # the partial payload, invisible
    assert store.collect_garbage() == 0  # within its lease the push might still be alive
    assert store.collect_garbage(lease_s=0) == 3
    assert_empty(store)
    # The registry is fully usable afterwards, and the name's first version is still 1.
    assert store.push(source, "team-a/killed").version == 1
