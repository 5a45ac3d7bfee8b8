"""Tiny random models of the RoPE families (built from transformers' config classes, no weights on
disk) and a toy block pool + KV caches to run hogwild segments over."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import transformers

from mixserve.engine.block_pool import BlockPool
from mixserve.hogwild.forward import ViewModel
from mixserve.hogwild.segments import SegmentPool
from mixserve.models.base import as_causal_lm, build_model
from mixserve.runner.model_runner import allocate_kv_caches

VOCAB = 256
COMMON: dict[str, Any] = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2)

FAMILIES: dict[str, tuple[type, str, dict[str, Any]]] = {
    "llama": (transformers.LlamaConfig, "LlamaForCausalLM", dict(
        head_dim=32, tie_word_embeddings=False,
        rope_parameters={"rope_type": "llama3", "rope_theta": 50000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 16})),
    "qwen2": (transformers.Qwen2Config, "Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
    "qwen3": (transformers.Qwen3Config, "Qwen3ForCausalLM", dict(
        head_dim=24, use_sliding_window=True, sliding_window=5, max_window_layers=1)),
    # Sliding window smaller than a segment and than the views: masks cross segment boundaries.
    "gemma3": (transformers.Gemma3TextConfig, "Gemma3ForCausalLM", dict(
        head_dim=32, query_pre_attn_scalar=24, sliding_window=5, final_logit_softcapping=3.0,
        layer_types=["sliding_attention", "full_attention"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
                         "full_attention": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}})),
}


def tiny_model(family: str) -> torch.nn.Module:
    """Our module for a random config of `family`, float32, weights ~ N(0, 0.15) (norms near 1)."""
    config_cls, arch, extra = FAMILIES[family]
    cfg = config_cls(**COMMON, **extra).to_dict()
    cfg["architectures"] = [arch]
    model = build_model(cfg, torch.float32)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            base = 1.0 if param.dim() == 1 else 0.0
            param.copy_(base + torch.randn(param.shape, generator=gen) * (0.2 if param.dim() == 1 else 0.15))
    return model.eval()


class Rig:
    """A model, a block pool and KV caches for `num_blocks` blocks of `block_size`."""

    def __init__(self, model: torch.nn.Module, num_blocks: int = 64, block_size: int = 4) -> None:
        self.model = model
        self.pool = BlockPool(num_blocks)
        self.segments = SegmentPool(self.pool, block_size)
        spec = as_causal_lm(model).kv_cache_spec()
        self.vm = ViewModel.of(model, allocate_kv_caches(spec, num_blocks, block_size, torch.float32))


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_model(request: pytest.FixtureRequest) -> tuple[str, torch.nn.Module]:
    return request.param, tiny_model(request.param)
