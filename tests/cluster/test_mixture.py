"""A two-model mixture on two pool replicas of the real loopback Ray cluster (`mixserve mixture run --ray`):
each model loads exactly once for the batch, on its own replica, and the answers equal the single-process
run's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from mixserve.cli import main
from mixserve.mixture.profiles import ModelCost, Profiles
from tests.cluster.raycluster import RayCluster, Server, free_port
from tests.cluster.test_cluster import client
from tests.cluster.tiny import write_tiny_llama
from tests.harness import wait_healthy


def write_models(root: Path) -> Path:
    """Two tiny llamas (different seeds), ~17 MiB each with a 16 MiB KV cache, in a models file."""
    for seed, name in enumerate(("a", "b")):
        write_tiny_llama(root / name, seed=seed)
    (root / "models.json").write_text(json.dumps({"models": [
        {"name": name, "model": str(root / name), "max_model_len": 512, "kv_cache_mib": 16}
        for name in ("a", "b")]}))
    return root / "models.json"


def test_two_models_on_two_replicas_load_once(ray_cluster: RayCluster, tmp_path: Path) -> None:
    write_models(tmp_path)
    profiles = tmp_path / "profiles.json"
    Profiles({"a": {"arithmetic": 1}, "b": {"sorting": 1}}, {"a": 0.5, "b": 0.4},
             {m: ModelCost(0.1, 17 << 20) for m in "ab"}, aggregator="a").save(profiles)
    common = ["mixture", "run", "--models-file", str(tmp_path / "models.json"), "--profiles", str(profiles),
              "--tasks", "arithmetic,sorting", "--num-questions", "2", "--max-tokens", "4", "--threads", "1",
              "--method", "majority", "--method", "moa", "--moa-layers", "1"]
    # one process, room for both models: the reference
    assert main([*common, "--pool-memory-budget", "64MiB", "--out", str(tmp_path / "single.json")]) == 0
    # two replicas with room for one model each (a tiny model holds ~17 MiB with its 16 MiB KV cache)
    proc = subprocess.run([sys.executable, "-m", "mixserve", *common, "--ray", "--address", ray_cluster.address,
                           "--replicas", "2", "--replica-memory-budget", "24MiB", "--out",
                           str(tmp_path / "cluster.json")], env=ray_cluster.env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = json.loads((tmp_path / "single.json").read_text())
    cluster: dict[str, Any] = json.loads((tmp_path / "cluster.json").read_text())

    def answers(dump: dict[str, Any], method: str) -> list[tuple[Any, ...]]:
        return [(r["qid"], r["recruited"], r["answers"], r["final"], r["answer"]) for r in dump[method]["results"]]

    for method in ("majority", "moa"):
        assert answers(cluster, method) == answers(single, method)
    # the majority batch (every question to both models) loads each model once, one per replica
    assert cluster["majority"]["report"]["loads"] == single["majority"]["report"]["loads"] == 2
    replicas = cluster["majority"]["replicas"]
    assert [r["loads"] for r in replicas] == [1, 1] and sorted(m for r in replicas for m in r["loaded"]) == ["a", "b"]
    assert all(r["resident_bytes"] <= r["budget_bytes"] for r in replicas)
    # the next batch (moa: both models, then the aggregator) finds both resident: no load anywhere
    assert cluster["moa"]["report"]["loads"] == 0
    assert [r["loads"] for r in cluster["moa"]["replicas"]] == [1, 1]
    assert "replica" in proc.stderr and "loaded" in proc.stderr


def _serve(root: Path, env: dict[str, str], *extra: str) -> Server:
    port = free_port()
    log = root / f"server-{port}.log"
    cmd = [sys.executable, "-m", "mixserve", "serve", "--models-file", str(root / "models.json"), "--mixture",
           f"tiny={root / 'profiles.json'}", "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning",
           *extra]
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**env, "PYTHONUNBUFFERED": "1"})
    server = Server(proc, f"http://127.0.0.1:{port}", log)
    if not wait_healthy(proc, server.url, log, 180, 0.3):
        server.stop()
        raise RuntimeError(f"server not healthy:\n{log.read_text()[-3000:]}")
    return server


def test_mixture_served_from_pool_replicas(ray_cluster: RayCluster, tmp_path: Path) -> None:
    """`serve --ray --mixture`: mixture/tiny answers as the single-process pool server does; each expert
    loads once, on one replica; per-replica loads and bytes on /v1/cluster/replicas and /metrics."""
    write_models(tmp_path)
    (tmp_path / "profiles.json").write_text(json.dumps({"scores": {"a": {"arithmetic": 2}, "b": {"arithmetic": -1}},
                                                        "aggregator": "b"}))
    question = [{"role": "user", "content": "What is 3 + 4? Answer with the number."}]
    single = _serve(tmp_path, dict(ray_cluster.env), "--pool-memory-budget", "64MiB")
    try:
        want = client(single).chat.completions.create(model="mixture/tiny", messages=question).model_dump()
    finally:
        single.stop()
    server = _serve(tmp_path, ray_cluster.env, "--ray", "--address", ray_cluster.address, "--replicas", "2",
                    "--pool-memory-budget", "24MiB")
    try:
        got = client(server).chat.completions.create(model="mixture/tiny", messages=question).model_dump()
        assert got["choices"][0]["message"] == want["choices"][0]["message"]
        assert len(got["usage"]["mixture"]["recruited"]) == 3 and got["choices"][0]["message"]["content"]
        for key in ("recruited", "answers", "keywords", "aggregator"):
            assert got["usage"]["mixture"][key] == want["usage"]["mixture"][key]
        status = server.get("/v1/cluster/replicas")
        replicas = status["replicas"]
        assert [r["loads"] for r in replicas] == [1, 1], status  # a and b, one replica each
        assert sorted(m for r in replicas for m in r["loaded"]) == ["a", "b"]
        assert set(status["placement"].values()) == {"p0", "p1"}
        again = client(server).chat.completions.create(model="mixture/tiny", messages=question).model_dump()
        assert again["usage"]["mixture"]["batch_loads"] == 0
        assert [r["loads"] for r in server.get("/v1/cluster/replicas")["replicas"]] == [1, 1]
        metrics = httpx.get(server.url + "/metrics", timeout=10).text
        assert 'mixserve:cluster_pool_loads_total{replica="p0"} 1.0' in metrics
        assert 'mixserve:cluster_pool_model_loaded{model="a",replica="p0"}' in metrics or \
            'mixserve:cluster_pool_model_loaded{model="a",replica="p1"}' in metrics
        with pytest.raises(Exception, match="expert of the cluster"):
            client(server).chat.completions.create(model="a", messages=question)
    finally:
        server.stop()
