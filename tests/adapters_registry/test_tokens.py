"""Write tokens: scoped to namespaces, stored hashed, revocable, managed by admins; reads stay open."""

from __future__ import annotations

import hashlib
import json

import msgspec
import pytest

from adapters_registry import AdapterStore, AuthError, ConflictError, NotFoundError, errors, open_store
from tests.adapters_registry.conftest import TEST_CHUNK_SIZE, AdapterFactory, assert_empty
from tests.adapters_registry.test_cli import assert_one_line_error, run_cli


def as_user(registry_url: str, token: str | None) -> AdapterStore:
    return open_store(registry_url, token=token or "", chunk_size=TEST_CHUNK_SIZE)


def test_open_registry_until_first_token(registry_url: str, store: AdapterStore, make_adapter: AdapterFactory) -> None:
    assert store.push(make_adapter(), "team-a/x").version == 1  # no tokens: writes are open
    admin = store.init_admin_token()
    with pytest.raises(ConflictError, match="already has tokens"):
        store.init_admin_token()
    with pytest.raises(AuthError, match="requires a token for writes"):
        store.push(make_adapter(), "team-a/x")
    with pytest.raises(AuthError, match="invalid or revoked token"):
        as_user(registry_url, "kvr_guess").push(make_adapter(), "team-a/x")
    assert as_user(registry_url, admin).push(make_adapter(), "team-a/x").version == 2


def test_scoped_token_writes_only_its_namespace(
    registry_url: str, store: AdapterStore, make_adapter: AdapterFactory
) -> None:
    admin = as_user(registry_url, store.init_admin_token())
    admin.push(make_adapter(), "team-b/theirs")
    secret, info = admin.create_token(["team-a/*"], description="ci of team a")
    assert (info.scopes, info.admin, info.id) == (["team-a/*"], False, hashlib.sha256(secret.encode()).hexdigest()[:12])
    team_a = as_user(registry_url, secret)

    record = team_a.push(make_adapter(), "team-a/mine", tags=["prod"])
    assert record.token_id == info.id
    team_a.tag("team-a/mine@1", "stable")
    team_a.untag("team-a/mine", "stable")
    events_before = store.events()
    for write in (
        lambda: team_a.push(make_adapter(), "team-b/theirs"),
        lambda: team_a.tag("team-b/theirs@1", "prod"),
        lambda: team_a.untag("team-b/theirs", "latest-ish"),
        lambda: team_a.delete("team-b/theirs"),
    ):
        with pytest.raises(AuthError, match=rf"token {info.id} \(scopes team-a/\*\) may not write team-b/theirs"):
            write()
    assert store.events() == events_before  # refused writes change nothing
    assert store.versions("team-b/theirs")[0].version == 1

    # Reads need no token at all.
    reader = as_user(registry_url, None)
    assert [s.name for s in reader.list_adapters()] == ["team-a/mine", "team-b/theirs"]
    assert reader.fetch_files("team-b/theirs")
    with pytest.raises(AuthError, match="needs an admin token"):
        team_a.create_token(["*"])


def test_exact_name_scope(registry_url: str, store: AdapterStore, make_adapter: AdapterFactory) -> None:
    admin = as_user(registry_url, store.init_admin_token())
    secret, _info = admin.create_token(["team-a/one"])
    assert as_user(registry_url, secret).push(make_adapter(), "team-a/one").version == 1
    with pytest.raises(AuthError):
        as_user(registry_url, secret).push(make_adapter(), "team-a/two")


def test_revoked_token_fails(registry_url: str, store: AdapterStore, make_adapter: AdapterFactory) -> None:
    admin = as_user(registry_url, store.init_admin_token())
    secret, info = admin.create_token(["team-a/*"])
    as_user(registry_url, secret).push(make_adapter(), "team-a/x")
    assert admin.revoke_token(info.id).id == info.id
    with pytest.raises(AuthError, match="invalid or revoked token"):
        as_user(registry_url, secret).push(make_adapter(), "team-a/x")
    with pytest.raises(NotFoundError, match="no token with id"):
        admin.revoke_token(info.id)
    assert [t.id for t in admin.list_tokens()] == [admin.list_tokens()[0].id]


def test_tokens_are_stored_hashed(registry_url: str, store: AdapterStore) -> None:
    admin_secret = store.init_admin_token()
    secret, info = as_user(registry_url, admin_secret).create_token(["team-a/*"])
    stored = {record.id: record for record in store.storage.list_tokens()}
    assert stored[info.id].sha256 == hashlib.sha256(secret.encode()).hexdigest()
    raw = msgspec.json.encode(store.storage.list_tokens())
    assert secret.encode() not in raw and admin_secret.encode() not in raw
    listed = as_user(registry_url, admin_secret).list_tokens()
    assert "sha256" not in msgspec.json.encode(listed).decode()


def test_token_management_needs_admin(registry_url: str, store: AdapterStore) -> None:
    with pytest.raises(AuthError, match="run `kvrun-adapters token init`"):
        store.create_token(["team-a/*"])
    admin_secret = store.init_admin_token()
    admin = as_user(registry_url, admin_secret)
    scoped_secret, _ = admin.create_token(["*"])  # may write everywhere, but is no admin
    for action in (lambda s: s.list_tokens(), lambda s: s.create_token(["team-a/*"]), lambda s: s.revoke_token("x")):
        with pytest.raises(AuthError, match="needs an admin token"):
            action(as_user(registry_url, scoped_secret))
    [admin_info] = [t for t in admin.list_tokens() if t.admin]
    with pytest.raises(ConflictError, match="last admin token"):
        admin.revoke_token(admin_info.id)
    second_admin, _ = admin.create_token(["*"], admin=True)
    as_user(registry_url, second_admin).revoke_token(admin_info.id)
    with pytest.raises(AuthError):
        admin.list_tokens()


def test_refused_push_stores_nothing(registry_url: str, store: AdapterStore, make_adapter: AdapterFactory) -> None:
    store.init_admin_token()
    with pytest.raises(AuthError):
        as_user(registry_url, "kvr_wrong-token-value").push(make_adapter(hidden=64), "team-a/x")
    assert_empty(store)


def test_last_admin_token_cannot_be_revoked(
    registry_url: str, store: AdapterStore, make_adapter: AdapterFactory
) -> None:
    admin = as_user(registry_url, store.init_admin_token())
    [admin_info] = admin.list_tokens()
    with pytest.raises(ConflictError, match=f"token {admin_info.id} is the last admin token and cannot be revoked"):
        admin.revoke_token(admin_info.id)
    with pytest.raises(AuthError, match="requires a token for writes"):
        store.push(make_adapter(), "team-a/x")  # the registry stayed closed
    assert_empty(store)

    # Revoking every other token, admins included, still leaves one admin, so the registry stays closed.
    scoped, scoped_info = admin.create_token(["team-a/*"])
    second, second_info = admin.create_token(["*"], admin=True)
    admin.revoke_token(scoped_info.id)
    as_user(registry_url, second).revoke_token(admin_info.id)
    with pytest.raises(ConflictError, match="last admin token"):
        as_user(registry_url, second).revoke_token(second_info.id)
    assert [t.id for t in as_user(registry_url, second).list_tokens()] == [second_info.id]
    for token in (None, scoped, "kvr_not-a-token-at-all"):
        with pytest.raises(AuthError):
            as_user(registry_url, token).push(make_adapter(), "team-a/x")
    assert_empty(store)


def test_last_admin_token_from_the_command_line(registry_url: str, make_adapter: AdapterFactory) -> None:
    admin_secret = "admin-secret-provisioned-by-ops"
    init = run_cli("--json", "token", "init", registry=registry_url, env={"KVRUN_REGISTRY_ADMIN_TOKEN": admin_secret})
    assert init.returncode == 0, init.stderr
    [listed] = json.loads(run_cli("--json", "token", "list", "--token", admin_secret, registry=registry_url).stdout)
    refused = run_cli("token", "revoke", listed["id"], "--token", admin_secret, registry=registry_url)
    assert_one_line_error(refused, errors.EXIT_CONFLICT, "is the last admin token and cannot be revoked")
    denied = run_cli("push", str(make_adapter()), "--name", "team-a/x", registry=registry_url)
    assert_one_line_error(denied, errors.EXIT_AUTH, "requires a token for writes")
    assert run_cli("list", registry=registry_url).stdout.strip() == "no adapters"
