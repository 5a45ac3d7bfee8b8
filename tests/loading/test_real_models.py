"""The embedded GGUF models against transformers' own GGUF loader: config fields and tensors
(dequantized, renamed, q/k un-permuted for llama, Gemma norms minus one)."""

from __future__ import annotations

import time
from typing import Any

import pytest
import torch

from mixserve.loading.checkpoint import Checkpoint

pytestmark = pytest.mark.slow  # transformers' reference load takes 30 s - 2 min per model


def _theta(config: Any, kind: str | None = None) -> float:
    rp = config.rope_parameters
    return float((rp[kind] if kind else rp)["rope_theta"])


def _compare_tensors(ck: Checkpoint, reference: dict[str, torch.Tensor]) -> None:
    ours = dict(ck.weights())
    assert set(ours) == set(reference) - {"lm_head.weight"}  # tied: no lm_head in the file
    for name, ref in reference.items():
        if name in ours:
            assert ours[name].shape == ref.shape, name
            torch.testing.assert_close(ours[name], ref.float(), rtol=0, atol=1e-6, msg=name)


def test_smollm2_matches_transformers(smollm2_checkpoint: Checkpoint, smollm2_hf_reference) -> None:
    ref_config, tensors = smollm2_hf_reference
    cfg = smollm2_checkpoint.hf_config
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == ref_config.model_type
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "max_position_embeddings", "tie_word_embeddings",
                "rms_norm_eps", "bos_token_id", "eos_token_id", "pad_token_id", "hidden_act"):
        assert cfg[key] == getattr(ref_config, key), key
    assert cfg["rope_theta"] == _theta(ref_config) == 100000.0
    _compare_tensors(smollm2_checkpoint, tensors)


def test_gemma3_matches_transformers(gemma3_checkpoint: Checkpoint, gemma3_hf_reference) -> None:
    ref_config, tensors = gemma3_hf_reference
    cfg = gemma3_checkpoint.hf_config
    assert cfg["architectures"] == ["Gemma3ForCausalLM"] and cfg["model_type"] == "gemma3_text"
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "max_position_embeddings", "tie_word_embeddings",
                "rms_norm_eps", "bos_token_id", "eos_token_id", "pad_token_id", "sliding_window",
                "layer_types", "query_pre_attn_scalar", "final_logit_softcapping", "attn_logit_softcapping",
                "hidden_activation"):
        assert cfg[key] == getattr(ref_config, key), key
    assert cfg["rope_parameters"]["full_attention"]["rope_theta"] == _theta(ref_config, "full_attention")
    assert cfg["rope_local_base_freq"] == _theta(ref_config, "sliding_attention") == 10000.0
    _compare_tensors(gemma3_checkpoint, tensors)


def test_load_timings(smollm2_gguf, gemma3_gguf) -> None:
    """Not a benchmark: a guard that loading stays in seconds (printed with -s)."""
    from mixserve.loading.checkpoint import load_checkpoint

    for path in (smollm2_gguf, gemma3_gguf):
        start = time.perf_counter()
        ck = load_checkpoint(path)
        opened = time.perf_counter() - start
        num = sum(t.numel() for _, t in ck.weights())
        total = time.perf_counter() - start
        print(f"{path.name}: open {opened:.2f}s, all weights {total:.2f}s, {num / 1e6:.0f}M params")
        assert total < 120
