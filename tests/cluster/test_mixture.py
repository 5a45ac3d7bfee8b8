"""A two-model mixture on two pool replicas of the real loopback Ray cluster (`mixserve mixture run --ray`):
each model loads exactly once for the batch, on its own replica, and the answers equal the single-process
run's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from mixserve.cli import main
from mixserve.mixture.profiles import ModelCost, Profiles
from tests.cluster.raycluster import RayCluster
from tests.cluster.tiny import write_tiny_llama


def test_two_models_on_two_replicas_load_once(ray_cluster: RayCluster, tmp_path: Path) -> None:
    for seed, name in enumerate(("a", "b")):
        write_tiny_llama(tmp_path / name, seed=seed)
    (tmp_path / "models.json").write_text(json.dumps({"models": [
        {"name": name, "model": str(tmp_path / name), "max_model_len": 512, "kv_cache_mib": 16}
        for name in ("a", "b")]}))
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


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
