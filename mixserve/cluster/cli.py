"""`serve --ray` flags (every field of `ClusterConfig`) and the handler `cmd_serve` hands off to."""

from __future__ import annotations

import argparse

from mixserve.cluster.config import ClusterConfig
from mixserve.config import ConfigError
from mixserve.flags import add_flags, values_from


def add_serve_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("Ray cluster (--ray; needs `pip install mixserve[ray]`)")
    g.add_argument("--ray", action="store_true",
                   help="serve from engine replicas on Ray (Ray actors; this server is their OpenAI ingress)")
    add_flags(g, ClusterConfig)


def cluster_config(args: argparse.Namespace) -> ClusterConfig:
    return ClusterConfig(**values_from(args, ClusterConfig))


def serve_ray(args: argparse.Namespace, config: object, options: object) -> int:
    """Run the cluster server; a clear error when Ray is not installed."""
    cluster = cluster_config(args)  # validate before importing Ray
    several = len(getattr(args, "all_models", None) or []) > 1 or bool(getattr(args, "models_file", None))
    if several and not getattr(args, "mixture", None):
        raise ConfigError("invalid --ray with several models: `serve --ray` serves one model from engine replicas, "
                          "or mixtures of several (--mixture NAME=PROFILES) from pool replicas", field="ray")
    try:
        import ray  # noqa: F401
    except ImportError:
        raise RuntimeError("--ray needs Ray: pip install 'mixserve[ray]'") from None
    if getattr(args, "mixture", None):
        return _serve_mixtures(args, cluster, options)
    from mixserve.cluster.launch import serve_cluster

    return serve_cluster(config, cluster, options)  # type: ignore[arg-type]


def _serve_mixtures(args: argparse.Namespace, cluster: ClusterConfig, options: object) -> int:
    """`--mixture` with `--ray`: pool replicas, each with `--pool-memory-budget` of models."""
    from mixserve.cluster.mixserver import serve_mixture_cluster
    from mixserve.mixture.build import model_specs, parse_budget

    specs = model_specs(getattr(args, "all_models", None) or [], args.models_file)
    mixtures = {}
    for item in args.mixture:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"invalid --mixture {item!r}: expected NAME=PROFILES.json", field="mixture")
        mixtures[name] = path
    return serve_mixture_cluster(specs, mixtures, parse_budget(args.pool_memory_budget), cluster,
                                 options)  # type: ignore[arg-type]
