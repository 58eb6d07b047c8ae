"""`kvrun-adapters`: push, list, show, pull, tag, untag and delete adapters; manage tokens and base configs.

Errors are one line on stderr (`kvrun-adapters: error: ...`) and a documented exit code, never a
traceback for anything a user can cause; `-v` adds logging (and the traceback of unexpected errors).
"""

from __future__ import annotations

import argparse
import functools
import logging
import math
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import NoReturn

from adapters_registry import cli_commands
from adapters_registry.errors import EXIT_CODES_HELP, EXIT_ERROR, EXIT_USAGE, RegistryError
from adapters_registry.urls import DEFAULT_REGISTRY, open_store

PROGRAM = "kvrun-adapters"

ENVIRONMENT_HELP = f"""environment:
  KVRUN_REGISTRY              registry URL (default {DEFAULT_REGISTRY})
  KVRUN_REGISTRY_TOKEN        token for writes (push, tag, untag, delete) and, if admin, token management
  KVRUN_REGISTRY_ADMIN_TOKEN  secret that `token init` adopts as the first admin token (else it makes one)

refs: ns/name (latest), ns/name@3 (version 3), ns/name:prod (tag prod)
"""


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors are one line like every other error."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{PROGRAM}: error: {message} (see {self.prog} --help)\n")


def _add_global_options(parser: argparse.ArgumentParser, *, in_subcommand: bool) -> None:
    # Accepted before or after the subcommand; SUPPRESS keeps a subcommand from resetting the main values.
    def default(value: object) -> object:
        return argparse.SUPPRESS if in_subcommand else value

    group = parser.add_argument_group("global options")
    group.add_argument(
        "--registry", metavar="URL", default=default(None), help="redis://host:port/db[?prefix=p:] or file:///path"
    )
    group.add_argument("--token", default=default(None), help="write token (default: env KVRUN_REGISTRY_TOKEN)")
    group.add_argument("--json", action="store_true", default=default(False), help="machine-readable output on stdout")
    group.add_argument("-v", "--verbose", action="count", default=default(0), help="log progress (-vv: debug)")


def _seconds(text: str, *, allow_zero: bool) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (0 <= value if allow_zero else 0 < value) or math.isinf(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a {'non-negative' if allow_zero else 'positive'} "
                                         "number of seconds")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROGRAM,
        description="Versioned, validated PEFT LoRA adapters in Redis or a local directory.",
        epilog=f"{EXIT_CODES_HELP}\n\n{ENVIRONMENT_HELP}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_global_options(parser, in_subcommand=False)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        _add_global_options(sub, in_subcommand=True)
        return sub

    push = command("push", "validate a PEFT adapter directory and publish it as the next version")
    push.add_argument("directory", metavar="DIR")
    push.add_argument("--name", required=True, help="namespace/name")
    push.add_argument("--tag", action="append", default=[], help="also point this tag at the new version (repeatable)")
    push.add_argument("--description", default="")
    push.add_argument("--base-model", help="base model name (default: base_model_name_or_path of the config)")
    push.add_argument("--base-config", metavar="FILE", help="check shapes against this base config.json")
    push.add_argument("--max-rank", type=int, help="highest rank accepted (default 256)")
    push.add_argument(
        "--lease-s", type=functools.partial(_seconds, allow_zero=False),
        help="if this push is killed, its partial upload is collected after this many silent seconds (default 900)",
    )  # fmt: skip
    push.set_defaults(handler=cli_commands.push)

    listing = command("list", "list adapters, optionally of one namespace")
    listing.add_argument("namespace", nargs="?")
    listing.set_defaults(handler=cli_commands.list_adapters)

    show = command("show", "show one version's metadata")
    show.add_argument("ref", metavar="REF")
    show.set_defaults(handler=cli_commands.show)

    pull = command("pull", "download a version into DIR, verifying every sha256")
    pull.add_argument("ref", metavar="REF")
    pull.add_argument("directory", metavar="DIR")
    pull.set_defaults(handler=cli_commands.pull)

    tag = command("tag", "point TAG at the version REF names")
    tag.add_argument("ref", metavar="REF")
    tag.add_argument("tag", metavar="TAG")
    tag.set_defaults(handler=cli_commands.tag)

    untag = command("untag", "remove TAG from an adapter")
    untag.add_argument("name", metavar="NAME")
    untag.add_argument("tag", metavar="TAG")
    untag.set_defaults(handler=cli_commands.untag)

    delete = command("delete", "delete a version (ns/name@3, ns/name:tag) or, given ns/name, the whole adapter")
    delete.add_argument("ref", metavar="REF")
    delete.set_defaults(handler=cli_commands.delete)

    _add_token_commands(command("token", "manage write tokens (admin)"))
    _add_base_commands(command("base", "register base model configs for shape checks"))

    gc = command("gc", "delete chunks of deleted versions and of pushes that died midway")
    gc.add_argument(
        "--lease-s", type=functools.partial(_seconds, allow_zero=True),
        help="also count pushes silent this long as dead (default: each push's own lease; 0: every push)",
    )  # fmt: skip
    gc.set_defaults(handler=cli_commands.collect_garbage)

    events = command("events", "print change events as JSON lines")
    events.add_argument("--after", metavar="ID", help="only events after this id (default: all kept)")
    events.add_argument("--follow", action="store_true", help="keep waiting for new events")
    events.set_defaults(handler=cli_commands.events)
    return parser


def _actions(parser: argparse.ArgumentParser) -> Callable[[str, str], argparse.ArgumentParser]:
    """Second-level subcommands (`token create`, `base set`), each accepting the global options too."""
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True, parser_class=_Parser)

    def action(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = actions.add_parser(name, help=help_text, description=help_text)
        _add_global_options(sub, in_subcommand=True)
        return sub

    return action


def _add_token_commands(parser: argparse.ArgumentParser) -> None:
    action = _actions(parser)
    init = action("init", "create the first admin token (only while the registry has none); prints it once")
    init.add_argument("--description", default="admin")
    init.set_defaults(handler=cli_commands.token_init)
    create = action("create", "create a token; prints the secret once")
    create.add_argument("--scope", action="append", default=[], help="'team-a/*', 'team-a/name' or '*' (repeatable)")
    create.add_argument("--admin", action="store_true", help="may also manage tokens")
    create.add_argument("--description", default="")
    create.set_defaults(handler=cli_commands.token_create)
    revoke = action("revoke", "revoke a token by id")
    revoke.add_argument("token_id", metavar="ID")
    revoke.set_defaults(handler=cli_commands.token_revoke)
    action("list", "list tokens (ids and scopes, never secrets)").set_defaults(handler=cli_commands.token_list)


def _add_base_commands(parser: argparse.ArgumentParser) -> None:
    action = _actions(parser)
    set_base = action("set", "store NAME's config.json")
    set_base.add_argument("name", metavar="NAME")
    set_base.add_argument("config", metavar="CONFIG_JSON")
    set_base.set_defaults(handler=cli_commands.base_set)
    show = action("show", "print NAME's stored config")
    show.add_argument("name", metavar="NAME")
    show.set_defaults(handler=cli_commands.base_show)
    action("list", "list base models with stored configs").set_defaults(handler=cli_commands.base_list)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = {0: logging.WARNING, 1: logging.INFO}.get(args.verbose, logging.DEBUG)
    logging.basicConfig(level=level, format=f"{PROGRAM}: %(message)s")
    try:
        with open_store(args.registry, token=args.token) as store:
            return args.handler(store, args)
    except RegistryError as error:
        return _fail(str(error), error.exit_code)
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    except OSError as error:  # e.g. an unwritable pull directory
        return _fail(f"{error.strerror or error}: {error.filename or ''}".rstrip(": "), EXIT_ERROR)
    except Exception as error:  # a bug, not a user error: still one line unless -v
        if args.verbose:
            traceback.print_exc()
        return _fail(f"unexpected {type(error).__name__}: {error} (run with -v for a traceback)", EXIT_ERROR)


def _fail(message: str, code: int) -> int:
    print(f"{PROGRAM}: error: {' '.join(message.split())}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
