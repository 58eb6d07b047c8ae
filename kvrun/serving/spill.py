"""A local copy of every adapter version fetched from the registry, by content digest, for the life of the server.

The engine's host cache may drop a parsed adapter that a name still points at; re-parsing it then must not need
the registry (which may be down, and whose I/O must never run on the engine thread), so the fetched files are kept
on local disk. Copies of versions the engine no longer names are pruned once they are a minute old.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

PRUNE_AGE_S = 60.0  # a fresh copy is kept even if unnamed: its version may be on its way to the engine


class SpillDirectory:
    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="kvrun-adapters-"))

    def put(self, sha256: str, files: dict[str, bytes]) -> None:
        target = self.root / sha256
        if target.is_dir():
            return
        staging = Path(tempfile.mkdtemp(dir=self.root, prefix=".incoming-"))
        for name, data in files.items():
            (staging / name).write_bytes(data)
        try:
            staging.rename(target)  # complete or absent, never half-written
        except OSError:  # another fetch of the same content won the race
            shutil.rmtree(staging, ignore_errors=True)

    def get(self, sha256: str, names: Iterable[str]) -> dict[str, bytes] | None:
        try:
            return {name: (self.root / sha256 / name).read_bytes() for name in names}
        except OSError:
            return None

    def prune(self, keep: set[str]) -> None:
        """Remove copies whose digest is not in keep and that are older than PRUNE_AGE_S."""
        cutoff = time.time() - PRUNE_AGE_S
        for entry in self.root.iterdir():
            if entry.name in keep or entry.name.startswith("."):
                continue
            try:
                if entry.stat().st_mtime < cutoff:
                    shutil.rmtree(entry, ignore_errors=True)
            except OSError:
                continue

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
