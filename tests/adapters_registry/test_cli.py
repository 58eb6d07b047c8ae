"""`kvrun-adapters` end to end through real subprocesses: output, exit codes, one-line errors."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from adapters_registry import errors
from tests.adapters_registry.conftest import REDIS_URL, AdapterFactory

REPOSITORY = Path(__file__).resolve().parents[2]


def run_cli(
    *args: str, registry: str | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("KVRUN_REGISTRY")}
    environment.update(env or {})
    if registry:
        environment["KVRUN_REGISTRY"] = registry
    command = [sys.executable, "-c", "import sys; from adapters_registry.cli import main; sys.exit(main())", *args]
    return subprocess.run(command, capture_output=True, text=True, env=environment, cwd=REPOSITORY, timeout=60)


def assert_one_line_error(result: subprocess.CompletedProcess[str], code: int, fragment: str) -> None:
    assert result.returncode == code, result.stderr
    assert result.stderr.startswith("kvrun-adapters: error: ")
    assert result.stderr.count("\n") == 1, result.stderr
    assert fragment in result.stderr
    assert "Traceback" not in result.stderr


@pytest.fixture
def registry(tmp_path: Path) -> str:
    return f"file://{tmp_path / 'registry'}"


def test_push_list_show_pull_tag_delete(registry: str, make_adapter: AdapterFactory, tmp_path: Path) -> None:
    source = make_adapter()
    pushed = run_cli(
        "push", str(source), "--name", "team-a/pirate", "--tag", "prod", "--description", "arr", registry=registry
    )
    assert pushed.returncode == 0, pushed.stderr
    assert pushed.stdout.startswith("pushed team-a/pirate@1 ")
    again = run_cli("--json", "push", str(source), "--name", "team-a/pirate", registry=registry)
    record = json.loads(again.stdout)
    assert (record["version"], record["tags"], record["rank"]) == (2, ["latest"], 4)

    listing = run_cli("list", registry=registry)
    assert listing.stdout.splitlines()[1].split()[:4] == ["team-a/pirate", "2", "2", "prod=1"]
    shown = json.loads(run_cli("show", "team-a/pirate:prod", "--json", registry=registry).stdout)
    assert (shown["version"], shown["description"], shown["tags"]) == (1, "arr", ["prod"])

    target = tmp_path / "pulled"
    pulled = run_cli("pull", "team-a/pirate@1", str(target), registry=registry)
    assert pulled.returncode == 0 and "sha256 verified" in pulled.stdout
    for entry in shown["files"]:
        assert hashlib.sha256((target / entry["name"]).read_bytes()).hexdigest() == entry["sha256"]

    assert run_cli("tag", "team-a/pirate@2", "prod", registry=registry).stdout.strip() == "team-a/pirate:prod -> 2"
    assert run_cli("untag", "team-a/pirate", "prod", registry=registry).returncode == 0
    assert (
        run_cli("delete", "team-a/pirate@2", registry=registry).stdout.strip() == "deleted team-a/pirate version(s) 2"
    )
    events = [json.loads(line) for line in run_cli("events", registry=registry).stdout.splitlines()]
    assert [e["kind"] for e in events] == ["publish", "publish", "tag", "untag", "delete", "tag"]
    assert run_cli("delete", "team-a/pirate", registry=registry).returncode == 0
    assert run_cli("list", registry=registry).stdout.strip() == "no adapters"


def test_exit_codes_and_one_line_errors(registry: str, make_adapter: AdapterFactory) -> None:
    assert_one_line_error(
        run_cli("show", "team-a/ghost", registry=registry), errors.EXIT_NOT_FOUND, "adapter team-a/ghost not found"
    )
    assert_one_line_error(run_cli("show", "Not A Name", registry=registry), errors.EXIT_USAGE, "invalid adapter name")
    assert_one_line_error(run_cli("push", registry=registry), errors.EXIT_USAGE, "the following arguments are required")
    bad = make_adapter(config={"use_dora": True})
    assert_one_line_error(
        run_cli("push", str(bad), "--name", "team-a/x", registry=registry), errors.EXIT_REJECTED, "use_dora"
    )
    pickled = make_adapter()
    (pickled / "adapter_model.bin").write_bytes(b"pickle")
    assert_one_line_error(
        run_cli("push", str(pickled), "--name", "team-a/x", registry=registry),
        errors.EXIT_REJECTED,
        "can execute arbitrary code",
    )
    assert_one_line_error(
        run_cli("list", registry="redis://127.0.0.1:1/0"),
        errors.EXIT_UNREACHABLE,
        "registry redis://127.0.0.1:1/0 is unreachable",
    )
    assert_one_line_error(
        run_cli("list", registry="ftp://x/y"), errors.EXIT_USAGE, "use redis://host:port/db or file:///path"
    )


def test_tokens_from_the_command_line(registry: str, make_adapter: AdapterFactory) -> None:
    source = make_adapter()
    admin_secret = "admin-secret-provisioned-by-ops"
    adopted = run_cli("token", "init", registry=registry, env={"KVRUN_REGISTRY_ADMIN_TOKEN": admin_secret})
    assert adopted.returncode == 0, adopted.stderr
    assert_one_line_error(run_cli("token", "init", registry=registry), errors.EXIT_CONFLICT, "already has tokens")

    denied = run_cli("push", str(source), "--name", "team-a/x", registry=registry)
    assert_one_line_error(
        denied, errors.EXIT_AUTH, "requires a token for writes; pass --token or set KVRUN_REGISTRY_TOKEN"
    )
    created = run_cli("token", "create", "--scope", "team-a/*", "--json", "--token", admin_secret, registry=registry)
    token = json.loads(created.stdout)
    assert token["scopes"] == ["team-a/*"] and token["token"].startswith("kvr_")

    as_team_a = {"KVRUN_REGISTRY_TOKEN": token["token"]}
    assert run_cli("push", str(source), "--name", "team-a/x", registry=registry, env=as_team_a).returncode == 0
    assert_one_line_error(
        run_cli("push", str(source), "--name", "team-b/x", registry=registry, env=as_team_a),
        errors.EXIT_AUTH,
        "may not write team-b/x",
    )
    assert_one_line_error(
        run_cli("token", "list", registry=registry, env=as_team_a), errors.EXIT_AUTH, "needs an admin token"
    )
    listed = run_cli("token", "list", "--token", admin_secret, registry=registry)
    assert token["id"] in listed.stdout and token["token"] not in listed.stdout
    assert run_cli("token", "revoke", token["id"], "--token", admin_secret, registry=registry).returncode == 0
    assert_one_line_error(
        run_cli("tag", "team-a/x@1", "prod", registry=registry, env=as_team_a),
        errors.EXIT_AUTH,
        "invalid or revoked token",
    )
    assert run_cli("show", "team-a/x", registry=registry).returncode == 0  # reads stay open


def test_redis_registry_from_the_command_line(make_adapter: AdapterFactory, tmp_path: Path) -> None:
    from tests.adapters_registry.conftest import _REDIS_SKIP

    if _REDIS_SKIP:
        pytest.skip(_REDIS_SKIP)
    import uuid

    import redis

    prefix = f"kvrun-test-{uuid.uuid4().hex[:12]}:"
    registry = f"{REDIS_URL}{'&' if '?' in REDIS_URL else '?'}prefix={prefix}"
    try:
        source = make_adapter()
        assert run_cli("push", str(source), "--name", "team-a/x", registry=registry).returncode == 0
        assert run_cli("pull", "team-a/x", str(tmp_path / "out"), registry=registry).returncode == 0
        assert (tmp_path / "out" / "adapter_model.safetensors").read_bytes() == (
            source / "adapter_model.safetensors"
        ).read_bytes()
    finally:
        client = redis.Redis.from_url(REDIS_URL)
        keys = list(client.scan_iter(match=f"{prefix}*"))
        if keys:
            client.delete(*keys)


def test_help_lists_exit_codes() -> None:
    result = run_cli("--help")
    assert result.returncode == 0
    assert "exit codes:" in result.stdout and "7  registry unreachable" in result.stdout
