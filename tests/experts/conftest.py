"""Tiny random MoE checkpoints (HF config classes + `save_pretrained`) and their expert packs."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import tokenizers
import torch
import transformers
from safetensors.torch import load_file

from mixserve.experts.pack import dtype_plan, write_pack
from mixserve.models.base import build_model

COMMON = dict(vocab_size=128, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
              initializer_range=0.1, eos_token_id=None, bos_token_id=None, pad_token_id=0)
FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "mixtral": ("Mixtral", dict(num_hidden_layers=2, intermediate_size=32, num_local_experts=8,
                                num_experts_per_tok=2)),
    "qwen2_moe": ("Qwen2Moe", dict(num_hidden_layers=3, intermediate_size=96, moe_intermediate_size=32,
                                   shared_expert_intermediate_size=48, num_experts=8, num_experts_per_tok=2,
                                   mlp_only_layers=[1], norm_topk_prob=False)),
    "qwen3_moe": ("Qwen3Moe", dict(num_hidden_layers=3, intermediate_size=96, moe_intermediate_size=32,
                                   num_experts=6, num_experts_per_tok=2, head_dim=32, norm_topk_prob=True)),
    "olmoe": ("Olmoe", dict(num_hidden_layers=3, intermediate_size=32, num_experts=8, num_experts_per_tok=2,
                            norm_topk_prob=False)),
}


@dataclass
class Tiny:
    """A saved tiny MoE checkpoint."""

    name: str
    path: Path
    config: dict[str, Any]

    def in_memory(self, dtype: torch.dtype = torch.float32) -> Any:
        """The all-in-memory model straight from the checkpoint."""
        model: Any = build_model(self.config, dtype)
        model.load_weights((k, v.to(dtype)) for k, v in load_file(self.path / "model.safetensors").items())
        return model.eval()


def save_tiny(name: str, path: Path, seed: int = 0) -> Tiny:
    prefix, kwargs = FAMILIES[name]
    torch.manual_seed(seed)
    cfg = getattr(transformers, f"{prefix}Config")(**COMMON, **kwargs)
    hf = getattr(transformers, f"{prefix}ForCausalLM")(cfg)
    hf.save_pretrained(path)
    write_tokenizer(path, COMMON["vocab_size"])  # type: ignore[arg-type]
    return Tiny(name, path, json.loads((path / "config.json").read_text()))


def write_tokenizer(path: Path, vocab_size: int) -> None:
    """A word-level tokenizer `t0 .. t{n-1}` so LLM/CLI can load the folder."""
    vocab = {f"t{i}": i for i in range(vocab_size)}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="t1"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.decoder = tokenizers.decoders.WordPiece(prefix="##")
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "t2", "unk_token": "t1"}))


@pytest.fixture(scope="session", params=sorted(FAMILIES))
def tiny(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Tiny:
    return save_tiny(request.param, tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="session")
def olmoe(tmp_path_factory: pytest.TempPathFactory) -> Tiny:
    return save_tiny("olmoe", tmp_path_factory.mktemp("olmoe_single"))


@pytest.fixture(scope="session")
def olmoe_pack(olmoe: Tiny, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_pack(olmoe.path, tmp_path_factory.mktemp("olmoe_pack"), progress=False)


@pytest.fixture(scope="session")
def olmoe_mixed_pack(olmoe: Tiny, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Expert-wise bit widths: int4 by default, layer 1 int8, one expert bfloat16."""
    plan = dtype_plan("int4", {"1": "int8", "2.3": "bfloat16"})
    return write_pack(olmoe.path, tmp_path_factory.mktemp("olmoe_mixed"), choose=plan, progress=False)
