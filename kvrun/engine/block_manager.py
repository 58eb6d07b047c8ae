"""The paged KV pool's bookkeeping: a free list of blocks and a refcount per block."""

from __future__ import annotations

from collections import deque


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))
        self._refcounts = [0] * num_blocks

    @property
    def num_free(self) -> int:
        return len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        return (num_tokens + self.block_size - 1) // self.block_size

    def can_grow(self, block_table: list[int], num_tokens: int) -> bool:
        return self.blocks_for(num_tokens) - len(block_table) <= len(self._free)

    def grow(self, block_table: list[int], num_tokens: int) -> None:
        """Extend block_table in place so it covers num_tokens."""
        needed = self.blocks_for(num_tokens) - len(block_table)
        if needed > len(self._free):
            raise MemoryError(f"need {needed} KV blocks, {len(self._free)} free")
        for _ in range(needed):
            block = self._free.popleft()
            self._refcounts[block] = 1
            block_table.append(block)

    def free(self, block_table: list[int]) -> None:
        for block in reversed(block_table):
            if self._refcounts[block] <= 0:
                raise RuntimeError(f"block {block} freed twice")
            self._refcounts[block] -= 1
            if self._refcounts[block] == 0:
                self._free.append(block)
        block_table.clear()

    def refcount(self, block: int) -> int:
        return self._refcounts[block]
