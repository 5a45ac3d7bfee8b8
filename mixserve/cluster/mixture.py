"""Mixtures on the cluster: a model pool per replica, models placed on replicas, each group of questions
sent to the replica that holds its model, so each model loads once per batch across the cluster.

Each `PoolReplica` (a Ray actor, one per CPU slot) holds its own `ModelPool` of `LLM`s under its own memory
budget (LRU eviction, as in one process). The driver's `ClusterModelPool` keeps what the replicas last
reported (which models each holds, resident bytes) and places a model: on the replica that holds it, else
on the one with the most room for it, else on the replica whose least recently used model is the
cluster's least recently used (its pool evicts there). The replicas' reports are the only truth; the
placement map is derived from them after every call.

`run_grouped` is the cluster's `Mixture` executor: it groups a batch's jobs by model (as
`schedule.run_grouped` does), plans every group onto a replica (counting bytes the plan will load), and
runs all replicas' groups at once (each replica runs its groups in turn), so the models of one batch load
once each, in parallel across replicas. `ClusterModelPool` also has the `ModelPool` surface `Mixture`
uses (`names`, `state`, `use`, `events`) and `expert_of`, so every stage (keywords too) runs remotely.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from mixserve.mixture.experts import ExpertAnswer, ExpertRequest
from mixserve.mixture.models import ModelSpec
from mixserve.mixture.pool import PoolError, PoolEvent
from mixserve.mixture.schedule import BatchReport, Job, ModelCompute, group_by_model
from mixserve.sampling_params import SamplingParams

log = logging.getLogger("mixserve.cluster")


@dataclass(frozen=True)
class PoolStatus:
    """What a pool replica reports after every call."""

    replica_id: str
    budget_bytes: int
    resident_bytes: int
    loaded: tuple[str, ...]
    """Loaded models, least recently used first."""
    loads: int
    evictions: int
    bytes_loaded: int
    load_seconds: float
    pid: int
    host: str

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.replica_id, "budget_bytes": self.budget_bytes, "resident_bytes": self.resident_bytes,
                "loaded": list(self.loaded), "loads": self.loads, "evictions": self.evictions,
                "bytes_loaded": self.bytes_loaded, "load_seconds": round(self.load_seconds, 4),
                "pid": self.pid, "host": self.host}


@dataclass(frozen=True)
class GroupsDone:
    answers: list[list[ExpertAnswer]]
    seconds: list[float]
    events: list[PoolEvent]
    status: PoolStatus


class PoolReplica:
    """One replica's model pool (a plain class; Ray wraps it lazily)."""

    def __init__(self, replica_id: str, specs: list[ModelSpec], budget_bytes: int, params: SamplingParams,
                 cache_dir: str | None = None, threads: int = 1) -> None:
        import torch

        from mixserve.mixture.build import llm_expert_factory, real_pool

        torch.set_num_threads(threads)
        self.replica_id = replica_id
        self.pool, self.loader = real_pool(specs, budget_bytes, cache_dir)
        self.expert_of = llm_expert_factory(params)

    def estimates(self) -> dict[str, int]:
        return {name: self.loader.estimate_bytes(name) for name in self.pool.names}

    def status(self) -> PoolStatus:
        t = self.pool.totals()
        loaded = tuple(self.pool.loaded())
        return PoolStatus(self.replica_id, self.pool.budget_bytes, int(t["resident_bytes"]), loaded,
                          int(t["loads"]), int(t["evictions"]), int(t["bytes_loaded"]), float(t["load_seconds"]),
                          os.getpid(), socket.gethostname())

    def run_groups(self, groups: list[tuple[str, list[ExpertRequest]]]) -> GroupsDone:
        """Each group's requests as one batch of its model (loaded once here, evicting LRU if needed)."""
        first = len(self.pool.events)
        answers, seconds = [], []
        for model, requests in groups:
            with self.pool.use(model) as llm:
                start = time.perf_counter()
                answers.append(self.expert_of(model, llm).generate(requests))
                seconds.append(time.perf_counter() - start)
        return GroupsDone(answers, seconds, list(self.pool.events[first:]), self.status())


@dataclass
class RemoteModel:
    """What `ClusterModelPool.use` yields: where the model runs."""

    replica_id: str
    model: str


@dataclass
class ClusterModelPool:
    """The driver's view of the replicas' pools (see the module doc)."""

    actors: dict[str, Any]
    estimates: dict[str, int]
    status: dict[str, PoolStatus]
    events: list[PoolEvent] = field(default_factory=list)
    get: Callable[[Any], Any] | None = None
    """Resolves a replica call (None: `ray.get`; tests pass fakes)."""
    num_deaths: int = 0
    """Pool replicas found dead (dropped; their groups rerun on the others)."""
    _tick: int = 0
    _used: dict[tuple[str, str], int] = field(default_factory=dict)

    @classmethod
    def start(cls, specs: list[ModelSpec], replicas: int, budget_bytes: int, params: SamplingParams,
              cache_dir: str | None = None, threads: int = 1, timeout_s: float = 600) -> ClusterModelPool:
        """Start `replicas` pool actors (Ray must be initialised) and wait until they answer."""
        import ray

        if replicas < 1:
            raise ValueError(f"invalid replicas={replicas!r}: must be >= 1")
        remote: Any = ray.remote(num_cpus=threads, max_restarts=0)(PoolReplica)
        actors: dict[str, Any] = {f"p{i}": remote.options(scheduling_strategy="SPREAD").remote(
            f"p{i}", specs, budget_bytes, params, cache_dir, threads) for i in range(replicas)}
        statuses = ray.get([a.status.remote() for a in actors.values()], timeout=timeout_s)
        estimates: dict[str, int] = ray.get(next(iter(actors.values())).estimates.remote(), timeout=timeout_s)
        return cls(actors, estimates, {s.replica_id: s for s in statuses})

    # -- the ModelPool surface Mixture uses --------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return list(self.estimates)

    def state(self, name: str) -> str:
        return "loaded" if self.holder(name) is not None else "unloaded"

    @contextmanager
    def use(self, name: str) -> Iterator[RemoteModel]:
        yield RemoteModel(self.place(name), name)

    def expert_of(self, name: str, handle: RemoteModel) -> RemoteExpert:
        return RemoteExpert(self, handle)

    # -- placement --------------------------------------------------------------------------------
    def holder(self, name: str) -> str | None:
        return next((rid for rid in sorted(self.status) if name in self.status[rid].loaded), None)

    def place(self, name: str, planned: dict[str, int] | None = None) -> str:
        """The replica to run `name` on; `planned`: bytes already promised per replica in this plan."""
        if name not in self.estimates:
            raise PoolError(f"unknown model {name!r}; known models: {', '.join(self.estimates)}", model=name,
                            code="model_not_found")
        held = self.holder(name)
        if held is not None:
            return held
        need = self.estimates[name]
        planned = planned or {}
        free = {rid: s.budget_bytes - s.resident_bytes - planned.get(rid, 0) for rid, s in self.status.items()}
        fits = [rid for rid in sorted(free) if free[rid] >= need]
        if fits:
            return max(fits, key=lambda r: free[r])
        big = [rid for rid in sorted(self.status) if self.status[rid].budget_bytes >= need]
        if not big:
            raise PoolError(f"model {name!r} needs {need} bytes, more than any replica's budget",
                            model=name, code="model_too_large")
        # evict where the least recently used model of the cluster is
        return min(big, key=lambda r: min((self._used.get((r, m), 0) for m in self.status[r].loaded), default=0))

    def absorb(self, done: GroupsDone, models: list[str]) -> None:
        rid = done.status.replica_id
        self.status[rid] = done.status
        self.events.extend(done.events)
        for model in models:
            self._tick += 1
            self._used[(rid, model)] = self._tick

    # -- execution ----------------------------------------------------------------------------------
    def run_grouped(self, jobs: list[Job], pool: Any = None, expert_of: Any = None
                    ) -> tuple[dict[Hashable, ExpertAnswer], BatchReport]:
        """The `Mixture` executor: every model's jobs as one group on the replica placed for it, all
        replicas at once (signature of `schedule.run_grouped`; `pool` and `expert_of` are this pool's)."""

        start = time.perf_counter()
        resident = [m for m in self.names if self.holder(m) is not None]
        plan: dict[str, list[tuple[str, list[Job]]]] = {}
        planned: dict[str, int] = {}
        for model, group in group_by_model(jobs, resident):
            rid = self.place(model, planned)
            if self.holder(model) is None:
                planned[rid] = planned.get(rid, 0) + self.estimates[model]
            plan.setdefault(rid, []).append((model, group))
        refs = {rid: self.actors[rid].run_groups.remote([(m, [j.request for j in g]) for m, g in groups])
                for rid, groups in plan.items()}
        report = BatchReport()
        answers: dict[Hashable, ExpertAnswer] = {}
        lost: list[Job] = []
        for rid, ref in refs.items():
            done = self._resolve(rid, ref)
            if done is None:  # the replica died: its groups go to the others, placed again
                lost += [job for _, group in plan[rid] for job in group]
                continue
            self.absorb(done, [m for m, _ in plan[rid]])
            report.switches += len(plan[rid])
            for (model, group), outs, seconds in zip(plan[rid], done.answers, done.seconds, strict=True):
                compute = report.compute.setdefault(model, ModelCompute())
                compute.seconds += seconds
                for job, out in zip(group, outs, strict=True):
                    answers[job.key] = out
                    compute.requests += 1
                    compute.prompt_tokens += out.prompt_tokens
                    compute.completion_tokens += out.completion_tokens
            for event in done.events:
                if event.kind == "load":
                    report.loads += 1
                    report.bytes_loaded += event.nbytes
                    report.load_seconds += event.seconds
                elif event.kind == "evict":
                    report.evictions += 1
        if lost:
            more, more_report = self.run_grouped(lost)
            answers.update(more)
            report.add(more_report)
        report.wall_seconds = time.perf_counter() - start
        return answers, report

    def _resolve(self, rid: str, ref: Any) -> GroupsDone | None:
        """A replica call's result; None when the replica died (it is dropped; raises if none is left)."""
        from mixserve.cluster.pool import is_replica_failure

        get = self.get
        if get is None:
            import ray

            get = ray.get
        try:
            return get(ref)  # type: ignore[no-any-return]
        except Exception as exc:
            if not is_replica_failure(exc):
                raise
            log.warning("pool replica %s is gone: %s", rid, exc)
            self.num_deaths += 1
            self.actors.pop(rid, None)
            self.status.pop(rid, None)
            if not self.status:
                raise PoolError("every pool replica is gone", code="pool_unavailable") from exc
            return None

    def replicas(self) -> list[dict[str, Any]]:
        """Per replica: budget, resident bytes, loaded models, loads, evictions, bytes loaded."""
        return [self.status[rid].as_dict() for rid in sorted(self.status)]

    def close(self) -> None:
        import ray

        for actor in self.actors.values():
            ray.kill(actor, no_restart=True)
        self.actors.clear()


@dataclass
class RemoteExpert:
    """An `Expert` whose model runs on a pool replica (one group per `generate`)."""

    pool: ClusterModelPool
    handle: RemoteModel

    def generate(self, requests: list[ExpertRequest]) -> list[ExpertAnswer]:
        while True:
            rid = self.handle.replica_id
            if rid not in self.pool.actors:  # its replica died: placed again
                rid = self.handle.replica_id = self.pool.place(self.handle.model)
            done = self.pool._resolve(rid, self.pool.actors[rid].run_groups.remote([(self.handle.model, requests)]))
            if done is not None:
                self.pool.absorb(done, [self.handle.model])
                return done.answers[0]
