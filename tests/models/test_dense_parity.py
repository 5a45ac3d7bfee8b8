"""Dense families against HF transformers on tiny random checkpoints (CPU, float32).

Each case builds a random model from transformers' own config class, saves it as safetensors, loads
it into our module, and checks prompt logits, greedy continuation, and a packed mixed
prefill/decode batch against single-sequence HF logits.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from safetensors.torch import load_file

from mixserve.layers.rotary import RotaryEmbedding
from mixserve.models.base import WeightError, build_model
from mixserve.models.gemma3 import Gemma3Args
from mixserve.models.llama import LlamaArgs
from tests.harness import forward_packed, greedy, make_kv_caches, prefill_logits

VOCAB = 256
COMMON: dict[str, Any] = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                              num_attention_heads=4, num_key_value_heads=2, initializer_range=0.15)

CASES: dict[str, tuple[type, dict[str, Any]]] = {
    # Untied head, explicit head_dim != hidden/heads, biases everywhere, llama3 RoPE scaling.
    "llama": (transformers.LlamaConfig, dict(
        head_dim=32, attention_bias=True, mlp_bias=True, tie_word_embeddings=False,
        rope_parameters={"rope_type": "llama3", "rope_theta": 50000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 16})),
    # Sliding window on every layer, smaller than the prompts; tied head.
    "mistral": (transformers.MistralConfig, dict(sliding_window=6, tie_word_embeddings=True)),
    "qwen2": (transformers.Qwen2Config, dict(tie_word_embeddings=True)),
    # Sliding layers from max_window_layers on; linear RoPE scaling.
    "qwen3": (transformers.Qwen3Config, dict(
        head_dim=24, use_sliding_window=True, sliding_window=5, max_window_layers=1,
        rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0})),
    # Mixed layer types, window < prompt, local vs scaled global RoPE, final softcap, untied head.
    "gemma3": (transformers.Gemma3TextConfig, dict(
        head_dim=32, query_pre_attn_scalar=24, sliding_window=5, final_logit_softcapping=3.0,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"], tie_word_embeddings=False,
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
                         "full_attention": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}})),
}

PROMPT_A = [5, 17, 99, 3, 250, 42, 42, 7, 128, 64, 1, 200, 33, 81]
PROMPT_B = [9, 190, 4, 77, 150, 21, 60, 11, 240]


@dataclass
class Case:
    hf: Any
    """The transformers model (`generate`, logits)."""
    cfg: dict[str, Any]
    """config.json as written by `save_pretrained`."""
    weights: dict[str, torch.Tensor]
    """model.safetensors as written by `save_pretrained`."""


def _make_case(name: str, root: Path) -> Case:
    config_cls, extra = CASES[name]
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(config_cls(**COMMON, **extra)).eval()
    with torch.no_grad():  # norms start at 1 (or 0) and biases at 0: perturb so loading them is tested
        for param in hf.parameters():
            if param.dim() == 1:
                param.add_(torch.randn_like(param) * 0.2)
    hf.save_pretrained(root / name)
    cfg = json.loads((root / name / "config.json").read_text())
    return Case(hf, cfg, load_file(str(root / name / "model.safetensors")))


@pytest.fixture(scope="module")
def cases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Case]:
    root = tmp_path_factory.mktemp("dense")
    return {name: _make_case(name, root) for name in CASES}


def _ours(case: Case, dtype: torch.dtype = torch.float32, cfg: dict[str, Any] | None = None) -> Any:
    model: Any = build_model(cfg or case.cfg, dtype)
    model.load_weights(case.weights.items())
    return model


def _assert_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


def _hf_logits(case: Case, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return case.hf(torch.tensor([ids])).logits[0].float()


@pytest.mark.parametrize("name", list(CASES))
def test_prompt_logits_match_hf(cases: dict[str, Case], name: str) -> None:
    case = cases[name]
    _assert_close(prefill_logits(_ours(case), PROMPT_A), _hf_logits(case, PROMPT_A))


@pytest.mark.parametrize("name", list(CASES))
def test_greedy_matches_hf_generate(cases: dict[str, Case], name: str) -> None:
    case = cases[name]
    with torch.no_grad():
        out = case.hf.generate(torch.tensor([PROMPT_B]), max_new_tokens=8, do_sample=False,
                               eos_token_id=None, pad_token_id=0)
    expected = out[0, len(PROMPT_B):].tolist()
    assert len(expected) == 8
    assert greedy(_ours(case), PROMPT_B, 8) == expected


@pytest.mark.parametrize("name", list(CASES))
def test_packed_mixed_batch_matches_single(cases: dict[str, Case], name: str) -> None:
    """Two sequences of different lengths: prefill + partial prefill, then decode + chunk, then two
    decodes; every new token's logits equal the HF logits of that sequence alone."""
    case = cases[name]
    model = _ours(case)
    kv = make_kv_caches(model, 2 * 4096, torch.float32)
    a, b = PROMPT_A + [12, 34], PROMPT_B + [56, 78]  # 16 and 11 tokens
    steps = [((0, 14), (0, 5)), ((14, 15), (5, 10)), ((15, 16), (10, 11))]
    rows_a, rows_b = [], []
    for (a0, a1), (b0, b1) in steps:
        logits = forward_packed(model, kv, [a[a0:a1], b[b0:b1]], [a0, b0], [0, 1])
        rows_a.append(logits[:a1 - a0])
        rows_b.append(logits[a1 - a0:])
    _assert_close(torch.cat(rows_a), _hf_logits(case, a))
    _assert_close(torch.cat(rows_b), _hf_logits(case, b))


@pytest.mark.parametrize("name", ["llama", "gemma3"])
def test_bfloat16_runs_close_to_float32(cases: dict[str, Case], name: str) -> None:
    case = cases[name]
    model = _ours(case, torch.bfloat16)
    assert model.model.norm.weight.dtype == torch.bfloat16
    # RoPE frequencies stay float32: bf16 ones would put angles off by radians at long positions.
    assert all(m.inv_freq.dtype == torch.float32 for m in model.modules() if isinstance(m, RotaryEmbedding))
    ours = prefill_logits(model, PROMPT_A, torch.bfloat16)
    ref = _hf_logits(case, PROMPT_A)
    assert ours.dtype == torch.float32
    assert (ours - ref).abs().max() < 0.05 * ref.abs().max()
    assert (ours.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.8
    assert len(greedy(model, PROMPT_B, 3, torch.bfloat16)) == 3  # decode path with a bf16 cache


def test_tied_head_shares_embedding_and_ignores_checkpoint_head(cases: dict[str, Case]) -> None:
    case = cases["qwen2"]
    assert "lm_head.weight" not in case.weights
    model = _ours(case)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    model.load_weights([*case.weights.items(), ("lm_head.weight", torch.zeros(VOCAB, 64))])
    _assert_close(prefill_logits(model, PROMPT_A), _hf_logits(case, PROMPT_A))
    untied = _ours(cases["llama"])
    assert untied.lm_head.weight is not untied.model.embed_tokens.weight


def test_weight_errors_name_the_tensor(cases: dict[str, Case]) -> None:
    weights = dict(cases["qwen2"].weights)
    model: Any = build_model(cases["qwen2"].cfg, torch.float32)
    bad = "model.layers.1.self_attn.k_proj.weight"
    with pytest.raises(WeightError, match=bad):
        model.load_weights({**weights, bad: weights[bad][:-1]}.items())
    missing = "model.layers.0.self_attn.v_proj.bias"
    with pytest.raises(WeightError, match=missing):
        model.load_weights((k, v) for k, v in weights.items() if k != missing)
    with pytest.raises(WeightError, match="model.layers.9.mlp.up_proj.weight"):
        model.load_weights([*weights.items(), ("model.layers.9.mlp.up_proj.weight", weights[bad])])


def test_legacy_config_keys_give_the_same_model(cases: dict[str, Case]) -> None:
    """Pre-5.x configs: `rope_theta`/`rope_scaling`, Gemma's `rope_local_base_freq` and
    `sliding_window_pattern`, no `head_dim` for Llama."""
    llama = cases["llama"]
    params = dict(llama.cfg["rope_parameters"])
    old = {k: v for k, v in llama.cfg.items() if k != "rope_parameters"}
    old |= {"rope_theta": params.pop("rope_theta"), "rope_scaling": params}
    assert LlamaArgs.from_hf(old).rope_theta == 50000.0
    gemma = cases["gemma3"]
    old_gemma = {k: v for k, v in gemma.cfg.items() if k not in ("rope_parameters", "layer_types")}
    old_gemma |= {"rope_theta": 10000.0, "rope_local_base_freq": 100.0, "sliding_window_pattern": 2,
                  "rope_scaling": {"rope_type": "linear", "factor": 4.0}}
    assert Gemma3Args.from_hf(old_gemma).sliding_layers == (True, False, True)
    for case, cfg in ((llama, old), (gemma, old_gemma)):
        _assert_close(prefill_logits(_ours(case, cfg=cfg), PROMPT_A), _hf_logits(case, PROMPT_A))


def test_missing_config_key_is_named() -> None:
    cfg = {"architectures": ["LlamaForCausalLM"], "vocab_size": 8, "hidden_size": 8, "num_hidden_layers": 1,
           "num_attention_heads": 2}
    with pytest.raises(ValueError, match="intermediate_size"):
        build_model(cfg, torch.float32)
