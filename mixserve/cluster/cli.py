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
    if len(getattr(args, "all_models", None) or []) > 1 or getattr(args, "models_file", None) or \
            getattr(args, "mixture", None):
        raise ConfigError("invalid --ray with several models: `serve --ray` serves one model from engine replicas; "
                          "run a mixture on the cluster with `mixserve mixture run --ray`", field="ray")
    try:
        import ray  # noqa: F401
    except ImportError:
        raise RuntimeError("--ray needs Ray: pip install 'mixserve[ray]'") from None
    from mixserve.cluster.launch import serve_cluster

    return serve_cluster(config, cluster, options)  # type: ignore[arg-type]
