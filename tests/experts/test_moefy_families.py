"""`moefy` beyond llama: tiny random dense gemma3, qwen2 and qwen3 models (HF configs + `save_pretrained`).

gemma3 is written in mixserve's own Gemma3-MoE layout, which transformers cannot load (no such class):
with K = E its logits are checked against transformers' dense `Gemma3ForCausalLM` (and mixserve's dense
load) instead. qwen2 -> Qwen2-MoE (with q/k/v bias) and qwen3 -> Qwen3-MoE load in both, with the same
logits, and compute the dense function at K = E.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

from mixserve.experts.moefy import MoefyConfig, moefy
from mixserve.experts.moefy_calib import forward_logits
from mixserve.llm import LLM
from mixserve.loading.checkpoint import load_checkpoint
from mixserve.models.base import build_model
from mixserve.sampling_params import SamplingParams
from tests.experts.conftest import write_tokenizer

VOCAB = 128
IDS = [5, 17, 99, 3, 42, 42, 7, 120, 64, 33, 8, 91, 12]
SMALL: dict[str, Any] = dict(vocab_size=VOCAB, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                             num_hidden_layers=2, intermediate_size=128, initializer_range=0.1, pad_token_id=0,
                             bos_token_id=None, eos_token_id=None)
DENSE: dict[str, Any] = {
    # sliding + full attention, a window shorter than IDS, a final softcap: every Gemma3 feature runs
    "gemma3": lambda: transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(
        **SMALL, head_dim=16, query_pre_attn_scalar=16, sliding_window=5, final_logit_softcapping=3.0,
        layer_types=["sliding_attention", "full_attention"])),
    "qwen2": lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**SMALL, tie_word_embeddings=True)),
    "qwen3": lambda: transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**SMALL, head_dim=16)),
}


def _save(name: str, root: Path) -> Path:
    torch.manual_seed(0)
    model = DENSE[name]()
    if name == "gemma3":  # HF initialises the (1 + w) norms at w = 0; random w exercises the offset
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "norm" in n:
                    p.normal_(0.0, 0.3)
    model.save_pretrained(root / name)
    write_tokenizer(root / name, VOCAB)
    return root / name


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("moefy_families")
    rng = random.Random(0)
    (root / "calib.txt").write_text(" ".join(f"t{rng.randrange(3, VOCAB)}" for _ in range(600)))
    for name in DENSE:
        _save(name, root)
    return root


def _moefy(dense: Path, out: Path, e: int, k: int, f: float) -> Path:
    moefy(MoefyConfig(str(dense), str(out), e, k, f, calibration_files=(str(dense.parent / "calib.txt"),),
                      max_calibration_tokens=512, window=64, pregate_tokens=512), progress=False)
    return out


def _mixserve(path: Path) -> Any:
    ckpt = load_checkpoint(path)
    model: Any = build_model(ckpt.hf_config, torch.float32)
    model.load_weights(ckpt.weights(dtype=torch.float32))
    return model.eval()


def _hf(path: Path, ids: list[int]) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


@pytest.mark.parametrize("shared", [0.0, 0.25])
def test_gemma3_all_experts_active_is_the_dense_function(root: Path, tmp_path: Path, shared: float) -> None:
    moe = _moefy(root / "gemma3", tmp_path / "moe", 4, 4, shared)
    config = json.loads((moe / "config.json").read_text())
    assert config["architectures"] == ["Gemma3MoeForCausalLM"] and config["num_experts"] == 4
    assert config["shared_expert_intermediate_size"] == round(shared * 128)
    assert config["layer_types"] == ["sliding_attention", "full_attention"] and config["sliding_window"] == 5
    got = forward_logits(_mixserve(moe), IDS)
    torch.testing.assert_close(got, _hf(root / "gemma3", IDS), atol=2e-5, rtol=1e-5)  # transformers, dense
    torch.testing.assert_close(got, forward_logits(_mixserve(root / "gemma3"), IDS), atol=2e-5, rtol=1e-5)
    with pytest.raises(ValueError):  # documented: transformers has no class for this layout
        transformers.AutoConfig.from_pretrained(moe)


def test_gemma3_sparse_generates_and_budget_matches(root: Path, tmp_path: Path) -> None:
    moe = _moefy(root / "gemma3", tmp_path / "moe", 8, 2, 0.25)
    config = json.loads((moe / "config.json").read_text())
    assert (config["moe_intermediate_size"], config["shared_expert_intermediate_size"]) == (12, 32)
    got = forward_logits(_mixserve(moe), IDS)
    assert not torch.allclose(got, forward_logits(_mixserve(root / "gemma3"), IDS), atol=1e-3)
    assert torch.isfinite(got).all()
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    ref = LLM(str(moe), cache_dir=tmp_path, kv_cache_bytes=1 << 22).generate([IDS], params)[0].outputs[0].token_ids
    assert len(ref) == 8
    llm = LLM(str(moe), cache_dir=tmp_path, kv_cache_bytes=1 << 22, expert_memory_budget="30%")
    assert llm.generate([IDS], params)[0].outputs[0].token_ids == ref
    stats = llm.expert_stats()
    assert 0 < stats["expert_hit_rate"] <= 1 and stats["expert_resident_bytes"] <= stats["expert_budget_bytes"]


@pytest.mark.parametrize("name", ["qwen2", "qwen3"])
def test_qwen_families(root: Path, tmp_path: Path, name: str) -> None:
    moe = _moefy(root / name, tmp_path / "moe", 4, 4, 0.0)
    config = json.loads((moe / "config.json").read_text())
    assert config["model_type"] == {"qwen2": "qwen2_moe", "qwen3": "qwen3_moe"}[name]
    if name == "qwen2":
        assert config["qkv_bias"] is True
    got = forward_logits(_mixserve(moe), IDS)
    torch.testing.assert_close(got, _hf(root / name, IDS), atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(_hf(moe, IDS), got, atol=2e-5, rtol=1e-5)
    sparse = _moefy(root / name, tmp_path / "sparse", 8, 2, 0.25 if name == "qwen2" else 0.0)
    torch.testing.assert_close(_hf(sparse, IDS), forward_logits(_mixserve(sparse), IDS), atol=2e-5, rtol=1e-5)


def test_family_errors(root: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--top-k=5 must be in"):
        MoefyConfig(str(root / "gemma3"), str(tmp_path / "o"), 4, 5)
    with pytest.raises(ValueError, match="Qwen3MoeForCausalLM layout .* has no shared expert"):
        _moefy(root / "qwen3", tmp_path / "o", 4, 2, 0.25)
    with pytest.raises(ValueError, match="does not divide the 96 routed neurons"):
        _moefy(root / "gemma3", tmp_path / "o", 64, 2, 0.25)
    moe = _moefy(root / "gemma3", tmp_path / "moe", 4, 2, 0.0)
    with pytest.raises(ValueError, match="already an MoE model"):
        _moefy(moe, tmp_path / "o2", 4, 2, 0.0)
    cfg = json.loads((root / "gemma3" / "config.json").read_text())
    bad = tmp_path / "gelu"
    bad.mkdir()
    for f in (root / "gemma3").iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    (bad / "config.json").write_text(json.dumps({**cfg, "model_type": "phi3"}))
    with pytest.raises(ValueError, match="model_type='phi3'; moefy supports"):
        _moefy(bad, tmp_path / "o3", 4, 2, 0.0)


def test_activation_is_a_checked_field() -> None:
    from mixserve.layers.moe import MoE, act_and_mul

    x = torch.randn(3, 8)
    gate, up = x.chunk(2, dim=-1)
    torch.testing.assert_close(act_and_mul(x, "gelu_tanh"), torch.nn.functional.gelu(gate, approximate="tanh") * up)
    assert MoE(0, 4, 2, 2, 1, normalize_topk=True, weights_in_activation_dtype=True, shared_intermediate_size=2,
               activation="gelu_tanh").shared_expert.activation == "gelu_tanh"  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="unknown gated-MLP activation 'relu'"):
        MoE(0, 4, 2, 2, 1, normalize_topk=True, weights_in_activation_dtype=True, activation="relu")  # type: ignore[arg-type]
