import pytest

from kvrun.engine.block_manager import BlockManager


def test_grow_allocates_only_missing_blocks():
    blocks = BlockManager(num_blocks=4, block_size=4)
    table: list[int] = []
    blocks.grow(table, 5)
    assert len(table) == 2 and blocks.num_free == 2
    blocks.grow(table, 8)
    assert len(table) == 2
    blocks.grow(table, 9)
    assert len(table) == 3 and blocks.num_free == 1
    assert all(blocks.refcount(block) == 1 for block in table)


def test_can_grow_and_out_of_memory():
    blocks = BlockManager(num_blocks=2, block_size=4)
    table: list[int] = []
    assert blocks.can_grow(table, 8)
    assert not blocks.can_grow(table, 9)
    with pytest.raises(MemoryError):
        blocks.grow(table, 9)
    assert table == [] and blocks.num_free == 2


def test_free_returns_blocks_and_rejects_double_free():
    blocks = BlockManager(num_blocks=3, block_size=2)
    first, second = [], []
    blocks.grow(first, 4)
    blocks.grow(second, 2)
    freed = list(first)
    blocks.free(first)
    assert first == [] and blocks.num_free == 2
    with pytest.raises(RuntimeError):
        blocks.free(freed)
    blocks.free(second)
    assert blocks.num_free == 3
