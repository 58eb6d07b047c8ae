"""Parsed adapters in host memory: an LRU bounded by count; entries in use stay."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

from kvrun.adapters.peft_format import AdapterError, ParsedAdapter
from kvrun.adapters.ref import AdapterRef


class HostCache:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[AdapterRef, ParsedAdapter] = OrderedDict()

    def __contains__(self, ref: AdapterRef) -> bool:
        return ref in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, ref: AdapterRef, load: Callable[[], ParsedAdapter], keep: Callable[[AdapterRef], bool]) -> ParsedAdapter:
        """The parsed adapter for ref, loading it on a miss; evicts LRU entries for which keep() is False."""
        entry = self._entries.get(ref)
        if entry is None:
            entry = load()
            if entry.ref != ref:  # re-read from files that changed since (a path-loaded adapter's directory)
                raise AdapterError(
                    f"adapter {ref.name!r}: its files changed since it was loaded (weights sha256 "
                    f"{entry.ref.sha256[:12]}, loaded as {ref.sha256[:12]}); load it again to serve them"
                )
            self.put(entry, keep)
        self._entries.move_to_end(ref)
        return entry

    def put(self, entry: ParsedAdapter, keep: Callable[[AdapterRef], bool]) -> None:
        self._entries[entry.ref] = entry
        self._entries.move_to_end(entry.ref)
        for ref in list(self._entries):
            if len(self._entries) <= self.capacity:
                break
            if ref != entry.ref and not keep(ref):
                del self._entries[ref]

    def drop(self, ref: AdapterRef) -> None:
        self._entries.pop(ref, None)
