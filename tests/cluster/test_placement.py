"""Model placement of the cluster's model pool (pure Python: the replicas' reports are given)."""

from __future__ import annotations

from typing import Any

import pytest
import ray.exceptions

from mixserve.cluster.mixture import ClusterModelPool, GroupsDone, PoolStatus
from mixserve.mixture.experts import ExpertAnswer, ExpertRequest, Question
from mixserve.mixture.pool import PoolError, PoolEvent
from mixserve.mixture.schedule import Job

MIB = 1 << 20


def status(rid: str, loaded: tuple[str, ...] = (), resident: int = 0, budget: int = 100 * MIB) -> PoolStatus:
    return PoolStatus(rid, budget, resident, loaded, len(loaded), 0, resident, 0.0, 1, "host")


def pool(*statuses: PoolStatus) -> ClusterModelPool:
    return ClusterModelPool({}, {"a": 60 * MIB, "b": 60 * MIB, "c": 60 * MIB, "huge": 200 * MIB},
                            {s.replica_id: s for s in statuses})


def test_a_held_model_stays_where_it_is() -> None:
    p = pool(status("p0"), status("p1", ("b",), 60 * MIB))
    assert p.place("b") == "p1" and p.state("b") == "loaded" and p.state("a") == "unloaded"


def test_an_unheld_model_goes_where_there_is_room_counting_the_plan() -> None:
    p = pool(status("p0"), status("p1", ("b",), 60 * MIB))
    assert p.place("a") == "p0"
    p = pool(status("p0"), status("p1"))
    assert p.place("a") == "p0" and p.place("b", planned={"p0": 60 * MIB}) == "p1"


def test_no_room_evicts_where_the_least_recently_used_model_is() -> None:
    p = pool(status("p0", ("a",), 60 * MIB), status("p1", ("b",), 60 * MIB))
    p.absorb(GroupsDone([], [], [], p.status["p0"]), ["a"])
    p.absorb(GroupsDone([], [], [], p.status["p1"]), ["b"])  # b used after a
    assert p.place("c") == "p0"
    p.absorb(GroupsDone([], [], [], p.status["p0"]), ["a"])  # now a is the most recent
    assert p.place("c") == "p1"


def test_unknown_and_too_large_models_are_clear_errors() -> None:
    p = pool(status("p0"))
    with pytest.raises(PoolError, match="unknown model 'zz'"):
        p.place("zz")
    with pytest.raises(PoolError, match="more than any replica's budget"):
        p.place("huge")


class FakeReplica:
    """`actor.run_groups.remote(groups)`: answers naming the replica, or (dead) Ray's actor error."""

    def __init__(self, rid: str, dead: bool = False) -> None:
        self.rid, self.dead = rid, dead
        self.run_groups = self

    def remote(self, groups: list[tuple[str, list[ExpertRequest]]]) -> Any:
        if self.dead:
            return ray.exceptions.RayActorError(error_msg="killed")
        models = tuple(m for m, _ in groups)
        return GroupsDone([[ExpertAnswer(f"{self.rid}:{m}:{r.prompt}") for r in reqs] for m, reqs in groups],
                          [0.0] * len(groups), [PoolEvent("load", m, 60 * MIB, 0.0, 0.0) for m in models],
                          status(self.rid, models[-1:], 60 * MIB))


def resolve(ref: Any) -> Any:
    if isinstance(ref, Exception):
        raise ref
    return ref


def test_a_dead_replica_s_groups_rerun_on_the_others() -> None:
    p = pool(status("p0"), status("p1"))
    p.actors, p.get = {"p0": FakeReplica("p0", dead=True), "p1": FakeReplica("p1")}, resolve
    q = Question("q", "?")
    jobs = [Job(("q", i), m, ExpertRequest(q, f"x{i}")) for i, m in enumerate("ab")]
    answers, report = p.run_grouped(jobs)
    assert {k: a.text for k, a in answers.items()} == {("q", 0): "p1:a:x0", ("q", 1): "p1:b:x1"}
    assert p.num_deaths == 1 and list(p.actors) == ["p1"] and report.loads == 2
    p.actors["p1"].dead = True
    with pytest.raises(PoolError, match="every pool replica is gone"):
        p.run_grouped(jobs)
