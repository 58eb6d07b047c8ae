"""Which adapter occupies which model slot: pins while requests use it, LRU eviction among the unpinned."""

from __future__ import annotations

from collections import OrderedDict

from kvrun.adapters.ref import AdapterRef


class SlotPool:
    def __init__(self, num_slots: int) -> None:
        self.num_slots = num_slots
        self._free = list(range(num_slots - 1, -1, -1))
        self._slot_of: dict[AdapterRef, int] = {}
        self._pins: dict[AdapterRef, int] = {}
        self._unpinned: OrderedDict[AdapterRef, None] = OrderedDict()  # least recently used first

    def slot_of(self, ref: AdapterRef) -> int | None:
        return self._slot_of.get(ref)

    def pins(self, ref: AdapterRef) -> int:
        return self._pins.get(ref, 0)

    def resident(self) -> dict[AdapterRef, int]:
        return dict(self._slot_of)

    def acquire(self, ref: AdapterRef) -> tuple[int, AdapterRef | None, bool] | None:
        """Pin ref to a slot. Returns (slot, evicted ref or None, needs_load), or None when every slot is pinned."""
        slot = self._slot_of.get(ref)
        evicted = None
        needs_load = slot is None
        if slot is None:
            if self._free:
                slot = self._free.pop()
            elif self._unpinned:
                evicted, _ = self._unpinned.popitem(last=False)
                slot = self._slot_of.pop(evicted)
            else:
                return None
            self._slot_of[ref] = slot
        self._unpinned.pop(ref, None)
        self._pins[ref] = self._pins.get(ref, 0) + 1
        return slot, evicted, needs_load

    def release(self, ref: AdapterRef) -> None:
        count = self._pins.get(ref, 0)
        if count <= 0:
            raise RuntimeError(f"release of {ref} without a matching acquire")
        if count == 1:
            del self._pins[ref]
            self._unpinned[ref] = None
        else:
            self._pins[ref] = count - 1

    def discard(self, ref: AdapterRef) -> int | None:
        """Drop an unpinned adapter from its slot (after an unload); returns the freed slot."""
        if self._pins.get(ref):
            raise RuntimeError(f"{ref} is in use by running requests")
        slot = self._slot_of.pop(ref, None)
        if slot is not None:
            self._unpinned.pop(ref, None)
            self._free.append(slot)
        return slot
