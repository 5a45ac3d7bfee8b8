"""`ClusterConfig`: how `mixserve serve --ray` spreads engine replicas over a Ray cluster."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from mixserve.config import ConfigError

RoutingName = Literal["prefix", "load", "round_robin"]
MigrationKV = Literal["blocks", "recompute"]


@dataclass(frozen=True)
class ClusterConfig:
    """Replicas, where they run, and how requests are routed to them (every field is a `serve` flag)."""

    address: str | None = None
    """Ray cluster to join: `auto` or HOST:PORT (token auth: the cluster's token must be in ~/.ray/auth_token
    or RAY_AUTH_TOKEN). None: start a private local Ray for this server, stopped when it exits."""
    replicas: int = 2
    """Engine replicas (Ray actors), each holding a whole engine."""
    threads_per_replica: int = 1
    """CPUs each replica reserves in Ray (`num_cpus`) and torch threads it runs."""
    num_cpus: int | None = None
    """CPUs of the local Ray this server starts (default: replicas * threads_per_replica, plus one for a spare)."""
    routing: RoutingName = "prefix"
    """prefix: the replica already holding the prompt's leading blocks, unless overloaded; load: the least
    loaded replica (in-flight requests, waiting queue, KV usage); round_robin: in turn."""
    balance_abs_threshold: int = 4
    """Affinity (prefix or session) yields to load balance when the preferred replica has this many more
    requests in flight than the least loaded one..."""
    balance_rel_threshold: float = 1.5
    """...and also more than this many times as many (SGLang's cache_aware rule)."""
    session_header: str = "x-session-id"
    """HTTP header naming a session: its requests go to the replica that served it before (if not overloaded)."""
    migration_kv: MigrationKV = "blocks"
    """How live migration and drain move a running request's KV: blocks (the source exports its full KV blocks
    through Ray's object store, the target imports them into its prefix cache and recomputes only the last
    partial block) or recompute (the target recomputes all of it in one prefill). A request may choose per
    call (`POST /v1/cluster/migrate` field `kv`); failover always recomputes."""
    replace_dead: bool = True
    """Start a new replica for each one that dies."""
    stats_interval_s: float = 0.5
    """How often the ingress polls replicas for load and health."""
    start_timeout_s: float = 600.0
    """How long a replica may take to load its model before it counts as failed."""

    def __post_init__(self) -> None:
        def need(ok: bool, name: str, why: str) -> None:
            if not ok:
                raise ConfigError(f"invalid config {name}={getattr(self, name)!r}: {why}", field=name)

        need(self.replicas >= 1, "replicas", "must be >= 1")
        need(self.threads_per_replica >= 1, "threads_per_replica", "must be >= 1")
        need(self.num_cpus is None or self.num_cpus >= self.threads_per_replica, "num_cpus",
             "must be at least threads_per_replica")
        need(self.routing in ("prefix", "load", "round_robin"), "routing", "must be prefix, load or round_robin")
        need(self.migration_kv in ("blocks", "recompute"), "migration_kv", "must be blocks or recompute")
        need(self.balance_abs_threshold >= 0, "balance_abs_threshold", "must be >= 0")
        need(self.balance_rel_threshold >= 1.0, "balance_rel_threshold", "must be >= 1")
        need(self.stats_interval_s > 0, "stats_interval_s", "must be > 0")
        need(self.start_timeout_s > 0, "start_timeout_s", "must be > 0")
        need(bool(self.session_header.strip()), "session_header", "must be a header name")
        need(self.address is None or bool(self.address.strip()), "address", "must be auto or HOST:PORT")

    @property
    def local_num_cpus(self) -> int:
        return self.num_cpus or self.replicas * self.threads_per_replica + 1
