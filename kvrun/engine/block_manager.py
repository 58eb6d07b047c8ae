"""The paged KV pool's bookkeeping: refcounted blocks, and a prefix cache of full blocks keyed by their content.

A full block's key chains its parent block's key, its token ids and, at the root, the adapter's content identity
(or "base model"): equal keys mean equal K/V, so requests that share a prefix under the same adapter share those
blocks, and the same tokens under another adapter (whose K/V differ) never match. An activated LoRA's blocks before
its invocation hold base-model K/V and take base-model keys (the scheduler builds the keys). A cached block whose
refcount drops to 0 keeps its key and K/V in an LRU queue of evictable blocks: a later request that hits its key
takes it back, and the pool evicts (forgets the key of) the least recently freed one when it runs out of empty
blocks.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque
from collections.abc import Sequence

KEY_BYTES = 16  # 128-bit digests: a collision would hand a request another prefix's K/V


def root_key(identity: bytes) -> bytes:
    """The parent key of a sequence's first block: what the K/V depend on besides the tokens (the adapter)."""
    return hashlib.blake2b(b"kvrun-prefix\0" + identity, digest_size=KEY_BYTES).digest()


def block_key(parent: bytes, token_ids: Sequence[int]) -> bytes:
    return hashlib.blake2b(parent + array("q", token_ids).tobytes(), digest_size=KEY_BYTES).digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_caching = enable_caching
        self._empty: deque[int] = deque(range(num_blocks))  # free blocks that hold nothing worth keeping
        self._evictable: OrderedDict[int, None] = OrderedDict()  # free cached blocks, least recently freed first
        self._refcounts = [0] * num_blocks
        self._key_of: list[bytes | None] = [None] * num_blocks
        self._cached: dict[bytes, int] = {}

    @property
    def num_free(self) -> int:
        """Blocks a request may take: empty ones and cached ones no request uses."""
        return len(self._empty) + len(self._evictable)

    @property
    def num_cached(self) -> int:
        """Blocks whose K/V a request with the same prefix can reuse (in use or evictable)."""
        return len(self._cached)

    def blocks_for(self, num_tokens: int) -> int:
        return (num_tokens + self.block_size - 1) // self.block_size

    def can_grow(self, block_table: list[int], num_tokens: int) -> bool:
        return self.blocks_for(num_tokens) - len(block_table) <= self.num_free

    def grow(self, block_table: list[int], num_tokens: int) -> None:
        """Extend block_table in place so it covers num_tokens, evicting cached blocks when no empty one is left."""
        needed = self.blocks_for(num_tokens) - len(block_table)
        if needed > self.num_free:
            raise MemoryError(f"need {needed} KV blocks, {self.num_free} free")
        for _ in range(needed):
            if self._empty:
                block = self._empty.popleft()
            else:
                block, _ = self._evictable.popitem(last=False)
                del self._cached[self._key_of[block]]
                self._key_of[block] = None
            self._refcounts[block] = 1
            block_table.append(block)

    def free(self, block_table: list[int]) -> None:
        # Last blocks first, so a sequence's tail (the least shared part) is evicted before its head.
        for block in reversed(block_table):
            if self._refcounts[block] <= 0:
                raise RuntimeError(f"block {block} freed twice")
            self._refcounts[block] -= 1
            if self._refcounts[block] == 0:
                if self._key_of[block] is None:
                    self._empty.append(block)
                else:
                    self._evictable[block] = None
        block_table.clear()

    def refcount(self, block: int) -> int:
        return self._refcounts[block]

    # -- the prefix cache ----------------------------------------------------------------------------------------
    def match(self, keys: Sequence[bytes]) -> list[int]:
        """The cached blocks of the longest prefix of keys (nothing is taken yet)."""
        if not self.enable_caching:
            return []
        blocks = []
        for key in keys:
            block = self._cached.get(key)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def share(self, block_table: list[int], blocks: Sequence[int]) -> None:
        """Append cached blocks (from match) to an empty block_table, taking a reference on each."""
        if block_table:
            raise ValueError("shared blocks start a block table")
        for block in blocks:
            if self._refcounts[block] == 0:
                del self._evictable[block]
            self._refcounts[block] += 1
            block_table.append(block)

    def cache(self, block: int, key: bytes) -> bool:
        """Offer a block whose K/V are (being) written for key; False when caching is off or key has a block."""
        if not self.enable_caching or key in self._cached or self._key_of[block] is not None:
            return False
        self._cached[key] = block
        self._key_of[block] = key
        return True

    def uncache(self, blocks: Sequence[int]) -> None:
        """Forget blocks' keys (their K/V were never completed), so no request reuses them."""
        for block in blocks:
            key = self._key_of[block]
            if key is None:
                continue
            del self._cached[key]
            self._key_of[block] = None
            if block in self._evictable:
                del self._evictable[block]
                self._empty.append(block)
