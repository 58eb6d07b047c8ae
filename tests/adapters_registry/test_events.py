"""Change events: every publish, tag move and delete is logged; subscribers catch up from their last id."""

from __future__ import annotations

import json
import threading
import time

import pytest

from adapters_registry import AdapterStore, Event, open_store
from tests.adapters_registry.conftest import TEST_CHUNK_SIZE, AdapterFactory


def summary(events: list[Event]) -> list[tuple[str, str, int | None, str | None]]:
    return [(e.kind, e.name, e.version, e.tag) for e in events]


def test_every_change_emits_an_event(store: AdapterStore, make_adapter: AdapterFactory) -> None:
    first = store.push(make_adapter(seed=1), "team-a/x", tags=["prod"])
    store.push(make_adapter(seed=2), "team-a/x")
    store.tag("team-a/x@2", "prod")
    store.untag("team-a/x", "prod")
    store.delete("team-a/x@2")
    store.delete("team-a/x")
    events = store.events()
    assert summary(events) == [
        ("publish", "team-a/x", 1, None),
        ("publish", "team-a/x", 2, None),
        ("tag", "team-a/x", 2, "prod"),
        ("untag", "team-a/x", 2, "prod"),
        ("delete", "team-a/x", 2, None),
        ("tag", "team-a/x", 1, "latest"),  # latest moved back when its version went away
        ("delete", "team-a/x", None, None),
    ]
    assert events[0].tags == ["latest", "prod"] and events[0].sha256 == first.sha256
    assert events[4].tags == ["latest"]
    assert len({e.id for e in events}) == len(events)
    assert store.last_event_id() == events[-1].id


def test_subscriber_catches_up_after_missing_events(store: AdapterStore, make_adapter: AdapterFactory) -> None:
    store.push(make_adapter(seed=1), "team-a/x")
    [seen] = store.events()
    # The subscriber goes away; three changes happen meanwhile.
    store.push(make_adapter(seed=2), "team-a/x")
    store.tag("team-a/x@1", "prod")
    store.push(make_adapter(seed=3), "team-b/y")
    missed = store.events(seen.id)
    assert summary(missed) == [
        ("publish", "team-a/x", 2, None),
        ("tag", "team-a/x", 1, "prod"),
        ("publish", "team-b/y", 1, None),
    ]
    assert store.events(missed[-1].id) == []
    assert summary(store.events(seen.id, limit=1)) == summary(missed[:1])


def test_watch_delivers_new_events_to_a_live_subscriber(
    registry_url: str, store: AdapterStore, make_adapter: AdapterFactory
) -> None:
    store.push(make_adapter(seed=1), "team-a/old")  # before the subscriber starts: not delivered
    received: list[Event] = []
    stop = threading.Event()
    ready = threading.Event()

    def subscribe() -> None:
        with open_store(registry_url) as subscriber:
            watch = subscriber.watch(block_ms=100, stop=stop)
            ready.set()
            for event in watch:
                received.append(event)
                if len(received) == 3:
                    stop.set()

    thread = threading.Thread(target=subscribe)
    thread.start()
    assert ready.wait(10)
    time.sleep(0.3)  # let watch() take its starting id
    store.push(make_adapter(seed=2), "team-a/new", tags=["prod"])
    store.tag("team-a/new@1", "stable")
    store.delete("team-a/new")
    thread.join(timeout=20)
    assert not thread.is_alive()
    assert summary(received) == [
        ("publish", "team-a/new", 1, None), ("tag", "team-a/new", 1, "stable"), ("delete", "team-a/new", None, None),
    ]  # fmt: skip


def test_blocking_read_wakes_up_on_a_change(store: AdapterStore, make_adapter: AdapterFactory) -> None:
    store.push(make_adapter(seed=1), "team-a/x")
    last = store.last_event_id()
    timer = threading.Timer(0.3, lambda: store.tag("team-a/x@1", "prod"))
    timer.start()
    started = time.monotonic()
    events = store.events(last, block_ms=5000)
    timer.join()
    assert summary(events) == [("tag", "team-a/x", 1, "prod")]
    assert time.monotonic() - started < 4
    assert store.events(events[-1].id, block_ms=200) == []  # times out empty


def test_bounded_log_tells_a_late_reader_to_resync(registry_url: str, make_adapter: AdapterFactory) -> None:
    with open_store(registry_url, token="", chunk_size=TEST_CHUNK_SIZE, events_maxlen=3) as store:
        store.push(make_adapter(), "team-a/x")
        first_id = store.last_event_id()
        for tag in ("a", "b", "c", "d", "e", "f"):
            store.tag("team-a/x@1", tag)
        assert len(store.events()) <= 4  # bounded (the file backend trims with a little slack)
        late = store.events(first_id)
        assert late[0].kind == "resync" and late[0].id == first_id
        assert summary(late[1:])[-1] == ("tag", "team-a/x", 1, "f")
        assert [e.kind for e in store.events(late[-1].id)] == []  # caught up: no resync any more


def test_redis_pubsub_carries_the_same_events(
    registry_url: str, store: AdapterStore, make_adapter: AdapterFactory
) -> None:
    if not registry_url.startswith("redis"):
        pytest.skip("pub/sub is a Redis feature; the file backend is polled")
    pubsub = store.storage.redis.pubsub()
    pubsub.subscribe(store.storage.keys.events)
    assert pubsub.get_message(timeout=5)["type"] == "subscribe"
    store.push(make_adapter(), "team-a/x")
    message = pubsub.get_message(timeout=5)
    pubsub.close()
    published = json.loads(message["data"])
    [logged] = store.events()
    assert published["id"] == logged.id and published["kind"] == "publish" and published["version"] == 1
