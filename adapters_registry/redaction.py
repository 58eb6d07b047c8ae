"""Masking the secrets a registry URL can carry, before the URL is printed, logged or put in an error.

`redact_url` masks the password of `user:password@` (and a lone `token@`, which some services use as the
credential), and the value of every query or fragment parameter whose name looks like a credential: its
name, lower-cased and percent-decoded, contains `pas` (pass, passwd, password, a misspelt pasword), `pwd`,
`secret`, `token`, `key`, `auth`, `credential`, `signature` or `session`, or is `sig`. Everything else is
kept byte for byte, so the redacted URL still tells an operator which host, port, database and key prefix
were meant.

It works on the string rather than through `urllib.parse`, because the URLs that most need masking are the
malformed ones: a password with an unencoded `/`, `?`, `#` or `@` makes urllib split it into host, port and
path, and its error messages then quote a piece of the password ("Port could not be cast ... 'pa'").
"""

from __future__ import annotations

import re
from urllib.parse import quote, unquote, unquote_plus

MASK = "***"

_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*")
# host, [IPv6] host or nothing, with an optional numeric port: an authority without credentials
_PLAIN_AUTHORITY = re.compile(r"(\[[^\]]*\]|[^:@\[\]]*)(:\d*)?")
_SECRET_NAME = re.compile(r"pas|pwd|secret|token|key|auth|credential|signature|session|^sig$")
_PARAM_SEPARATORS = re.compile(r"([&;])")


def redact_url(url: str) -> str:
    """`url` with its credentials replaced by `***`; e.g. redis://h:6379/0?password=***&prefix=x."""
    head, rest = "", url
    scheme_end = url.find("://")
    if scheme_end > 0 and _SCHEME.fullmatch(url[:scheme_end]):
        head, rest = url[: scheme_end + 3], url[scheme_end + 3 :]
        userinfo_end = _userinfo_end(rest)
        if userinfo_end is not None:
            head += _mask_userinfo(rest[:userinfo_end]) + "@"
            rest = rest[userinfo_end + 1 :]
    rest, hash_sign, fragment = rest.partition("#")
    path, question_mark, query = rest.partition("?")
    if "=" in fragment:  # e.g. an OAuth-style #access_token=...
        fragment = _mask_parameters(fragment)
    return head + path + question_mark + _mask_parameters(query) + hash_sign + fragment


def _userinfo_end(rest: str) -> int | None:
    """Index of the `@` that ends the credentials in `rest` (the URL after `scheme://`), or None."""
    authority_end = next((i for i, char in enumerate(rest) if char in "/?#"), len(rest))
    authority = rest[:authority_end]
    at = authority.rfind("@")
    if at != -1:
        return at  # the last '@': a password may hold an unencoded '@' of its own
    if _PLAIN_AUTHORITY.fullmatch(authority) is None and "@" in rest[authority_end:]:
        # 'redis://:pa/ss@host': an unencoded '/', '?' or '#' in the password cut the authority short, leaving
        # a "port" that is no number. Mask through the last '@', at worst hiding some of the host and path.
        return rest.rfind("@")
    return None


def _mask_userinfo(userinfo: str) -> str:
    user, colon, password = userinfo.partition(":")
    if not colon:
        return MASK  # a lone `token@`: the only part there is may be the credential
    return f"{user}:{MASK}" if password else userinfo


def _mask_parameters(query: str) -> str:
    pieces = _PARAM_SEPARATORS.split(query)
    for index, piece in enumerate(pieces):
        name, equals, value = piece.partition("=")
        if not equals or not value:
            continue
        if _SECRET_NAME.search(unquote_plus(name).strip().lower()):
            pieces[index] = f"{name}={MASK}"
        elif "://" in value:
            pieces[index] = f"{name}={redact_url(value)}"
        elif "://" in unquote(value) and redact_url(unquote(value)) != unquote(value):
            pieces[index] = f"{name}={quote(redact_url(unquote(value)), safe='')}"
    return "".join(pieces)
