"""Chunks of killed pushes are collected automatically once their lease is over, by the next push; chunks of
live pushes and of published versions are never collected."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import msgspec
import pytest
import torch

from adapters_registry import AdapterStore, open_store
from adapters_registry.payload import DEFAULT_CHUNK_SIZE, prepare_upload, referenced_chunks
from adapters_registry.validate import read_adapter_dir
from tests.adapters_registry.conftest import TEST_CHUNK_SIZE, AdapterFactory, stored_chunks
from tests.adapters_registry.test_cli import REPOSITORY, assert_one_line_error, run_cli

# `kvrun-adapters` itself, except that after its Nth stored chunk it says "paused" and waits for a line on
# stdin: the test SIGKILLs it there, or lets it go on.
PAUSING_CLI = textwrap.dedent(
    """
    import sys
    from adapters_registry.cli import main
    from adapters_registry.file_store import FileStorage
    from adapters_registry.redis_store import RedisStorage

    pause_after, written = int(sys.argv[1]), 0

    def pausing(put_chunk):
        def put_then_pause(self, sha, data):
            global written
            put_chunk(self, sha, data)
            written += 1
            if written == pause_after:
                print("paused", flush=True)
                sys.stdin.readline()
        return put_then_pause

    FileStorage.put_chunk = pausing(FileStorage.put_chunk)
    RedisStorage.put_chunk = pausing(RedisStorage.put_chunk)
    sys.exit(main(sys.argv[2:]))
    """
)


def start_paused_push(registry: str, pause_after: int, *args: str) -> subprocess.Popen[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("KVRUN_REGISTRY")}
    process = subprocess.Popen(
        [sys.executable, "-c", PAUSING_CLI, str(pause_after), "--registry", registry, "push", *args],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment,
        cwd=REPOSITORY,
    )  # fmt: skip
    assert process.stdout is not None
    line = process.stdout.readline()
    if line.strip() != "paused":
        process.kill()
        raise AssertionError(f"the push did not pause: {line!r} {process.communicate()[1]}")
    return process


def chunks_of(directory: Path) -> set[str]:
    return set(prepare_upload(read_adapter_dir(directory), DEFAULT_CHUNK_SIZE, 1.0).pieces)


def same_files(left: Path, right: Path) -> bool:
    names = ("adapter_config.json", "adapter_model.safetensors")
    return all((left / name).read_bytes() == (right / name).read_bytes() for name in names)


def test_sigkilled_push_is_collected_by_the_next_push(
    registry_url: str, make_adapter: AdapterFactory, tmp_path: Path
) -> None:
    published_source = make_adapter(rank=16, seed=1)
    # ~9.4 MB of float32 weights each: three 4 MiB chunks. Same config as the published adapter, so the killed
    # push's upload also names a chunk a published version uses.
    big = {"rank": 16, "hidden": 4096, "layers": 9, "dtype": torch.float32}
    killed_source, live_source = make_adapter(**big, seed=2), make_adapter(**big, seed=3)
    assert run_cli("push", str(published_source), "--name", "team-a/published", registry=registry_url).returncode == 0
    store = open_store(registry_url, token="")
    published = store.resolve("team-a/published")
    published_chunks = {sha for entry in published.files for sha in entry.chunks}
    assert published_chunks & chunks_of(killed_source)  # the shared config chunk

    killed = start_paused_push(registry_url, 2, str(killed_source), "--name", "team-a/killed", "--lease-s", "1")
    os.kill(killed.pid, signal.SIGKILL)
    assert killed.wait(timeout=30) == -signal.SIGKILL
    orphans = stored_chunks(store) - published_chunks
    assert len(orphans) == 2 and orphans <= chunks_of(killed_source)

    live = start_paused_push(registry_url, 1, str(live_source), "--name", "team-a/live")
    try:
        live_written = stored_chunks(store) - published_chunks - orphans
        assert len(live_written) == 1
        time.sleep(1.5)  # the killed push's 1 s lease runs out; the live one holds the default 900 s

        following = run_cli("push", str(make_adapter(seed=4)), "--name", "team-a/next", registry=registry_url)
        assert following.returncode == 0, following.stderr
        remaining = stored_chunks(store)
        assert not remaining & orphans  # collected, with nobody running gc
        assert published_chunks <= remaining and live_written <= remaining
        swept = run_cli("--json", "gc", registry=registry_url)  # a full sweep spares the live push too
        assert swept.stdout.strip() == '{"deleted_chunks":0}' and stored_chunks(store) == remaining
        pulled = run_cli("pull", "team-a/published", str(tmp_path / "published"), registry=registry_url)
        assert pulled.returncode == 0, pulled.stderr
        assert same_files(tmp_path / "published", published_source)
    finally:
        output, problems = live.communicate("\n", timeout=60)  # let the live push go on
    assert live.returncode == 0, problems
    assert output.startswith("pushed team-a/live@1 ")
    assert run_cli("pull", "team-a/live", str(tmp_path / "live"), registry=registry_url).returncode == 0
    assert same_files(tmp_path / "live", live_source)
    assert [summary.name for summary in store.list_adapters()] == ["team-a/live", "team-a/next", "team-a/published"]
    assert stored_chunks(store) == referenced_chunks(store.storage)  # nothing else is left over


def test_push_whose_lease_lapsed_midway_still_publishes(
    registry_url: str, store: AdapterStore, make_adapter: AdapterFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A push stalled past its lease has its chunks collected; it writes them again at publish."""
    pusher = open_store(registry_url, token="", chunk_size=TEST_CHUNK_SIZE, upload_lease_s=0.2)
    put_chunk = pusher.storage.put_chunk
    collected: list[int] = []

    def put_then_stall(sha: str, data: bytes) -> None:
        put_chunk(sha, data)
        if len(collected) == 0:
            time.sleep(0.3)  # silent past the lease, like a stalled network
            collected.append(store.collect_garbage())

    monkeypatch.setattr(pusher.storage, "put_chunk", put_then_stall)
    source = make_adapter(hidden=64)
    record = pusher.push(source, "team-a/slow")
    assert collected == [1]  # the one chunk it had written was taken as garbage...
    store.pull(record, tmp_path / "out")  # ...and written again before the publish, so the version is whole
    assert same_files(tmp_path / "out", source)
    assert stored_chunks(store) == referenced_chunks(store.storage)


def test_uploads_recorded_without_a_lease_get_the_default(
    registry_url: str, store: AdapterStore, make_adapter: AdapterFactory
) -> None:
    """Records of pushes started by a registry version that kept only a heartbeat."""
    record = store.push(make_adapter(hidden=64), "team-a/x")
    orphan, kept = "ab" * 32, "cd" * 32
    for sha in (orphan, kept):
        store.storage.put_chunk(sha, b"partial payload")
    for upload_id, sha, heartbeat in (("old", orphan, time.time() - 901), ("recent", kept, time.time() - 60)):
        storage = store.storage
        if registry_url.startswith("file://"):
            legacy = {"heartbeat": heartbeat, "chunks": [sha]}
            (storage.root / "uploads" / f"{upload_id}.json").write_bytes(msgspec.json.encode(legacy))  # type: ignore[attr-defined]
        else:
            storage.redis.hset(storage.keys.uploads, upload_id, repr(heartbeat))  # type: ignore[attr-defined]
            storage.redis.sadd(storage.keys.upload(upload_id), sha)  # type: ignore[attr-defined]
    assert store.collect_garbage() == 1
    assert stored_chunks(store) == referenced_chunks(store.storage) | {kept}
    assert store.collect_garbage(lease_s=0) == 1
    assert store.fetch_files(record)


def test_lease_options_are_checked(registry_url: str, make_adapter: AdapterFactory) -> None:
    source = str(make_adapter())
    for value in ("0", "-5", "nan", "inf", "soon"):
        refused = run_cli("push", source, "--name", "team-a/x", "--lease-s", value, registry=registry_url)
        assert_one_line_error(refused, 2, "is not a positive number of seconds")
    assert_one_line_error(run_cli("gc", "--lease-s", "-1", registry=registry_url), 2, "non-negative number of seconds")
    collected = run_cli("--json", "gc", "--lease-s", "0", registry=registry_url)
    assert collected.returncode == 0 and collected.stdout.strip() == '{"deleted_chunks":0}'
    with pytest.raises(Exception, match="upload_lease_s must be a positive number"):
        open_store(registry_url, upload_lease_s=0)
