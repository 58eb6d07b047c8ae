"""Registry URLs are printed, logged and put in errors only with their credentials masked."""

from __future__ import annotations

import socket
from urllib.parse import quote

import pytest

from adapters_registry import UnreachableError, UsageError, open_store, redact_url
from tests.adapters_registry.test_cli import assert_one_line_error, run_cli

SECRET = "Zq7-s3cret"

CASES = [
    # the forms the registry documents
    ("redis://h:6379/0?password=s3cret&prefix=x", "redis://h:6379/0?password=***&prefix=x"),
    ("redis://user:s3cret@h:6379/0", "redis://user:***@h:6379/0"),
    ("redis://:s3cret@h:6379/0?prefix=team-x:", "redis://:***@h:6379/0?prefix=team-x:"),
    ("rediss://default:s3cret@cache.example.com:6380/2?ssl_cert_reqs=required",
     "rediss://default:***@cache.example.com:6380/2?ssl_cert_reqs=required"),
    ("redis://[::1]:6379/0?password=s3cret", "redis://[::1]:6379/0?password=***"),
    ("unix:///var/run/redis.sock?db=1&password=s3cret", "unix:///var/run/redis.sock?db=1&password=***"),
    ("unix://:s3cret@/var/run/redis.sock?db=1", "unix://:***@/var/run/redis.sock?db=1"),
    ("redis://tok3n@h:6379", "redis://***@h:6379"),  # a lone userinfo may be the credential itself
    # parameter names: case-insensitive, percent-decoded, every credential-like name, separators & and ;
    ("redis://h/0?PassWord=s3cret", "redis://h/0?PassWord=***"),
    ("redis://h/0?pass%77ord=s3cret&db=1", "redis://h/0?pass%77ord=***&db=1"),
    ("redis://h/0?pass=a&passwd=b&pwd=c&token=d&secret=e&key=f&auth=g&access_token=h&api_key=i&prefix=p:",
     "redis://h/0?pass=***&passwd=***&pwd=***&token=***&secret=***&key=***&auth=***&access_token=***"
     "&api_key=***&prefix=p:"),
    ("https://h/x?X-Api-Key=a&client_secret=b&sig=c&X-Amz-Credential=d&sessionid=e&pasword=f",
     "https://h/x?X-Api-Key=***&client_secret=***&sig=***&X-Amz-Credential=***&sessionid=***&pasword=***"),
    ("redis://h/0?db=1;password=s3cret", "redis://h/0?db=1;password=***"),
    ("https://h/callback#access_token=s3cret&state=1", "https://h/callback#access_token=***&state=1"),
    # percent-encoded and unencoded special characters in passwords
    ("redis://u:p%40ss%2Fw0rd@h:6379/0", "redis://u:***@h:6379/0"),
    ("redis://u:p@ss@h:6379/0", "redis://u:***@h:6379/0"),
    ("redis://:pa/ss@h:6379/0", "redis://:***@h:6379/0"),
    ("redis://:pa?s#s@h:6379/0", "redis://:***@h:6379/0"),
    ("redis://h:6379/0?password=p%26ss%3Dx&prefix=x", "redis://h:6379/0?password=***&prefix=x"),
    # URLs inside parameters, plain and percent-encoded
    ("redis://h/0?sentinel=redis://:s3cret@s:26379", "redis://h/0?sentinel=redis://:***@s:26379"),
    ("redis://h/0?upstream=redis%3A%2F%2F%3As3cret%40s", f"redis://h/0?upstream={quote('redis://:***@s', safe='')}"),
    # file URLs and paths
    ("file://user:s3cret@host/srv/registry", "file://user:***@host/srv/registry"),
    ("/srv/registry?token=s3cret", "/srv/registry?token=***"),
]  # fmt: skip

UNCHANGED = [
    "redis://127.0.0.1:6379/0",
    "redis://127.0.0.1:6379/0?prefix=kvrun-test:",
    "redis://[::1]:6379/0",
    "redis://h:6379/0?client_name=me@host",
    "redis://:6379/0",
    "redis://h/0?password=",  # nothing to hide
    "unix:///var/run/redis.sock?db=1",
    "file:///srv/registry",
    "file://~/.kvrun/registry",
    "file:///srv/with@sign/registry",
    "/srv/registry",
    "relative/registry",
    "",
]


@pytest.mark.parametrize(("url", "expected"), CASES)
def test_masks_credentials(url: str, expected: str) -> None:
    assert redact_url(url) == expected
    assert redact_url(expected) == expected  # idempotent: redacting twice changes nothing more


@pytest.mark.parametrize("url", UNCHANGED)
def test_leaves_urls_without_credentials_alone(url: str) -> None:
    assert redact_url(url) == url


@pytest.mark.parametrize(
    "template",
    [
        "redis://user:{s}@h:6379/0", "redis://:{s}@h/0", "redis://h/0?password={s}", "redis://h/0?token={s}&db=2",
        "rediss://h/0?auth={s}", "unix://:{s}@/tmp/r.sock", "unix:///tmp/r.sock?passwd={s}", "redis://{s}@h",
        "redis://:{s}/x@h:1/0", "redis://:{s}?y@h:1", "redis://:{s}#z@h:1", "redis://u:{s}@x@h:1/0?prefix=p",
    ],
)  # fmt: skip
def test_secret_never_survives(template: str) -> None:
    assert SECRET not in redact_url(template.format(s=SECRET))
    assert SECRET not in redact_url(template.format(s=quote(SECRET, safe="")))


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_store_url_repr_and_errors_are_redacted() -> None:
    url = f"redis://admin:{SECRET}@127.0.0.1:{_closed_port()}/0?password={SECRET}&prefix=team-x:"
    store = open_store(url)
    shown = f"redis://admin:***@127.0.0.1:{url.split(':')[3].split('/')[0]}/0?password=***&prefix=team-x:"
    assert store.url == shown
    assert repr(store) == f"AdapterStore({shown!r})"
    assert SECRET not in repr(store.storage)
    with pytest.raises(UnreachableError) as caught:
        store.list_adapters()
    assert SECRET not in str(caught.value) and shown in str(caught.value)


@pytest.mark.parametrize(
    "url",
    [
        f"redis://:{SECRET[:3]}/{SECRET[3:]}@127.0.0.1:6379/0",  # unencoded '/': urllib reads 'Zq7' as the port
        f"redis://127.0.0.1:6379/0?pasword={SECRET}",  # misspelt option: redis-py refuses it by name
        f"http://user:{SECRET}@h/registry",  # unknown scheme
        f"file://user:{SECRET}@elsewhere/srv/registry",  # file URLs are local
        f"redis://[::1:{SECRET}@h/0",  # unbalanced IPv6 bracket
    ],
)
def test_usage_errors_quote_no_secret(url: str) -> None:
    with pytest.raises(UsageError) as caught:
        open_store(url)
    assert SECRET[:3] not in str(caught.value)
    assert "***" in str(caught.value)


def test_cli_errors_quote_no_secret() -> None:
    unreachable = run_cli("list", registry=f"redis://:{SECRET}@127.0.0.1:{_closed_port()}/0?password={SECRET}")
    assert_one_line_error(unreachable, 7, "is unreachable")
    malformed = run_cli("list", registry=f"redis://:{SECRET[:3]}/{SECRET[3:]}@127.0.0.1:6379/0")
    assert_one_line_error(malformed, 2, "is malformed")
    for result in (unreachable, malformed):
        assert SECRET[:3] not in result.stderr + result.stdout
