"""`mixserve mixture profile` then `mixserve mixture run` on two tiny random models (the whole CLI path)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mixserve.cli import main
from mixserve.mixture.profiles import Profiles
from tests.loading.test_safetensors import tiny_llama, write_tokenizer


def test_profile_then_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    models = []
    for name in ("a", "b"):
        tiny_llama(tmp_path / name)
        write_tokenizer(tmp_path / name, generation_eos=[256])
        models += ["-m", f"{name}={tmp_path / name}"]
    common = [*models, "--tasks", "arithmetic,sorting", "--num-questions", "2", "--max-tokens", "4",
              "--keyword-samples", "2", "--pool-memory-budget", "80MiB"]
    assert main(["mixture", "profile", *common, "--out", str(tmp_path / "p.json")]) == 0
    profiles = Profiles.load(tmp_path / "p.json")
    assert profiles.models == ["a", "b"] and set(profiles.costs) == {"a", "b"}
    assert all(c.memory_bytes > 0 for c in profiles.costs.values())
    out = tmp_path / "run.json"
    assert main(["mixture", "run", *common, "--profiles", str(tmp_path / "p.json"), "--method", "majority",
                 "--method", "single", "--method", "random", "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert "majority" in table and "single" in table and "random" in table
    dump = json.loads(out.read_text())
    assert len(dump["majority"]["results"]) == 4 and dump["majority"]["results"][0]["recruited"] == ["a", "b"]
    assert dump["random"]["stages"]["aggregate"]["switches"] == 1  # one aggregator, one batch
    assert all(r["aggregated"] for r in dump["random"]["results"])
    voted = tmp_path / "voted.json"
    assert main(["mixture", "run", *common, "--profiles", str(tmp_path / "p.json"), "--method", "random",
                 "--aggregation", "majority", "--temperature", "0", "--out", str(voted)]) == 0
    dump = json.loads(voted.read_text())
    assert "aggregate" not in dump["random"]["stages"] and not any(r["aggregated"] for r in dump["random"]["results"])
    assert main(["mixture", "run", *common, "--profiles", str(tmp_path / "missing.json")]) == 2
