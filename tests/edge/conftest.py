"""Tiny random split models (a dense llama and an MoE) with the pieces both sides need."""

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

from mixserve.edge.cloud import CloudContextManager, CloudService
from mixserve.edge.codec import Codec
from mixserve.edge.config import CloudConfig, EdgeConfig
from mixserve.edge.edge import EdgeRunner
from mixserve.edge.frames import model_key
from mixserve.edge.link import LinkError, LocalLink
from mixserve.models.base import build_model

NUM_LAYERS = 4
PROMPT = [5, 17, 99, 3, 250, 42, 42, 7, 128, 64, 1]
CONFIGS: dict[str, Any] = {
    "llama": lambda: transformers.LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=NUM_LAYERS,
        num_attention_heads=4, num_key_value_heads=2, initializer_range=0.15, tie_word_embeddings=False),
    # Sliding-window layers (window < prompt), final softcap, different RoPE per layer type.
    "gemma3": lambda: transformers.Gemma3TextConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=NUM_LAYERS, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, sliding_window=5, final_logit_softcapping=3.0, initializer_range=0.15,
        layer_types=["sliding_attention", "full_attention"] * 2, tie_word_embeddings=False),
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(
        vocab_size=256, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        num_hidden_layers=NUM_LAYERS, intermediate_size=96, moe_intermediate_size=32, num_experts=4,
        num_experts_per_tok=2, initializer_range=0.15),
}


def write_tokenizer(path: Path, vocab_size: int) -> None:
    """A word-level tokenizer `t0 .. t{n-1}` (eos `t2`) so the CLI and `EdgeLLM` can load the folder."""
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t1"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.decoder = tokenizers.decoders.WordPiece(prefix="##")
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "t2", "unk_token": "t1"}))


@dataclass
class Split:
    model: Any
    cfg: dict[str, Any]
    path: Path

    def cloud(self, split_layer: int, **kw: Any) -> CloudService:
        manager = CloudContextManager(self.model, CloudConfig(split_layer=split_layer, **kw))
        return CloudService(manager, model_key(self.cfg, split_layer), int(self.cfg["hidden_size"]))

    def edge(self, service: CloudService | None, split_layer: int, tau: float,
             codec: Codec = Codec.FP32, **kw: Any) -> tuple[EdgeRunner, LocalLink | None]:
        link = None if service is None else LocalLink(service)

        def connect() -> LocalLink:
            if link is None or not link.up:
                raise LinkError("connection refused")
            return link

        config = EdgeConfig(split_layer=split_layer, exit_threshold=tau, codec=codec, max_len=64, **kw)
        return EdgeRunner(self.model, self.cfg, config, None if link is None else connect), link


def make_split(name: str, path: Path) -> Split:
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(CONFIGS[name]())
    hf.save_pretrained(path)
    write_tokenizer(path, 256)
    cfg = json.loads((path / "config.json").read_text())
    model: Any = build_model(cfg, torch.float32)
    model.load_weights(load_file(path / "model.safetensors").items())
    return Split(model.eval(), cfg, path)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def split(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Split:
    return make_split(request.param, tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Split:
    return make_split("llama", tmp_path_factory.mktemp("llama"))
