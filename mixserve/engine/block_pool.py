"""Physical KV blocks: reference counts, an LRU free queue, and the prefix-hash index.

Invariant: a block is in `free` exactly when its ref count is 0. A free block may still carry a
hash (its KV is valid and can be revived by a prefix hit) until it is handed out again, which
evicts it from the hash index. The oldest-freed block is handed out first.
"""

from __future__ import annotations

from collections import OrderedDict


class BlockPool:
    """`num_blocks` blocks of KV, identified by `0..num_blocks-1`."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks={num_blocks} must be >= 1")
        self.num_blocks = num_blocks
        self.ref_counts = [0] * num_blocks
        self.block_hashes: list[int | None] = [None] * num_blocks
        self.block_tokens: list[tuple[int, ...] | None] = [None] * num_blocks
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.hash_to_block: dict[int, int] = {}
        self.num_hits = 0
        self.num_queries = 0

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by a live request (cached-but-free blocks count as free)."""
        return 1.0 - len(self.free) / self.num_blocks

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= len(self.free)

    def allocate(self, num_blocks: int) -> list[int]:
        """Take `num_blocks` fresh blocks (ref count 1), evicting their cached hashes."""
        if num_blocks > len(self.free):
            raise RuntimeError(f"asked for {num_blocks} blocks, {len(self.free)} free")
        out = []
        for _ in range(num_blocks):
            block_id, _ = self.free.popitem(last=False)
            self._uncache(block_id)
            self.ref_counts[block_id] = 1
            out.append(block_id)
        return out

    def touch(self, block_ids: list[int]) -> None:
        """Add a reference to each block (reviving free cached blocks)."""
        for block_id in block_ids:
            if self.ref_counts[block_id] == 0:
                del self.free[block_id]
            self.ref_counts[block_id] += 1

    def free_blocks(self, block_ids: list[int]) -> None:
        """Drop one reference from each block; blocks reaching 0 join the free queue in this order."""
        for block_id in block_ids:
            count = self.ref_counts[block_id]
            if count <= 0:
                raise RuntimeError(f"block {block_id} freed with ref count {count}")
            self.ref_counts[block_id] = count - 1
            if count == 1:
                self.free[block_id] = None

    def lookup(self, block_hash: int, tokens: tuple[int, ...]) -> int | None:
        """The cached block holding exactly `tokens` after the chain `block_hash`, if any."""
        self.num_queries += 1
        block_id = self.hash_to_block.get(block_hash)
        if block_id is None or self.block_tokens[block_id] != tokens:
            return None
        self.num_hits += 1
        return block_id

    def cache(self, block_id: int, block_hash: int, tokens: tuple[int, ...]) -> None:
        """Register a full block under its chain hash (first writer wins)."""
        if self.block_hashes[block_id] is not None:
            return
        if block_hash in self.hash_to_block:
            return
        self.block_hashes[block_id] = block_hash
        self.block_tokens[block_id] = tokens
        self.hash_to_block[block_hash] = block_id

    def _uncache(self, block_id: int) -> None:
        block_hash = self.block_hashes[block_id]
        if block_hash is not None:
            if self.hash_to_block.get(block_hash) == block_id:
                del self.hash_to_block[block_hash]
            self.block_hashes[block_id] = None
            self.block_tokens[block_id] = None

    def reset_prefix_cache(self) -> None:
        """Forget every cached hash of free blocks."""
        for block_id in list(self.free):
            self._uncache(block_id)
