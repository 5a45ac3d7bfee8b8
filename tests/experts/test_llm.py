"""The one knob end to end: LLM(expert_memory_budget=...) and `mixserve generate --expert-memory-budget`."""

from __future__ import annotations

from pathlib import Path

import pytest

from mixserve.cli import main
from mixserve.experts.store import PackError
from mixserve.llm import LLM
from mixserve.sampling_params import SamplingParams
from tests.experts.conftest import Tiny

PARAMS = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
PROMPT = [3, 4, 5, 6, 7, 8, 9]


def test_llm_budget_matches_all_in_memory(olmoe: Tiny, tmp_path: Path) -> None:
    ref_llm = LLM(str(olmoe.path), cache_dir=tmp_path, kv_cache_bytes=1 << 22)
    ref = ref_llm.generate([PROMPT], PARAMS)[0].outputs[0].token_ids
    assert ref_llm.expert_stats() == {}
    llm = LLM(str(olmoe.path), cache_dir=tmp_path, kv_cache_bytes=1 << 22, expert_memory_budget="30%")
    assert llm.generate([PROMPT, PROMPT[:3]], PARAMS)[0].outputs[0].token_ids == ref
    stats = llm.expert_stats()
    assert stats["expert_tokens"] == len(PROMPT) + 3 + 2 * 9 and 0 < stats["expert_hit_rate"] <= 1
    assert stats["expert_resident_bytes"] <= stats["expert_budget_bytes"]
    assert {"expert_bytes_per_token", "expert_prefetch_recall", "expert_stall_seconds"} <= set(stats)
    assert list((tmp_path / "packs").iterdir())  # packed once, automatically
    other = llm.with_config(seed=1)
    assert other.generate([PROMPT], PARAMS)[0].outputs[0].token_ids == ref
    assert other.expert_stats()["expert_tokens"] > stats["expert_tokens"]  # the same cache


def test_budget_errors(olmoe: Tiny, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="below the minimum"):
        LLM(str(olmoe.path), cache_dir=tmp_path, expert_memory_budget="1KiB")
    dense_like = tmp_path / "not_moe"
    dense_like.mkdir()
    (dense_like / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    with pytest.raises(PackError, match="needs an MoE model"):
        LLM(str(dense_like), cache_dir=tmp_path, expert_memory_budget="1GiB")


def test_cli_generate_with_budget(olmoe: Tiny, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["generate", "t3 t4 t5", "-m", str(olmoe.path), "--cache-dir", str(tmp_path), "--max-tokens", "4",
            "-t", "0", "--ignore-eos", "--kv-cache-gib", "0.01"]
    assert main(args) == 0
    ref = capsys.readouterr().out
    assert main(args + ["--expert-memory-budget", "0.25"]) == 0
    assert capsys.readouterr().out == ref
    assert main(args + ["--expert-memory-budget", "lots"]) == 2
    assert "experts.memory_budget='lots'" in capsys.readouterr().err
