"""Handlers of `kvrun-adapters` subcommands: call the store, print a human line or JSON, return 0.

Results go to stdout (JSON with --json); progress bars and notes go to stderr so scripts can pipe stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec

from adapters_registry.errors import NotFoundError, UsageError
from adapters_registry.payload import Progress
from adapters_registry.records import VersionRecord
from adapters_registry.store import AdapterStore
from adapters_registry.tokens import MIN_SECRET_LENGTH
from adapters_registry.validate import Limits

PROGRESS_MIN_BYTES = 4 * 1024 * 1024  # smaller transfers finish before a bar would be readable


def _emit(args: argparse.Namespace, human: str, data: object) -> int:
    print(msgspec.json.encode(data).decode() if args.json else human)
    return 0


def _record_with_tags(store: AdapterStore, record: VersionRecord) -> dict[str, object]:
    return {**msgspec.to_builtins(record), "tags": store.tags_of(record)}


@contextlib.contextmanager
def _progress(total: int, label: str) -> Iterator[Progress | None]:
    """A tqdm bar on stderr for large transfers to a terminal; nothing otherwise (logs, CI, pipes)."""
    if total < PROGRESS_MIN_BYTES or not sys.stderr.isatty():
        yield None
        return
    from tqdm import tqdm

    with tqdm(total=total, desc=label, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr) as bar:
        yield bar.update


def _megabytes(size: int) -> str:
    return f"{size / 1e6:.1f} MB"


def push(store: AdapterStore, args: argparse.Namespace) -> int:
    if args.max_rank is not None:
        store.limits = Limits(args.max_rank, store.limits.max_weights_bytes, store.limits.max_config_bytes)
    if args.lease_s is not None:
        store.upload_lease_s = args.lease_s
    base_config = Path(args.base_config).read_bytes() if args.base_config else None
    directory = Path(args.directory)
    total = sum(p.stat().st_size for p in directory.glob("adapter_*") if p.is_file()) if directory.is_dir() else 0
    started = time.perf_counter()
    with _progress(total, "push") as progress:
        record = store.push(
            directory, args.name, tags=args.tag, description=args.description,
            base_model=args.base_model, base_config=base_config, progress=progress,
        )  # fmt: skip
    elapsed = time.perf_counter() - started
    tags = store.tags_of(record)
    human = (
        f"pushed {record.ref} ({_megabytes(record.size)} in {elapsed:.1f} s) sha256 {record.sha256[:16]} "
        f"tags {', '.join(tags)}"
    )
    return _emit(args, human, _record_with_tags(store, record))


def list_adapters(store: AdapterStore, args: argparse.Namespace) -> int:
    summaries = store.list_adapters(args.namespace)
    rows = [("NAME", "LATEST", "VERSIONS", "TAGS", "RANK", "DTYPE", "SIZE", "BASE MODEL")]
    for summary in summaries:
        latest = summary.latest
        tags = ",".join(f"{tag}={version}" for tag, version in summary.tags.items() if tag != "latest")
        rows.append((
            summary.name, str(latest.version), str(len(summary.versions)), tags or "-", str(latest.rank),
            latest.dtype, _megabytes(latest.size), latest.base_model or "-",
        ))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    table = "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows
    )
    return _emit(args, table if summaries else "no adapters", summaries)


def show(store: AdapterStore, args: argparse.Namespace) -> int:
    record = store.resolve(args.ref)
    lines = [
        f"{record.ref}  sha256 {record.sha256}",
        f"  tags:           {', '.join(store.tags_of(record)) or '-'}",
        f"  base model:     {record.base_model or '-'}",
        f"  rank / alpha:   {record.rank} / {record.alpha:g}{'  (rsLoRA)' if record.use_rslora else ''}",
        f"  target modules: {', '.join(record.target_modules)}",
        f"  dtype:          {record.dtype}",
        f"  created:        {record.created_at.isoformat(timespec='seconds')} by {record.pushed_by}",
        f"  description:    {record.description or '-'}",
        *(f"  file:           {e.name}  {e.size} bytes  sha256 {e.sha256}" for e in record.files),
    ]
    return _emit(args, "\n".join(lines), _record_with_tags(store, record))


def pull(store: AdapterStore, args: argparse.Namespace) -> int:
    record = store.resolve(args.ref)
    with _progress(record.size, "pull") as progress:
        store.pull(record, args.directory, progress=progress)
    human = f"pulled {record.ref} into {args.directory} ({len(record.files)} files, sha256 verified)"
    return _emit(args, human, _record_with_tags(store, record))


def tag(store: AdapterStore, args: argparse.Namespace) -> int:
    record = store.tag(args.ref, args.tag)
    return _emit(args, f"{record.name}:{args.tag} -> {record.version}", _record_with_tags(store, record))


def untag(store: AdapterStore, args: argparse.Namespace) -> int:
    store.untag(args.name, args.tag)
    return _emit(args, f"removed tag {args.tag} from {args.name}", {"name": args.name, "untagged": args.tag})


def delete(store: AdapterStore, args: argparse.Namespace) -> int:
    records = store.delete(args.ref)
    versions = ", ".join(str(record.version) for record in records)
    return _emit(args, f"deleted {records[0].name} version(s) {versions}", records)


def collect_garbage(store: AdapterStore, args: argparse.Namespace) -> int:
    deleted = store.collect_garbage(args.lease_s)
    return _emit(args, f"deleted {deleted} unreferenced chunk(s)", {"deleted_chunks": deleted})


def events(store: AdapterStore, args: argparse.Namespace) -> int:
    stream = store.watch(args.after) if args.follow else store.events(args.after)
    for event in stream:
        print(msgspec.json.encode(event).decode(), flush=True)
    return 0


def _print_secret(args: argparse.Namespace, secret: str, info: object) -> int:
    if args.json:
        print(json.dumps({"token": secret, **msgspec.to_builtins(info)}))
    else:
        print(secret)
        print("kvrun-adapters: store this token now; the registry keeps only its hash", file=sys.stderr)
    return 0


def token_init(store: AdapterStore, args: argparse.Namespace) -> int:
    adopted = os.environ.get("KVRUN_REGISTRY_ADMIN_TOKEN") or None
    if adopted is not None and len(adopted) < MIN_SECRET_LENGTH:
        raise UsageError(f"KVRUN_REGISTRY_ADMIN_TOKEN must be at least {MIN_SECRET_LENGTH} characters")
    secret = store.init_admin_token(adopted, args.description)
    if adopted:
        return _emit(args, "adopted KVRUN_REGISTRY_ADMIN_TOKEN as the first admin token", {"adopted": True})
    return _print_secret(args, secret, {"scopes": ["*"], "admin": True})


def token_create(store: AdapterStore, args: argparse.Namespace) -> int:
    secret, info = store.create_token(args.scope, admin=args.admin, description=args.description)
    return _print_secret(args, secret, info)


def token_revoke(store: AdapterStore, args: argparse.Namespace) -> int:
    info = store.revoke_token(args.token_id)
    return _emit(args, f"revoked token {info.id} ({', '.join(info.scopes)})", info)


def token_list(store: AdapterStore, args: argparse.Namespace) -> int:
    infos = store.list_tokens()
    lines = [
        f"{t.id}  {'admin ' if t.admin else ''}{','.join(t.scopes)}  {t.created_at:%Y-%m-%d}  {t.description}".rstrip()
        for t in infos
    ]
    return _emit(args, "\n".join(lines) or "no tokens (the registry is open for writes)", infos)


def base_set(store: AdapterStore, args: argparse.Namespace) -> int:
    store.set_base_config(args.name, Path(args.config).read_bytes())
    return _emit(args, f"stored base model config {args.name}", {"base_model": args.name})


def base_show(store: AdapterStore, args: argparse.Namespace) -> int:
    config = store.base_config(args.name)
    if config is None:
        raise NotFoundError(f"no base model config named {args.name!r}")
    print(json.dumps(config, indent=None if args.json else 2))
    return 0


def base_list(store: AdapterStore, args: argparse.Namespace) -> int:
    names = store.list_base_models()
    return _emit(args, "\n".join(names) or "no base model configs", names)
