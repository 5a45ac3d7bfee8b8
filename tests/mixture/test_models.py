"""Model specs, the models file, budgets, and the engine loader on a tiny random model in a real pool."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mixserve.config import ConfigError
from mixserve.mixture.build import llm_expert_factory, model_specs, parse_budget, real_pool
from mixserve.mixture.experts import ExpertRequest, Question
from mixserve.mixture.models import ModelSpec, load_models_file, spec_from_arg
from mixserve.sampling_params import SamplingParams
from tests.loading.test_safetensors import tiny_llama, write_tokenizer


def test_specs_and_models_file(tmp_path: Path) -> None:
    assert spec_from_arg("math=/x/y") == ModelSpec("math", "/x/y")
    assert spec_from_arg("smollm2-135m").name == "smollm2-135m"
    assert spec_from_arg("/models/tiny.gguf").name == "tiny"
    (tmp_path / "m").mkdir()
    f = tmp_path / "models.json"
    f.write_text(json.dumps({"models": [{"name": "a", "model": "m", "kv_cache_mib": 8}]}))
    (spec,) = load_models_file(f)
    assert spec.model == str(tmp_path / "m") and spec.kv_cache_mib == 8  # relative to the file
    f.write_text(json.dumps({"models": [{"name": "a", "model": "m", "kv_cache": 8}]}))
    with pytest.raises(ConfigError, match=r"models\[0\] has unknown field 'kv_cache'"):
        load_models_file(f)
    f.write_text(json.dumps({"models": [{"name": "a", "model": "m"}, {"name": "a", "model": "n"}]}))
    with pytest.raises(ConfigError, match="duplicate model names"):
        load_models_file(f)
    with pytest.raises(ConfigError, match="no models"):
        model_specs([], None)
    assert parse_budget("2GiB") == 2 << 30
    with pytest.raises(ConfigError, match="pool_memory_budget='25%'"):
        parse_budget("25%")


def test_llm_loader_measures_bytes_and_evicts(tmp_path: Path) -> None:
    folders = []
    for name in ("a", "b"):
        folder = tmp_path / name
        tiny_llama(folder)
        write_tokenizer(folder, generation_eos=[256])
        folders.append(folder)
    specs = [ModelSpec(n, str(f), kv_cache_mib=4, max_model_len=128) for n, f in zip("ab", folders)]
    pool, loader = real_pool(specs, budget_bytes=7 << 20)  # room for one (4 MiB KV + weights each)
    expert_of = llm_expert_factory(SamplingParams(max_tokens=3, temperature=0))
    q = Question("q", "hello")
    with pool.use("a") as llm:
        (out,) = expert_of("a", llm).generate([ExpertRequest(q, q.text)])
    assert out.completion_tokens == 3
    measured = loader.measured["a"]
    assert 4 << 20 < measured < 6 << 20  # the KV cache plus ~80k float32 weights
    pool.load("b")
    assert pool.state("a") == "unloaded" and pool.stats("a").evictions == 1
    assert pool.resident_bytes() == loader.measured["b"] <= pool.budget_bytes


def test_estimate_of_a_dense_safetensors_folder_is_its_loaded_size(tmp_path: Path) -> None:
    """A float32 safetensors folder is not inflated like a quantized GGUF: the estimate (its tensors'
    element count x 4 + KV) is close to the measured size, so a budget that holds the model admits it
    before its first load (the disk x 6 estimate asked 3.3 GB for a 605 MB specialist)."""
    from mixserve.mixture.models import LLMLoader

    folder = tmp_path / "a"
    tiny_llama(folder)
    write_tokenizer(folder, generation_eos=[256])
    (tmp_path / "q.gguf").write_bytes(b"\0" * 1000)
    loader = LLMLoader([ModelSpec("a", str(folder), kv_cache_mib=4, max_model_len=128),
                        ModelSpec("g", str(tmp_path / "q.gguf"), kv_cache_mib=4)])
    estimate = loader.estimate_bytes("a")
    assert loader.estimate_bytes("g") == 6000 + (4 << 20)  # quantized: disk x inflation
    loader.load("a")
    measured = loader.measured["a"]
    assert abs(estimate - measured) <= 0.1 * measured, (estimate, measured)
    assert loader.estimate_bytes("a") == measured
