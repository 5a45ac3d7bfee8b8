"""A random-initialised OLMoE-shaped HF checkpoint for the MoE memory-budget benchmark.

Written layer by layer, one safetensors shard per decoder layer plus an index, so a multi-GB model
never sits in memory twice (at most one layer, ~0.8 GB at OLMoE width, is held). Experts use the
fused HF 5.x layout (`mlp.experts.gate_up_proj` `[E, 2*inter, hidden]`, `mlp.experts.down_proj`
`[E, hidden, inter]`), which the OLMoE loader reads and which gives each expert two contiguous
regions in the file (the fairest layout for the plain-mmap baseline).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm


@dataclass(frozen=True)
class MoeShape:
    """OLMoE-style config values (defaults: OLMoE-1B-7B, 16 layers, ~12.9 GB of bf16 experts)."""

    num_hidden_layers: int = 16
    hidden_size: int = 2048
    intermediate_size: int = 1024
    num_experts: int = 64
    num_experts_per_tok: int = 8
    num_attention_heads: int = 16
    vocab_size: int = 50304

    def expert_nbytes(self) -> int:
        """bf16 bytes of all experts."""
        return self.num_hidden_layers * self.num_experts * 3 * self.hidden_size * self.intermediate_size * 2

    def hf_config(self) -> dict[str, object]:
        return {"architectures": ["OlmoeForCausalLM"], "model_type": "olmoe", **asdict(self),
                "num_key_value_heads": self.num_attention_heads, "hidden_act": "silu",
                "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
                "norm_topk_prob": False, "tie_word_embeddings": False, "clip_qkv": None,
                "torch_dtype": "bfloat16"}


def _rand(*shape: int, std: float = 0.02, gen: torch.Generator) -> torch.Tensor:
    return (torch.randn(*shape, generator=gen) * std).to(torch.bfloat16)


def _layer(i: int, s: MoeShape, gen: torch.Generator) -> dict[str, torch.Tensor]:
    h, inter, e = s.hidden_size, s.intermediate_size, s.num_experts
    p = f"model.layers.{i}."
    out = {p + f"self_attn.{n}_proj.weight": _rand(h, h, gen=gen) for n in ("q", "k", "v", "o")}
    out[p + "self_attn.q_norm.weight"] = torch.ones(h, dtype=torch.bfloat16)
    out[p + "self_attn.k_norm.weight"] = torch.ones(h, dtype=torch.bfloat16)
    out[p + "input_layernorm.weight"] = torch.ones(h, dtype=torch.bfloat16)
    out[p + "post_attention_layernorm.weight"] = torch.ones(h, dtype=torch.bfloat16)
    out[p + "mlp.gate.weight"] = _rand(e, h, std=0.1, gen=gen)
    gate_up = torch.empty(e, 2 * inter, h, dtype=torch.bfloat16)
    down = torch.empty(e, h, inter, dtype=torch.bfloat16)
    for j in range(e):  # expert by expert: float32 temporaries stay small
        gate_up[j] = _rand(2 * inter, h, gen=gen)
        down[j] = _rand(h, inter, gen=gen)
    out[p + "mlp.experts.gate_up_proj"] = gate_up
    out[p + "mlp.experts.down_proj"] = down
    return out


def build_checkpoint(out: Path, shape: MoeShape, seed: int = 0) -> Path:
    """Write the checkpoint into `out` (skipped when a complete one with the same shape is there)."""
    config_path = out / "config.json"
    if config_path.is_file() and json.loads(config_path.read_text()) == shape.hf_config():
        return out
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    weight_map: dict[str, str] = {}
    shards = ["embed"] + list(range(shape.num_hidden_layers)) + ["head"]
    for shard in tqdm(shards, desc=f"random checkpoint {out.name}", unit="shard"):
        if shard == "embed":
            tensors = {"model.embed_tokens.weight": _rand(shape.vocab_size, shape.hidden_size, gen=gen)}
        elif shard == "head":
            tensors = {"lm_head.weight": _rand(shape.vocab_size, shape.hidden_size, gen=gen),
                       "model.norm.weight": torch.ones(shape.hidden_size, dtype=torch.bfloat16)}
        else:
            tensors = _layer(int(shard), shape, gen)
        name = f"model-{shard}.safetensors"
        save_file(tensors, str(out / name))
        weight_map.update({k: name for k in tensors})
        del tensors
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config_path.write_text(json.dumps(shape.hf_config(), indent=1))  # last: marks the folder complete
    return out
