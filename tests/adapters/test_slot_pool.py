import pytest

from kvrun.adapters.ref import AdapterRef
from kvrun.adapters.slot_pool import SlotPool


def ref(name: str) -> AdapterRef:
    return AdapterRef(name, 1, name * 4, 8, 16.0, ("q_proj",))


def test_acquire_reuses_resident_slot_and_counts_pins():
    pool = SlotPool(2)
    slot, evicted, needs_load = pool.acquire(ref("a"))
    assert evicted is None and needs_load
    again = pool.acquire(ref("a"))
    assert again == (slot, None, False)
    assert pool.pins(ref("a")) == 2


def test_pinned_slots_are_never_evicted():
    pool = SlotPool(1)
    pool.acquire(ref("a"))
    assert pool.acquire(ref("b")) is None
    pool.release(ref("a"))
    slot, evicted, needs_load = pool.acquire(ref("b"))
    assert evicted == ref("a") and needs_load and pool.slot_of(ref("a")) is None


def test_eviction_is_least_recently_used_among_unpinned():
    pool = SlotPool(2)
    for name in "ab":
        pool.acquire(ref(name))
    pool.release(ref("a"))
    pool.release(ref("b"))
    pool.acquire(ref("a"))  # a is used again: b is now the least recent
    pool.release(ref("a"))
    _, evicted, _ = pool.acquire(ref("c"))
    assert evicted == ref("b")


def test_release_without_acquire_and_discard_in_use():
    pool = SlotPool(1)
    with pytest.raises(RuntimeError):
        pool.release(ref("a"))
    pool.acquire(ref("a"))
    with pytest.raises(RuntimeError):
        pool.discard(ref("a"))
    pool.release(ref("a"))
    assert pool.discard(ref("a")) == 0
    assert pool.slot_of(ref("a")) is None
