"""`mixserve mixture run --ray`: the mixture's experts on pool replicas of a Ray cluster (see `mixture`)."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Any

from mixserve.config import ConfigError


def add_run_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Ray cluster (--ray; needs `pip install mixserve[ray]`)")
    g.add_argument("--ray", action="store_true",
                   help="run the experts on model-pool replicas of a Ray cluster (each model loads once per "
                        "batch across the cluster; groups run on all replicas at once)")
    g.add_argument("--address", default=None,
                   help="Ray cluster to join (auto or HOST:PORT); default: start a private local Ray")
    g.add_argument("--replicas", type=int, default=2, help="pool replicas (Ray actors)")
    g.add_argument("--replica-memory-budget", default=None,
                   help="resident bytes of each replica's pool (default: --pool-memory-budget)")
    g.add_argument("--threads-per-replica", type=int, default=1, help="CPUs (torch threads) per replica")


@dataclass
class ClusterRun:
    pool: Any
    """A started `ClusterModelPool`."""
    started_ray: bool

    def close(self) -> None:
        import ray

        self.pool.close()
        if self.started_ray:
            ray.shutdown()


def start_cluster_pool(args: argparse.Namespace) -> ClusterRun:
    """Ray (joined or started) and `args.replicas` pool replicas of the run's models."""
    from mixserve.cluster.config import ClusterConfig
    from mixserve.mixture.build import model_specs, parse_budget
    from mixserve.sampling_params import SamplingParams

    if args.replicas < 1:
        raise ConfigError(f"invalid --replicas {args.replicas!r}: must be >= 1", field="replicas")
    if args.threads_per_replica < 1:
        raise ConfigError(f"invalid --threads-per-replica {args.threads_per_replica!r}: must be >= 1",
                          field="threads_per_replica")
    budget = parse_budget(args.replica_memory_budget or args.pool_memory_budget)
    specs = model_specs(args.model, args.models_file)
    try:
        import ray  # noqa: F401
    except ImportError:
        raise RuntimeError("--ray needs Ray: pip install 'mixserve[ray]'") from None
    from mixserve.cluster.launch import start_ray
    from mixserve.cluster.mixture import ClusterModelPool

    cluster = ClusterConfig(address=args.address, replicas=args.replicas,
                            threads_per_replica=args.threads_per_replica)
    started = start_ray(cluster)
    try:
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature)
        pool = ClusterModelPool.start(specs, args.replicas, budget, params, args.cache_dir, args.threads_per_replica)
    except BaseException:
        if started:
            import ray

            ray.shutdown()
        raise
    return ClusterRun(pool, started)


def print_replicas(replicas: list[dict[str, Any]]) -> None:
    print(f"{'replica':<8} {'loads':>5} {'evictions':>9} {'MiB loaded':>10} {'MiB resident':>12} "
          f"{'MiB budget':>10}  loaded", file=sys.stderr)
    for r in replicas:
        print(f"{r['id']:<8} {r['loads']:>5} {r['evictions']:>9} {r['bytes_loaded'] / 2**20:>10.1f} "
              f"{r['resident_bytes'] / 2**20:>12.1f} {r['budget_bytes'] / 2**20:>10.0f}  "
              f"{','.join(r['loaded'])}", file=sys.stderr)
