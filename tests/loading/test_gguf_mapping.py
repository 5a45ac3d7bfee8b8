"""GGUF -> HF names, value fixes and config, on tiny random models of every supported family.

Each model is written to GGUF the way llama.cpp's converter would (see gguf_fixtures.py) and loaded
back with `load_checkpoint`: the tensors must equal the HF state dict, the config must agree with
the HF config, and mixserve's own model built from the loaded checkpoint must give HF's logits.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from gguf import GGMLQuantizationType

from mixserve.loading.checkpoint import load_checkpoint
from tests.loading.gguf_fixtures import base_meta, checkpoint_state, write_tiny_gguf

COMMON: dict[str, Any] = dict(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5)


def _llama() -> tuple[Any, str, dict[str, Any]]:
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(**COMMON, intermediate_size=96, tie_word_embeddings=False,
                      rope_parameters={"rope_type": "default", "rope_theta": 50000.0})
    return LlamaForCausalLM(cfg), "llama", {"rope.dimension_count": 16, "vocab_size": 300}


def _qwen2() -> tuple[Any, str, dict[str, Any]]:
    from transformers import Qwen2Config, Qwen2ForCausalLM
    cfg = Qwen2Config(**COMMON, intermediate_size=96, tie_word_embeddings=True)
    return Qwen2ForCausalLM(cfg), "qwen2", {}


def _qwen3() -> tuple[Any, str, dict[str, Any]]:
    from transformers import Qwen3Config, Qwen3ForCausalLM
    cfg = Qwen3Config(**COMMON, intermediate_size=96, head_dim=32, tie_word_embeddings=False)
    return Qwen3ForCausalLM(cfg), "qwen3", {"attention.key_length": 32, "attention.value_length": 32}


def _gemma3() -> tuple[Any, str, dict[str, Any]]:
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig
    common = {**COMMON, "num_hidden_layers": 6, "num_key_value_heads": 1, "rms_norm_eps": 1e-6}
    cfg = Gemma3TextConfig(**common, intermediate_size=96, head_dim=32, query_pre_attn_scalar=32,
                           sliding_window=16)
    return Gemma3ForCausalLM(cfg), "gemma3", {"attention.key_length": 32, "attention.value_length": 32,
                                              "attention.sliding_window": 16}


def _mixtral() -> tuple[Any, str, dict[str, Any]]:
    from transformers import MixtralConfig, MixtralForCausalLM
    cfg = MixtralConfig(**COMMON, intermediate_size=48, num_local_experts=4, num_experts_per_tok=2)
    return MixtralForCausalLM(cfg), "llama", {"rope.dimension_count": 16, "vocab_size": 300,
                                              "expert_count": 4, "expert_used_count": 2}


def _qwen2_moe() -> tuple[Any, str, dict[str, Any]]:
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM
    cfg = Qwen2MoeConfig(**COMMON, intermediate_size=96, moe_intermediate_size=32,
                         shared_expert_intermediate_size=48, num_experts=4, num_experts_per_tok=2)
    return Qwen2MoeForCausalLM(cfg), "qwen2moe", {"expert_count": 4, "expert_used_count": 2,
                                                  "expert_feed_forward_length": 32,
                                                  "expert_shared_feed_forward_length": 48}


def _qwen3_moe() -> tuple[Any, str, dict[str, Any]]:
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
    cfg = Qwen3MoeConfig(**COMMON, intermediate_size=96, moe_intermediate_size=32, num_experts=4,
                         num_experts_per_tok=2, norm_topk_prob=True)
    cfg.head_dim = 32
    return Qwen3MoeForCausalLM(cfg), "qwen3moe", {"attention.key_length": 32, "attention.value_length": 32,
                                                  "expert_count": 4, "expert_used_count": 2,
                                                  "expert_feed_forward_length": 32}


def _olmoe() -> tuple[Any, str, dict[str, Any]]:
    from transformers import OlmoeConfig, OlmoeForCausalLM
    cfg = OlmoeConfig(**COMMON, intermediate_size=32, num_experts=4, num_experts_per_tok=2)
    return OlmoeForCausalLM(cfg), "olmoe", {"expert_count": 4, "expert_used_count": 2}


FAMILIES: dict[str, Callable[[], tuple[Any, str, dict[str, Any]]]] = {
    "llama": _llama, "qwen2": _qwen2, "qwen3": _qwen3, "gemma3": _gemma3, "mixtral": _mixtral,
    "qwen2_moe": _qwen2_moe, "qwen3_moe": _qwen3_moe, "olmoe": _olmoe}


def tiny_gguf(family: str, tmp_path: Path, qtype: GGMLQuantizationType = GGMLQuantizationType.F32
              ) -> tuple[Any, Path, dict[str, torch.Tensor]]:
    """(HF model, its GGUF file, its checkpoint state dict without a tied lm_head)."""
    torch.manual_seed(0)
    model, arch, extra = FAMILIES[family]()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
    model.eval()
    state = checkpoint_state(model, tmp_path / "hf")
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    meta = {**base_meta(model.config), **extra}
    return model, write_tiny_gguf(tmp_path / f"{family}.gguf", model, state, arch, meta, qtype), state


@pytest.mark.parametrize("family", list(FAMILIES))
def test_tensors_round_trip(family: str, tmp_path: Path) -> None:
    _, path, expected = tiny_gguf(family, tmp_path)
    ck = load_checkpoint(path)
    got = dict(ck.weights())
    assert sorted(got) == sorted(expected)
    for name, w in expected.items():
        assert got[name].shape == w.shape, name
        # gemma's +1/-1 round trip is not exact in float32
        torch.testing.assert_close(got[name], w, rtol=0, atol=1e-6, msg=name)


def _rope_theta(cfg: Any) -> float:
    rp = cfg.rope_parameters
    return float(rp["full_attention"]["rope_theta"] if "full_attention" in rp else rp["rope_theta"])


@pytest.mark.parametrize("family", list(FAMILIES))
def test_config_matches_hf(family: str, tmp_path: Path) -> None:
    model, path, _ = tiny_gguf(family, tmp_path)
    ours, ref = load_checkpoint(path).hf_config, model.config
    assert ours["architectures"] == [type(model).__name__]
    assert ours["model_type"] == ref.model_type
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "max_position_embeddings", "tie_word_embeddings"):
        assert ours[key] == getattr(ref, key), key
    assert ours["head_dim"] == (getattr(ref, "head_dim", None) or ref.hidden_size // ref.num_attention_heads)
    assert ours["rms_norm_eps"] == pytest.approx(ref.rms_norm_eps, rel=1e-6)
    assert ours["rope_parameters"].get("rope_theta", _rope_theta(ref)) == pytest.approx(_rope_theta(ref))
    assert ours["rope_theta"] == pytest.approx(_rope_theta(ref))
    moe_keys = {"mixtral": ("num_local_experts", "num_experts_per_tok", "intermediate_size"),
                "qwen2_moe": ("num_experts", "num_experts_per_tok", "moe_intermediate_size",
                              "shared_expert_intermediate_size", "norm_topk_prob"),
                "qwen3_moe": ("num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob"),
                "olmoe": ("num_experts", "num_experts_per_tok", "intermediate_size", "norm_topk_prob"),
                "gemma3": ("sliding_window", "query_pre_attn_scalar", "layer_types", "intermediate_size",
                           "final_logit_softcapping", "attn_logit_softcapping")}
    for key in moe_keys.get(family, ("intermediate_size",)):
        assert ours[key] == getattr(ref, key), key
    if family == "qwen3_moe":
        assert ours["num_experts"] == ours["num_local_experts"] == 4
    if family == "gemma3":
        assert ours["rope_parameters"]["sliding_attention"]["rope_theta"] == \
            ref.rope_parameters["sliding_attention"]["rope_theta"]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_mixserve_model_from_gguf_matches_hf_logits(family: str, tmp_path: Path) -> None:
    from mixserve.models.base import build_model
    from tests.harness import prefill_logits

    model, path, _ = tiny_gguf(family, tmp_path)
    ck = load_checkpoint(path)
    ours = build_model(ck.hf_config, torch.float32)
    ours.load_weights(ck.weights())  # type: ignore[operator]
    ids = [5, 17, 250, 3, 99, 42, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20]
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].float()
    torch.testing.assert_close(prefill_logits(ours, ids), ref, rtol=1e-4, atol=1e-4)


def test_quantized_tiny_gguf_is_close(tmp_path: Path) -> None:
    _, path, expected = tiny_gguf("llama", tmp_path, GGMLQuantizationType.Q8_0)
    ck = load_checkpoint(path)
    assert ck.quantization.tensor_types["Q8_0"] > 0
    got = dict(ck.weights())
    for name, w in expected.items():
        torch.testing.assert_close(got[name], w, rtol=0, atol=0.02, msg=name)


def test_gguf_tokenizer_metadata_used(tmp_path: Path) -> None:
    _, path, _ = tiny_gguf("llama", tmp_path)
    ck = load_checkpoint(path)
    assert ck.tokenizer.vocab_size == 300
    assert ck.tokenizer.bos_token_id == 257 and ck.eos_token_ids == (258,)
    assert ck.tokenizer.decode(ck.tokenizer.encode("héllo wörld"), skip_special_tokens=True) == "héllo wörld"
    assert ck.hf_config["bos_token_id"] == 257 and ck.hf_config["eos_token_id"] == 258


def test_weights_subset_and_dtype(tmp_path: Path) -> None:
    _, path, _ = tiny_gguf("mixtral", tmp_path)
    ck = load_checkpoint(path)
    names = ["model.layers.1.block_sparse_moe.experts.3.w2.weight", "model.norm.weight"]
    got = dict(ck.weights(names, dtype=torch.bfloat16))
    assert list(got) == names and all(t.dtype == torch.bfloat16 for t in got.values())
    with pytest.raises(KeyError, match="no tensors named"):
        list(ck.weights(["nope"]))
