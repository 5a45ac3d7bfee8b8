"""Fixtures of the cluster tests: a tiny model folder (session) shared by engines, replicas and servers."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster.raycluster import RayCluster, Server, start_ray_cluster, start_server
from tests.cluster.tiny import write_tiny_llama


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayCluster]:
    pytest.importorskip("ray", reason="Ray is not installed (pip install 'mixserve[ray]')")
    try:
        cluster = start_ray_cluster(tmp_path_factory.mktemp("ray"))
    except (RuntimeError, OSError) as exc:
        pytest.skip(f"Ray cannot start here: {exc}")
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def ingress(ray_cluster: RayCluster, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """`mixserve serve --ray` with 2 replicas (one per node) on the test cluster."""
    server = start_server(tiny_model, tmp_path_factory.mktemp("ingress"), ray_cluster.env, "--ray",
                          "--address", ray_cluster.address, "--replicas", "2", "--stats-interval-s", "0.2")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def single(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The single-process server on the same model: the reference."""
    server = start_server(tiny_model, tmp_path_factory.mktemp("single"), dict(os.environ))
    try:
        yield server
    finally:
        server.stop()
