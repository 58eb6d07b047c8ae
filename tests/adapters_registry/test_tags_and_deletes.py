"""Tags (automatic `latest`, custom, moved, removed) and deletes of versions and whole adapters."""

from __future__ import annotations

import pytest

from adapters_registry import AdapterStore, NotFoundError, UsageError
from tests.adapters_registry.conftest import AdapterFactory, assert_empty, stored_chunks


@pytest.fixture
def three_versions(store: AdapterStore, make_adapter: AdapterFactory) -> AdapterStore:
    for seed in range(3):
        store.push(make_adapter(seed=seed, hidden=32), "team-a/chat")
    return store


def tags(store: AdapterStore) -> dict[str, int]:
    [summary] = store.list_adapters()
    return summary.tags


def test_latest_follows_pushes_and_tags_given_at_push(store: AdapterStore, make_adapter: AdapterFactory) -> None:
    store.push(make_adapter(seed=1), "team-a/chat", tags=["prod", "canary"])
    assert tags(store) == {"latest": 1, "prod": 1, "canary": 1}
    store.push(make_adapter(seed=2), "team-a/chat", tags=["canary"])
    assert tags(store) == {"latest": 2, "prod": 1, "canary": 2}
    assert store.resolve("team-a/chat:prod").version == 1
    assert store.tags_of(store.resolve("team-a/chat@2")) == ["canary", "latest"]


def test_tag_moves_and_untag(three_versions: AdapterStore) -> None:
    store = three_versions
    assert store.tag("team-a/chat@1", "prod").version == 1
    assert store.tag("team-a/chat:prod", "stable").version == 1  # a tag ref works as a source
    store.tag("team-a/chat", "prod")  # moves to latest
    assert tags(store) == {"latest": 3, "prod": 3, "stable": 1}
    store.untag("team-a/chat", "stable")
    assert tags(store) == {"latest": 3, "prod": 3}
    with pytest.raises(NotFoundError, match="no tag 'stable'"):
        store.untag("team-a/chat", "stable")
    with pytest.raises(NotFoundError, match="no version 7"):
        store.tag("team-a/chat@7", "prod")
    assert tags(store) == {"latest": 3, "prod": 3}


@pytest.mark.parametrize("operation", ["tag", "untag", "push"])
def test_latest_is_reserved(three_versions: AdapterStore, make_adapter: AdapterFactory, operation: str) -> None:
    store = three_versions
    with pytest.raises(UsageError, match="managed by the registry"):
        if operation == "tag":
            store.tag("team-a/chat@1", "latest")
        elif operation == "untag":
            store.untag("team-a/chat", "latest")
        else:
            store.push(make_adapter(), "team-a/chat", tags=["latest"])
    assert tags(store)["latest"] == 3


def test_delete_version_moves_latest_and_drops_its_tags(three_versions: AdapterStore) -> None:
    store = three_versions
    store.tag("team-a/chat@3", "prod")
    [deleted] = store.delete("team-a/chat:prod")
    assert deleted.version == 3
    assert tags(store) == {"latest": 2}
    assert [r.version for r in store.versions("team-a/chat")] == [1, 2]
    with pytest.raises(NotFoundError):
        store.resolve("team-a/chat@3")
    store.delete("team-a/chat@1")
    assert store.list_adapters()[0].versions == [2]


def test_version_numbers_are_never_reused(three_versions: AdapterStore, make_adapter: AdapterFactory) -> None:
    store = three_versions
    store.delete("team-a/chat@3")
    assert store.push(make_adapter(seed=9), "team-a/chat").version == 4
    store.delete("team-a/chat")
    assert store.push(make_adapter(seed=9), "team-a/chat").version == 5


def test_delete_whole_adapter_frees_its_chunks(three_versions: AdapterStore) -> None:
    store = three_versions
    deleted = store.delete("team-a/chat")
    assert [r.version for r in deleted] == [1, 2, 3]
    assert_empty(store)
    with pytest.raises(NotFoundError, match="adapter team-a/chat not found"):
        store.resolve("team-a/chat")
    with pytest.raises(NotFoundError):
        store.delete("team-a/chat")


def test_delete_keeps_chunks_shared_with_other_versions(store: AdapterStore, make_adapter: AdapterFactory) -> None:
    source = make_adapter(hidden=32)
    store.push(source, "team-a/one")
    store.push(source, "team-b/two")
    before = stored_chunks(store)
    store.delete("team-a/one")
    assert stored_chunks(store) == before
    assert (
        store.fetch_files("team-b/two")["adapter_model.safetensors"]
        == (source / "adapter_model.safetensors").read_bytes()
    )
