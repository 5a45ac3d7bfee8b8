"""GGUF metadata -> an HF-style config dict, as transformers' GGUF loader and config classes build it.

Key names follow transformers 5 (`rope_parameters`) and also carry the 4.x spellings
(`rope_theta`, `rope_scaling`, `rope_local_base_freq`, `sliding_window_pattern`), so family code
written against either reads the same values. Fields a GGUF does not state take the HF config
class's default, or llama.cpp's hard-coded value where llama.cpp has one (gemma3's local rope base,
sliding-window pattern and query scale; qwen3-moe's top-k renormalisation).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mixserve.loading.errors import CheckpointError
from mixserve.loading.gguf_names import ArchSpec


def gguf_hf_config(path: object, gguf_arch: str, spec: ArchSpec, metadata: Mapping[str, Any],
                   tensor_shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
    """The HF config dict of a GGUF file (raises CheckpointError naming a missing required key)."""

    def req(key: str) -> Any:
        full = f"{gguf_arch}.{key}"
        if full not in metadata:
            raise CheckpointError(f"{path}: GGUF metadata lacks required key {full!r}")
        return _plain(metadata[full])

    def opt(key: str, default: Any = None) -> Any:
        return _plain(metadata.get(f"{gguf_arch}.{key}", default))

    num_heads = int(req("attention.head_count"))
    hidden = int(req("embedding_length"))
    head_dim = int(opt("attention.key_length", opt("rope.dimension_count", hidden // num_heads)))
    num_layers = int(req("block_count"))
    tokens = metadata.get("tokenizer.ggml.tokens")
    vocab = opt("vocab_size", len(tokens) if tokens is not None else None)
    if vocab is None and "token_embd.weight" in tensor_shapes:
        vocab = tensor_shapes["token_embd.weight"][0]
    theta = float(opt("rope.freq_base", 10000.0))
    rope = {"rope_type": "default", "rope_theta": theta, **_rope_scaling(opt)}
    config: dict[str, Any] = {
        "architectures": [spec.hf_architecture],
        "model_type": spec.model_type,
        "vocab_size": int(vocab) if vocab is not None else None,
        "hidden_size": hidden,
        "intermediate_size": int(opt("feed_forward_length", 0)) or None,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": int(opt("attention.head_count_kv", num_heads)),
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": int(opt("context_length", 2048)),
        "rms_norm_eps": float(opt("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": theta,
        "rope_parameters": rope,
        "rope_scaling": {k: v for k, v in rope.items() if k != "rope_theta"} if len(rope) > 2 else None,
        "tie_word_embeddings": "output.weight" not in tensor_shapes,
        "attention_bias": "blk.0.attn_q.bias" in tensor_shapes,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
        **_token_ids(metadata),
    }
    if spec.config is not None:
        spec.config(config, opt, tensor_shapes)
    return config


def _plain(value: Any) -> Any:
    """numpy scalars / arrays from the reader -> Python values."""
    if hasattr(value, "tolist"):
        return value.tolist()
    return value


def _rope_scaling(opt: Any) -> dict[str, Any]:
    kind = opt("rope.scaling.type")
    factor = opt("rope.scaling.factor")
    if kind in (None, "none") or factor is None:
        return {}
    out: dict[str, Any] = {"rope_type": kind, "factor": float(factor)}
    if kind == "yarn":
        original = opt("rope.scaling.original_context_length")
        if original is not None:
            out["original_max_position_embeddings"] = int(original)
    return out


def _token_ids(metadata: Mapping[str, Any]) -> dict[str, int | None]:
    def get(key: str) -> int | None:
        value = metadata.get(f"tokenizer.ggml.{key}")
        return int(value) if value is not None else None
    return {"bos_token_id": get("bos_token_id"), "eos_token_id": get("eos_token_id"),
            "pad_token_id": get("padding_token_id")}
