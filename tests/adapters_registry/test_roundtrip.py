"""Push / list / show / pull round trips, versions N+1, content-addressed sharing, integrity on the way out."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from adapters_registry import AdapterStore, IntegrityError, NotFoundError, UsageError
from tests.adapters_registry.conftest import AdapterFactory, stored_chunks


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_push_list_show_pull_round_trip(store: AdapterStore, make_adapter: AdapterFactory, tmp_path: Path) -> None:
    source = make_adapter(rank=8, hidden=64, modules=("q_proj", "k_proj", "v_proj", "o_proj"))
    record = store.push(source, "team-a/pirate", description="talks like a pirate", pushed_by="alice")

    assert (record.name, record.version, record.rank, record.alpha) == ("team-a/pirate", 1, 8, 16.0)
    assert record.target_modules == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert (record.dtype, record.base_model, record.pushed_by) == ("F16", "tiny/base", "alice")
    assert record.description == "talks like a pirate"
    assert {entry.name: entry.sha256 for entry in record.files} == {
        name: sha256_of(source / name) for name in ("adapter_config.json", "adapter_model.safetensors")
    }
    assert all(len(entry.chunks) >= 1 for entry in record.files)
    assert len(record.file("adapter_model.safetensors").chunks) > 1  # chunked at 1 KiB in tests

    [summary] = store.list_adapters()
    assert (summary.name, summary.versions, summary.tags, summary.latest) == (
        "team-a/pirate",
        [1],
        {"latest": 1},
        record,
    )
    assert store.resolve("team-a/pirate") == record
    assert store.resolve("team-a/pirate@1") == record
    assert store.resolve("team-a/pirate:latest") == record

    target = tmp_path / "pulled"
    assert store.pull("team-a/pirate", target) == record
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (target / name).read_bytes() == (source / name).read_bytes()
        assert sha256_of(target / name) == record.file(name).sha256
    assert store.fetch_files(record) == {
        name: (source / name).read_bytes() for name in ("adapter_config.json", "adapter_model.safetensors")
    }


def test_each_push_is_the_next_version(store: AdapterStore, make_adapter: AdapterFactory) -> None:
    versions = [store.push(make_adapter(seed=seed), "team-a/chat").version for seed in range(3)]
    assert versions == [1, 2, 3]
    assert store.resolve("team-a/chat").version == 3
    assert [r.version for r in store.versions("team-a/chat")] == [1, 2, 3]
    assert store.resolve("team-a/chat@1").sha256 != store.resolve("team-a/chat@2").sha256


def test_identical_pushes_share_chunks(store: AdapterStore, make_adapter: AdapterFactory) -> None:
    source = make_adapter(hidden=64)
    first = store.push(source, "team-a/one")
    chunks_after_first = stored_chunks(store)
    second = store.push(source, "team-b/two")
    assert stored_chunks(store) == chunks_after_first
    assert first.sha256 == second.sha256  # identity is content, whatever the name
    assert first.files == second.files


def test_list_filters_by_namespace(store: AdapterStore, make_adapter: AdapterFactory) -> None:
    source = make_adapter()
    for name in ("team-a/x", "team-a/y", "team-b/z"):
        store.push(source, name)
    assert [s.name for s in store.list_adapters()] == ["team-a/x", "team-a/y", "team-b/z"]
    assert [s.name for s in store.list_adapters("team-a")] == ["team-a/x", "team-a/y"]
    assert store.list_adapters("team-c") == []


def test_push_from_memory_and_base_model_override(store: AdapterStore, make_adapter: AdapterFactory) -> None:
    source = make_adapter()
    files = {name: (source / name).read_bytes() for name in ("adapter_config.json", "adapter_model.safetensors")}
    record = store.push(files, "team-a/mem", base_model="HuggingFaceTB/SmolLM2-135M-Instruct")
    assert record.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert store.fetch_files("team-a/mem") == files


@pytest.mark.parametrize("ref", ["team-a/missing", "team-a/present@9", "team-a/present:prod", "team-z/present"])
def test_resolve_unknown_refs(store: AdapterStore, make_adapter: AdapterFactory, ref: str) -> None:
    store.push(make_adapter(), "team-a/present")
    with pytest.raises(NotFoundError):
        store.resolve(ref)


@pytest.mark.parametrize(
    "ref",
    [
        "pirate",
        "team-a/",
        "Team-A/x",
        "team-a/../x",
        "../etc/passwd",
        "team-a/x@0",
        "team-a/x@v1",
        "a/b/c",
        "team-a/x:BAD",
    ],
)
def test_malformed_refs_are_usage_errors(store: AdapterStore, ref: str) -> None:
    with pytest.raises(UsageError):
        store.resolve(ref)


def test_corrupted_chunk_is_detected_on_pull(store: AdapterStore, make_adapter: AdapterFactory, tmp_path: Path) -> None:
    record = store.push(make_adapter(hidden=64), "team-a/x")
    victim = record.file("adapter_model.safetensors").chunks[1]
    store.storage.put_chunk(victim, b"not the bytes you stored")
    with pytest.raises(IntegrityError, match=r"adapter_model\.safetensors: chunk 1"):
        store.pull("team-a/x", tmp_path / "out")
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()
    assert store.storage.sweep_chunks([victim], in_use=set) == 1  # a sweep told no version uses it
    with pytest.raises(IntegrityError, match="missing"):
        store.fetch_files(record)
