"""Maps requests to KV blocks: allocation, prefix-cache hits, fork with copy-on-write, free.

Block `i` of a request holds the KV of `token_ids[i * block_size:(i + 1) * block_size]`.
Full blocks are hashed by the chain `hash(previous_block_hash, block_tokens)` so that a block is
only reused when the whole prefix before it matches too. A block shared by several requests (a
prefix hit or a fork) is never written: writing into a shared partial block first copies it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from mixserve.engine.block_pool import BlockPool
from mixserve.engine.request import Request


@dataclass(frozen=True)
class BlockCopy:
    """Copy the KV of block `src` into block `dst` before the step's forward pass."""

    src: int
    dst: int


def chain_hash(previous: int | None, tokens: tuple[int, ...]) -> int:
    return hash((previous, tokens))


class KVCacheManager:
    """Owns the block table of every live request."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.pool = BlockPool(num_blocks)
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.block_tables: dict[str, list[int]] = {}
        self.block_hashes: dict[str, list[int]] = {}
        """Chain hashes of each request's full, computed blocks (a prefix of its table)."""

    # -- admission -------------------------------------------------------------------------------
    def find_cached_prefix(self, request: Request) -> list[int]:
        """Cached blocks matching the start of the prompt, never covering its last token (which
        must be computed to produce logits). Returns block ids without taking references."""
        if not self.enable_prefix_caching or request.params.prompt_logprobs is not None:
            return []
        hits: list[int] = []
        previous: int | None = None
        max_blocks = (request.num_tokens - 1) // self.block_size
        for i in range(max_blocks):
            tokens = tuple(request.token_ids[i * self.block_size:(i + 1) * self.block_size])
            block_hash = chain_hash(previous, tokens)
            block_id = self.pool.lookup(block_hash, tokens)
            if block_id is None:
                break
            hits.append(block_id)
            previous = block_hash
        return hits

    def num_blocks_needed(self, request: Request, num_new_tokens: int) -> int:
        """New blocks needed to hold `num_new_tokens` more tokens (copy-on-write included)."""
        table = self.block_tables.get(request.request_id, [])
        end = request.num_computed_tokens + num_new_tokens
        needed = -(-end // self.block_size) - len(table)
        if self._needs_copy(request, table):
            needed += 1
        return max(needed, 0)

    def allocate(self, request: Request, num_new_tokens: int,
                 cached_blocks: list[int] | None = None) -> list[BlockCopy] | None:
        """Reserve room for the next `num_new_tokens` tokens of `request`; None if the pool is short.

        `cached_blocks` (first admission only) become the head of the table and advance
        `num_computed_tokens` past them.
        """
        rid = request.request_id
        if cached_blocks:
            assert rid not in self.block_tables and request.num_computed_tokens == 0
            # Revived free blocks leave the free queue: count them against the budget first.
            revived = sum(1 for b in cached_blocks if self.pool.ref_counts[b] == 0)
            end = len(cached_blocks) * self.block_size + num_new_tokens
            fresh = -(-end // self.block_size) - len(cached_blocks)
            if not self.pool.can_allocate(fresh + revived):
                return None
            self.pool.touch(cached_blocks)
            self.block_tables[rid] = list(cached_blocks)
            self.block_hashes[rid] = self._hashes_of(request, len(cached_blocks))
            request.num_computed_tokens = len(cached_blocks) * self.block_size
            request.num_cached_tokens = request.num_computed_tokens
            self.block_tables[rid].extend(self.pool.allocate(fresh))
            return []
        if not self.pool.can_allocate(self.num_blocks_needed(request, num_new_tokens)):
            return None
        table = self.block_tables.setdefault(rid, [])
        self.block_hashes.setdefault(rid, [])
        copies = []
        if self._needs_copy(request, table):
            index = request.num_computed_tokens // self.block_size
            src = table[index]
            (dst,) = self.pool.allocate(1)
            self.pool.free_blocks([src])
            table[index] = dst
            copies.append(BlockCopy(src, dst))
        end = request.num_computed_tokens + num_new_tokens
        missing = -(-end // self.block_size) - len(table)
        if missing > 0:
            table.extend(self.pool.allocate(missing))
        return copies

    def _needs_copy(self, request: Request, table: list[int]) -> bool:
        """The next write lands in an existing partial block that someone else also references."""
        offset = request.num_computed_tokens % self.block_size
        index = request.num_computed_tokens // self.block_size
        return offset != 0 and index < len(table) and self.pool.ref_counts[table[index]] > 1

    # -- after a step ------------------------------------------------------------------------------
    def cache_full_blocks(self, request: Request) -> None:
        """Hash blocks that became full and computed, so later prompts can reuse them."""
        if not self.enable_prefix_caching:
            return
        rid = request.request_id
        hashes = self.block_hashes[rid]
        table = self.block_tables[rid]
        num_full = min(request.num_computed_tokens // self.block_size, len(table))
        previous = hashes[-1] if hashes else None
        for i in range(len(hashes), num_full):
            tokens = tuple(request.token_ids[i * self.block_size:(i + 1) * self.block_size])
            previous = chain_hash(previous, tokens)
            hashes.append(previous)
            self.pool.cache(table[i], previous, tokens)

    def _hashes_of(self, request: Request, num_blocks: int) -> list[int]:
        out: list[int] = []
        previous: int | None = None
        for i in range(num_blocks):
            previous = chain_hash(previous, tuple(request.token_ids[i * self.block_size:
                                                                    (i + 1) * self.block_size]))
            out.append(previous)
        return out

    def import_prefix(self, token_ids: list[int], write: Callable[[list[int], list[int]], None]) -> int:
        """Cache the KV of the full blocks of `token_ids` that this cache lacks (KV migration): allocate a
        free block for each missing block index, `write(block_ids, indexes)` fills them, then they are
        hashed and freed as evictable prefix-cache entries (first block freed last, so evicted last).
        Returns the tokens covered; raises RuntimeError when there are not enough free blocks (nothing done)."""
        bs = self.block_size
        entries: list[tuple[int, tuple[int, ...]]] = []
        previous: int | None = None
        for i in range(len(token_ids) // bs):
            tokens = tuple(token_ids[i * bs:(i + 1) * bs])
            previous = chain_hash(previous, tokens)
            entries.append((previous, tokens))
        held = [self.pool.hash_to_block.get(h) for h, _ in entries]
        hits = [b for (h, t), b in zip(entries, held) if b is not None and self.pool.block_tokens[b] == t]
        missing = [i for i, ((_, t), b) in enumerate(zip(entries, held))
                   if b is None or self.pool.block_tokens[b] != t]
        if not missing:
            return len(entries) * bs
        self.pool.touch(hits)  # pinned, so that allocating the missing blocks cannot evict them
        if not self.pool.can_allocate(len(missing)):
            self.pool.free_blocks(hits)
            raise RuntimeError(f"needs {len(missing)} free KV blocks, {self.pool.num_free_blocks} are free")
        fresh = self.pool.allocate(len(missing))
        try:
            write(fresh, missing)
        except BaseException:
            self.pool.free_blocks(fresh + hits)
            raise
        ids: list[int | None] = [b if b is not None and self.pool.block_tokens[b] == t else None
                                 for (_, t), b in zip(entries, held)]
        for i, block_id in zip(missing, fresh):
            ids[i] = block_id
            self.pool.cache(block_id, *entries[i])
        self.pool.free_blocks([b for b in reversed(ids) if b is not None])
        return len(entries) * bs

    # -- sharing and release -------------------------------------------------------------------
    def fork(self, parent: Request, child: Request) -> None:
        """`child` shares every block of `parent`; the partial last block is copied on first write."""
        table = self.block_tables[parent.request_id]
        self.pool.touch(table)
        self.block_tables[child.request_id] = list(table)
        self.block_hashes[child.request_id] = list(self.block_hashes[parent.request_id])

    def free(self, request: Request) -> None:
        """Release the request's blocks, tail first so shared prefixes stay cached longest."""
        table = self.block_tables.pop(request.request_id, None)
        self.block_hashes.pop(request.request_id, None)
        if table:
            self.pool.free_blocks(list(reversed(table)))

    def block_table(self, request_id: str) -> list[int]:
        return self.block_tables[request_id]

    @property
    def usage(self) -> float:
        return self.pool.usage
