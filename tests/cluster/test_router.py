"""Routing policies (pure Python, no Ray): round-robin, least loaded, prefix affinity, sessions, overload."""

from __future__ import annotations

import pytest

from mixserve.cluster.config import ClusterConfig
from mixserve.cluster.router import ReplicaLoad, Router, block_chain_hashes
from mixserve.config import ConfigError

IDLE = {"r0": ReplicaLoad(0), "r1": ReplicaLoad(0)}


def route(router: Router, prompt: list[int], loads: dict[str, ReplicaLoad], session: str | None = None) -> str:
    chosen = router.choose(prompt, loads, session)
    router.record(chosen, prompt, session)
    return chosen.replica_id


def test_block_chain_hashes_cover_their_prefix() -> None:
    a = block_chain_hashes(list(range(10)), 4, 64)
    b = block_chain_hashes(list(range(8)) + [99, 98], 4, 64)
    c = block_chain_hashes([7] + list(range(1, 10)), 4, 64)
    assert len(a) == 2 and a == b  # only full blocks count
    assert not set(a) & set(c)  # block 1 equal, block 0 not: chained hashes differ


def test_round_robin_alternates() -> None:
    router = Router(ClusterConfig(routing="round_robin"), block_size=4)
    assert [route(router, [1, 2, 3, 4, 5], IDLE) for _ in range(4)] == ["r0", "r1", "r0", "r1"]


def test_load_routing_picks_the_least_loaded() -> None:
    router = Router(ClusterConfig(routing="load"), block_size=4)
    loads = {"r0": ReplicaLoad(3, 1.0, 0.5), "r1": ReplicaLoad(2, 0.0, 0.1), "r2": ReplicaLoad(2, 2.0, 0.0)}
    assert route(router, [1, 2], loads) == "r1"


def test_prefix_affinity_until_overloaded() -> None:
    router = Router(ClusterConfig(routing="prefix", balance_abs_threshold=2, balance_rel_threshold=1.5), 4)
    shared = list(range(100, 116))
    first = route(router, shared + [1], IDLE)
    chosen = router.choose(shared + [2], IDLE)
    assert (chosen.replica_id, chosen.reason, chosen.num_matched_blocks) == (first, "prefix_hit", 4)
    other = "r1" if first == "r0" else "r0"
    busy = {first: ReplicaLoad(5), other: ReplicaLoad(1)}
    assert router.choose(shared + [3], busy).replica_id == other  # 4 more and 5x as many: load wins
    assert router.choose(shared + [3], {first: ReplicaLoad(3), other: ReplicaLoad(1)}).replica_id == first
    router.forget(first)
    assert router.choose(shared + [4], IDLE).reason == "least_loaded"


def test_session_affinity() -> None:
    router = Router(ClusterConfig(routing="load"), block_size=4)
    pinned = route(router, [1, 2, 3], {"r0": ReplicaLoad(1), "r1": ReplicaLoad(0)}, session="s")
    assert pinned == "r1"
    assert router.choose([9, 9], {"r0": ReplicaLoad(0), "r1": ReplicaLoad(2)}, "s").replica_id == "r1"
    assert router.choose([9, 9], {"r0": ReplicaLoad(0)}, "s").replica_id == "r0"  # its replica is gone


@pytest.mark.parametrize("field, value", [("replicas", 0), ("threads_per_replica", 0), ("routing", "random"),
                                          ("balance_rel_threshold", 0.5), ("address", " ")])
def test_config_names_the_bad_field(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=field):
        ClusterConfig(**{field: value})  # type: ignore[arg-type]


def test_serve_flags_parse() -> None:
    from mixserve.cli import build_parser
    from mixserve.cluster.cli import cluster_config

    args = build_parser().parse_args(["serve", "--ray", "--address", "auto", "--replicas", "3",
                                      "--threads-per-replica", "2", "--routing", "round_robin"])
    assert args.ray
    assert cluster_config(args) == ClusterConfig(address="auto", replicas=3, threads_per_replica=2,
                                                 routing="round_robin")
    assert not build_parser().parse_args(["serve"]).ray
