"""Which replica serves a request: round-robin, load-aware, prefix-cache-aware, with session affinity.

Pure Python (no Ray): the ingress hands `choose` the live replicas' loads and gets a replica id.

Prefix affinity mirrors the replicas' prefix caches without asking them: a prompt's full KV blocks are
hashed as a chain (block i's hash covers blocks 0..i, like the engine's prefix cache), and each hash is
remembered (LRU, bounded) with the replica that last computed it. A new request goes to the replica with
the longest matching chain, so requests sharing a prompt prefix (a system prompt, a multi-turn chat)
hit one replica's cache. Affinity (prefix or session) yields to load when the preferred replica is
overloaded: `balance_abs_threshold` more in flight than the least loaded AND `balance_rel_threshold`
times as many (SGLang's cache_aware rule).
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from mixserve.cluster.config import ClusterConfig


@dataclass(frozen=True)
class ReplicaLoad:
    """What the router knows about one live replica."""

    num_inflight: int
    """Requests the ingress has sent it that have not finished."""
    num_waiting: float = 0.0
    """Its engine's waiting queue at the last poll."""
    kv_cache_usage: float = 0.0
    """Fraction of its KV blocks in use at the last poll."""

    @property
    def score(self) -> float:
        return self.num_inflight + self.num_waiting + self.kv_cache_usage


@dataclass(frozen=True)
class Route:
    replica_id: str
    reason: str
    """round_robin, least_loaded, prefix_hit, session or overloaded (affinity overridden by load)."""
    num_matched_blocks: int = 0


def block_chain_hashes(token_ids: Sequence[int], block_size: int, max_blocks: int) -> list[int]:
    """Hashes of the prompt's first full blocks, each covering every block before it too."""
    hashes: list[int] = []
    previous = 0
    for i in range(min(len(token_ids) // block_size, max_blocks)):
        previous = hash((previous, tuple(token_ids[i * block_size:(i + 1) * block_size])))
        hashes.append(previous)
    return hashes


class Router:
    """Stateful router (the ingress calls it from one event loop)."""

    def __init__(self, config: ClusterConfig, block_size: int, max_prefix_blocks: int = 64,
                 max_entries: int = 100_000) -> None:
        self.config = config
        self.block_size = block_size
        self.max_prefix_blocks = max_prefix_blocks
        self.max_entries = max_entries
        self._owner: OrderedDict[int, str] = OrderedDict()  # block-chain hash -> replica id
        self._sessions: OrderedDict[str, str] = OrderedDict()
        self._turn = itertools.count()

    def choose(self, prompt_ids: Sequence[int], loads: dict[str, ReplicaLoad],
               session: str | None = None) -> Route:
        """The replica for a request among `loads` (live, not draining; must not be empty)."""
        if not loads:
            raise ValueError("no live replica to route to")
        ids = sorted(loads)
        if self.config.routing == "round_robin":
            return Route(ids[next(self._turn) % len(ids)], "round_robin")
        least = min(ids, key=lambda r: (loads[r].score, r))
        preferred, reason, matched = None, "least_loaded", 0
        if session is not None and self._sessions.get(session) in loads:
            preferred, reason = self._sessions[session], "session"
        elif self.config.routing == "prefix":
            preferred, matched = self._longest_match(prompt_ids, loads)
            reason = "prefix_hit" if preferred is not None else reason
        if preferred is not None and self._overloaded(loads[preferred], loads[least]):
            preferred, reason = None, "overloaded"
        chosen = preferred if preferred is not None else least
        return Route(chosen, reason, matched if chosen == preferred else 0)

    def record(self, route: Route, prompt_ids: Sequence[int], session: str | None = None) -> None:
        """Remember that `route.replica_id` now holds this prompt's blocks (and the session)."""
        for h in block_chain_hashes(prompt_ids, self.block_size, self.max_prefix_blocks):
            self._owner[h] = route.replica_id
            self._owner.move_to_end(h)
        while len(self._owner) > self.max_entries:
            self._owner.popitem(last=False)
        if session is not None:
            self._sessions[session] = route.replica_id
            self._sessions.move_to_end(session)
            while len(self._sessions) > self.max_entries:
                self._sessions.popitem(last=False)

    def forget(self, replica_id: str) -> None:
        """A replica left (died or drained): its cache and sessions are gone."""
        for h in [k for k, v in self._owner.items() if v == replica_id]:
            del self._owner[h]
        for session in [k for k, v in self._sessions.items() if v == replica_id]:
            del self._sessions[session]

    def _longest_match(self, prompt_ids: Sequence[int], loads: dict[str, ReplicaLoad]) -> tuple[str | None, int]:
        best, matched = None, 0
        for i, h in enumerate(block_chain_hashes(prompt_ids, self.block_size, self.max_prefix_blocks)):
            owner = self._owner.get(h)
            if owner is None:
                break
            if owner in loads:
                best, matched = owner, i + 1
        return best, matched

    def _overloaded(self, preferred: ReplicaLoad, least: ReplicaLoad) -> bool:
        gap = preferred.num_inflight - least.num_inflight
        return gap > self.config.balance_abs_threshold and \
            preferred.num_inflight > self.config.balance_rel_threshold * max(least.num_inflight, 1)
