"""A Redis that refuses the credentials, stops answering or sits idle: clear errors, never a hang or a leak.

Tests that stop or lock a Redis start their own `redis-server` on a free port and kill only that one.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from adapters_registry import AuthError, UnreachableError, errors, open_store
from tests.adapters_registry.conftest import _REDIS_SKIP, REDIS_URL, AdapterFactory
from tests.adapters_registry.test_cli import assert_one_line_error, run_cli

PASSWORD = "Zq7-s3cret-pass"


@pytest.fixture
def own_redis(request: pytest.FixtureRequest) -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    """A private redis-server, given extra arguments by indirect parametrization: (port, process)."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    extra = list(getattr(request, "param", []))
    command = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    process = subprocess.Popen([*command, *extra], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            with socket.socket() as attempt:
                if attempt.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if time.monotonic() > deadline:
                raise AssertionError("redis-server did not start")
            time.sleep(0.02)
        yield port, process
    finally:
        os.kill(process.pid, signal.SIGCONT)  # in case a test left it stopped
        process.kill()
        process.wait(timeout=10)


@pytest.mark.parametrize("own_redis", [["--requirepass", PASSWORD]], indirect=True)
def test_refused_credentials_are_an_auth_error_without_the_password(
    own_redis: tuple[int, subprocess.Popen[bytes]], make_adapter: AdapterFactory, tmp_path: Path
) -> None:
    port, _process = own_redis
    for url in (f"redis://127.0.0.1:{port}/0", f"redis://:not-{PASSWORD}@127.0.0.1:{port}/0"):
        with pytest.raises(AuthError, match="refused access") as raised:
            open_store(url).list_adapters()
        assert PASSWORD not in str(raised.value)
        result = run_cli("list", registry=url)
        assert_one_line_error(result, errors.EXIT_AUTH, "refused access")
        assert PASSWORD not in result.stderr
    # Both documented ways of passing the password work.
    source = make_adapter()
    query_form = f"redis://127.0.0.1:{port}/0?password={PASSWORD}"
    userinfo_form = f"redis://default:{PASSWORD}@127.0.0.1:{port}/0"
    pushed = run_cli("push", str(source), "--name", "team-a/x", registry=query_form)
    assert pushed.returncode == 0, pushed.stderr
    assert PASSWORD not in pushed.stdout + pushed.stderr
    assert run_cli("pull", "team-a/x", str(tmp_path / "out"), registry=userinfo_form).returncode == 0
    assert (tmp_path / "out" / "adapter_model.safetensors").read_bytes() == (
        source / "adapter_model.safetensors"
    ).read_bytes()


def test_a_redis_that_stops_answering_fails_each_call_instead_of_hanging(
    own_redis: tuple[int, subprocess.Popen[bytes]],
) -> None:
    port, process = own_redis
    store = open_store(f"redis://127.0.0.1:{port}/0?socket_timeout=1")
    assert store.list_adapters() == []
    os.kill(process.pid, signal.SIGSTOP)  # accepts connections (the kernel does) but never replies
    try:
        with pytest.raises(UnreachableError, match="is unreachable"):
            store.list_adapters()
    finally:
        os.kill(process.pid, signal.SIGCONT)
    assert store.list_adapters() == []  # and recovers by itself


@pytest.fixture
def redis_registry() -> Iterator[str]:
    if _REDIS_SKIP:
        pytest.skip(_REDIS_SKIP)
    prefix = f"kvrun-test-{uuid.uuid4().hex[:12]}:"
    yield f"{REDIS_URL}{'&' if '?' in REDIS_URL else '?'}prefix={prefix}&socket_timeout=1"
    client = redis.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(match=f"{prefix}*"))
    if keys:
        client.delete(*keys)
    client.close()


def test_waiting_for_events_longer_than_the_socket_timeout(redis_registry: str, make_adapter: AdapterFactory) -> None:
    """A quiet change log is not an outage: a long wait returns early and empty, within what was asked."""
    store = open_store(redis_registry, token="")
    assert store.events(None, block_ms=3000) == []  # would read as "unreachable" after the 1 s socket timeout
    last = store.last_event_id()
    store.push(make_adapter(), "team-a/x")
    assert [event.kind for event in store.events(last, block_ms=3000)] == ["publish"]
    watched = store.watch(store.last_event_id(), block_ms=3000)
    store.push(make_adapter(seed=1), "team-a/x")
    assert next(watched).version == 2
