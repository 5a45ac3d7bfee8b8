"""Per-replica Prometheus series (`replica` label) and the cluster's own counters, on the server registry.

The engine gauges and counters keep their single-process names (`mixserve:num_requests_running`,
`mixserve:prefix_cache_hits_total`, ...) with labels `model_name` and `replica`: summing over `replica`
gives the cluster's value. Cluster counters: failovers, migrations, replica deaths, routed requests by
replica and reason.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from mixserve.cluster.ingress import ClusterEngine
from mixserve.server.metrics import PREFIX

_GAUGES = {"num_running": ("num_requests_running", "Sequences running in the current step."),
           "num_waiting": ("num_requests_waiting", "Sequences waiting to be scheduled."),
           "kv_cache_usage": ("kv_cache_usage_perc", "Fraction of KV-cache blocks in use (1 = full)."),
           "num_blocks": ("num_kv_blocks", "KV-cache blocks in the pool.")}
_COUNTERS = {"prompt_tokens": ("prompt_tokens", "Prompt tokens admitted."),
             "generation_tokens": ("generation_tokens", "Tokens generated."),
             "prefix_cache_queries": ("prefix_cache_queries", "Prompt blocks looked up in the prefix cache."),
             "prefix_cache_hits": ("prefix_cache_hits", "Prompt blocks found in the prefix cache."),
             "num_preemptions": ("num_preemptions", "Requests preempted for lack of KV blocks."),
             "migrated_kv_tokens": ("migrated_kv_tokens", "Tokens whose KV blocks a replica imported from another "
                                    "(live migration, drain)."),
             "recomputed_tokens": ("recomputed_tokens", "Tokens a resumed request already had that a replica "
                                   "computed again (failover, migration without KV blocks, the partial block).")}


class ClusterCollector(Collector):
    def __init__(self, model_name: str, engine: ClusterEngine) -> None:
        self.model_name = model_name
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        labels = ["model_name", "replica"]
        handles = sorted(self.engine.pool.replicas.values(), key=lambda h: h.replica_id)
        for key, (name, doc) in _GAUGES.items():
            g = GaugeMetricFamily(PREFIX + name, doc, labels=labels)
            for h in handles:
                g.add_metric([self.model_name, h.replica_id], h.stats.get(key, 0.0))
            yield g
        for key, (name, doc) in _COUNTERS.items():
            c = CounterMetricFamily(PREFIX + name, doc, labels=labels)
            for h in handles:
                c.add_metric([self.model_name, h.replica_id], h.stats.get(key, 0.0))
            yield c
        routed = CounterMetricFamily(PREFIX + "cluster_routed_requests", "Requests routed, by replica and reason.",
                                     labels=labels + ["reason"])
        for h in handles:
            for reason, count in sorted(h.num_routed.items()):
                routed.add_metric([self.model_name, h.replica_id, reason], count)
        yield routed
        up = GaugeMetricFamily(PREFIX + "cluster_replica_up", "1 when the replica is routable.", labels=labels)
        for h in handles:
            up.add_metric([self.model_name, h.replica_id], 1.0 if h.state == "ready" else 0.0)
        yield up
        mine = ["model_name"]
        for name, doc, value in (
                ("cluster_failovers", "Samples resumed on another replica after theirs died.",
                 self.engine.num_failovers),
                ("cluster_migrations", "Request legs moved live to another replica.", self.engine.num_migrations),
                ("cluster_replica_deaths", "Replicas found dead.", self.engine.pool.num_deaths)):
            c = CounterMetricFamily(PREFIX + name, doc, labels=mine)
            c.add_metric([self.model_name], float(value))
            yield c
