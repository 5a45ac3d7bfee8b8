"""`KVCacheManager.import_prefix`: migrated blocks become evictable prefix-cache entries."""

from __future__ import annotations

import pytest

from mixserve.engine.kv_cache_manager import KVCacheManager


def test_import_caches_missing_blocks_and_frees_them() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=2)
    writes: list[tuple[list[int], list[int]]] = []
    assert kv.import_prefix([1, 2, 3, 4, 5, 6, 7], lambda ids, rows: writes.append((ids, rows))) == 6
    assert writes and writes[0][1] == [0, 1, 2]
    assert kv.pool.num_free_blocks == 8 and len(kv.pool.hash_to_block) == 3
    # the first block is freed last, so it is evicted last
    assert list(kv.pool.free)[-1] == writes[0][0][0]
    # importing again writes only what is missing
    writes.clear()
    assert kv.import_prefix([1, 2, 3, 4, 5, 6, 8, 9], lambda ids, rows: writes.append((ids, rows))) == 8
    assert writes[0][1] == [3]


def test_import_without_room_or_with_a_failing_write_changes_nothing() -> None:
    kv = KVCacheManager(num_blocks=2, block_size=2)
    with pytest.raises(RuntimeError, match="needs 3 free KV blocks, 2 are free"):
        kv.import_prefix([1, 2, 3, 4, 5, 6], lambda ids, rows: None)

    def fail(ids: list[int], rows: list[int]) -> None:
        raise ValueError("wrong shape")

    with pytest.raises(ValueError, match="wrong shape"):
        kv.import_prefix([1, 2], fail)
    assert kv.pool.num_free_blocks == 2 and not kv.pool.hash_to_block and kv.pool.ref_counts == [0, 0]
