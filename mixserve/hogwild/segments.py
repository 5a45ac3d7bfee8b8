"""Segments: runs of paged KV blocks holding keys at positions local to the segment.

A `Segment` owns blocks of the engine's `BlockPool` (ref count 1 each); token `j` of a segment lives
in slot `block_ids[j // block_size] * block_size + j % block_size`, and its key was rotated at
position `j` (segment-local), whatever global position the segment takes in a view. That is what
lets several views share one segment without copying: a view that places the segment at global
start `s` rotates its queries by `s` instead of touching the keys (see `views.py`).

Invariant: every block a `SegmentPool` took from the block pool is returned by `release` /
`release_all` (the session calls `release_all` in a `finally`), so the pool is full again after a
run or an abort. Pure Python: no torch here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mixserve.engine.block_pool import BlockPool


class HogwildError(RuntimeError):
    """A hogwild session cannot go on (the KV pool is short, a model it cannot drive, ...)."""


@dataclass(eq=False)
class Segment:
    """Tokens whose K/V are written at local positions `0..length-1` of this segment's blocks."""

    name: str
    """What it holds (for transcripts and errors): "prompt", "Alice/3", "step_header", ..."""
    block_ids: list[int] = field(default_factory=list)
    """Physical blocks, in order; capacity is `len(block_ids) * block_size` tokens."""
    token_ids: list[int] = field(default_factory=list)
    """Tokens whose K/V are in the cache (written by a forward pass)."""
    released: bool = False

    @property
    def length(self) -> int:
        return len(self.token_ids)


class SegmentPool:
    """Creates segments from a `BlockPool` and gives every block back (see the module doc)."""

    def __init__(self, pool: BlockPool, block_size: int) -> None:
        if block_size < 1:
            raise ValueError(f"block_size={block_size} must be >= 1")
        self.pool = pool
        self.block_size = block_size
        self.live: list[Segment] = []
        self.num_written_tokens = 0
        """Tokens whose K/V were computed and written (each token of each segment exactly once)."""

    def new(self, name: str) -> Segment:
        segment = Segment(name)
        self.live.append(segment)
        return segment

    def blocks_needed(self, segment: Segment, num_new_tokens: int) -> int:
        end = segment.length + num_new_tokens
        return max(0, -(-end // self.block_size) - len(segment.block_ids))

    def reserve(self, segment: Segment, num_new_tokens: int) -> None:
        """Make room for `num_new_tokens` more tokens; HogwildError if the pool is short."""
        if segment.released:
            raise HogwildError(f"segment {segment.name!r} was released")
        needed = self.blocks_needed(segment, num_new_tokens)
        if needed > self.pool.num_free_blocks:
            raise HogwildError(f"the KV pool has {self.pool.num_free_blocks} free blocks, segment "
                               f"{segment.name!r} needs {needed} more (raise num_blocks / kv_cache_bytes "
                               f"or lower max_tokens)")
        segment.block_ids.extend(self.pool.allocate(needed))

    def slots(self, segment: Segment, start: int, num_tokens: int) -> list[int]:
        """Cache slots of tokens `start..start+num_tokens-1` of `segment` (room must be reserved)."""
        bs = self.block_size
        return [segment.block_ids[j // bs] * bs + j % bs for j in range(start, start + num_tokens)]

    def commit(self, segment: Segment, token_ids: list[int]) -> None:
        """The forward pass wrote these tokens' K/V at the segment's next slots."""
        segment.token_ids.extend(token_ids)
        self.num_written_tokens += len(token_ids)

    def release(self, segment: Segment) -> None:
        if segment.released:
            return
        segment.released = True
        self.live.remove(segment)
        if segment.block_ids:
            self.pool.free_blocks(list(reversed(segment.block_ids)))

    def release_all(self) -> None:
        for segment in list(self.live):
            self.release(segment)

    @property
    def num_blocks(self) -> int:
        """Blocks held by live segments."""
        return sum(len(s.block_ids) for s in self.live)
