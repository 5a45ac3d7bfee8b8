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
from mixserve.loading.gguf_names import ArchSpec, arch_key


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
    _ARCH_EXTRAS[arch_key(gguf_arch, metadata)](config, opt, tensor_shapes)
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


def _full_attention(config: dict[str, Any]) -> None:
    n = config["num_hidden_layers"]
    config.update(use_sliding_window=False, sliding_window=None, max_window_layers=n,
                  layer_types=["full_attention"] * n)


def _llama(config: dict[str, Any], opt: Any, shapes: Mapping[str, tuple[int, ...]]) -> None:
    config.update(pretraining_tp=1, mlp_bias=False)


def _qwen2(config: dict[str, Any], opt: Any, shapes: Mapping[str, tuple[int, ...]]) -> None:
    _full_attention(config)


def _qwen3(config: dict[str, Any], opt: Any, shapes: Mapping[str, tuple[int, ...]]) -> None:
    _full_attention(config)


def _experts(config: dict[str, Any], opt: Any, shapes: Mapping[str, tuple[int, ...]]) -> tuple[int, int, int]:
    """`(num_experts, top_k, expert_intermediate_size)`, falling back on tensor shapes."""
    gate = shapes.get("blk.0.ffn_gate_exps.weight")
    num_experts = int(opt("expert_count", gate[0] if gate else 0))
    top_k = int(opt("expert_used_count", 0))
    inter = int(opt("expert_feed_forward_length", gate[1] if gate else config["intermediate_size"] or 0))
    if num_experts <= 0 or top_k <= 0:
        raise CheckpointError("MoE GGUF without expert_count / expert_used_count metadata")
    return num_experts, top_k, inter


def _mixtral(config: dict[str, Any], opt: Any, shapes: Mapping[str, tuple[int, ...]]) -> None:
    num_experts, top_k, inter = _experts(config, opt, shapes)
    config.update(num_local_experts=num_experts, num_experts_per_tok=top_k, intermediate_size=inter,
                  sliding_window=None, router_jitter_noise=0.0, output_router_logits=False)


def _qwen2_moe(config: dict[str, Any], opt: Any, shapes: Mapping[str, tuple[int, ...]]) -> None:
    num_experts, top_k, inter = _experts(config, opt, shapes)
    shared = shapes.get("blk.0.ffn_gate_shexp.weight")
    config.update(num_experts=num_experts, num_experts_per_tok=top_k, moe_intermediate_size=inter,
                  shared_expert_intermediate_size=int(opt("expert_shared_feed_forward_length",
                                                          shared[0] if shared else 0)),
                  norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[], qkv_bias=True)
    _full_attention(config)


def _qwen3_moe(config: dict[str, Any], opt: Any, shapes: Mapping[str, tuple[int, ...]]) -> None:
    num_experts, top_k, inter = _experts(config, opt, shapes)
    # llama.cpp always renormalises qwen3-moe's top-k weights (transformers' GGUF default agrees).
    config.update(num_experts=num_experts, num_local_experts=num_experts, num_experts_per_tok=top_k,
                  moe_intermediate_size=inter, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[])
    _full_attention(config)


def _olmoe(config: dict[str, Any], opt: Any, shapes: Mapping[str, tuple[int, ...]]) -> None:
    num_experts, top_k, inter = _experts(config, opt, shapes)
    config.update(num_experts=num_experts, num_experts_per_tok=top_k, intermediate_size=inter,
                  norm_topk_prob=False, clip_qkv=None)


def _gemma3(config: dict[str, Any], opt: Any, shapes: Mapping[str, tuple[int, ...]]) -> None:
    n = config["num_hidden_layers"]
    # llama.cpp: every 6th layer is global unless the file says otherwise (a period, or one bool per
    # layer, True meaning sliding); local layers use rope base 10000.
    pattern = opt("attention.sliding_window_pattern", 6)
    if isinstance(pattern, list):
        sliding = [bool(p) for p in pattern][:n]
        period = next((i + 1 for i, s in enumerate(sliding) if not s), n)
    else:
        period = int(pattern)
        sliding = [(i + 1) % period != 0 for i in range(n)]
    local_theta = float(opt("rope.freq_base_swa", 10000.0))
    full = dict(config["rope_parameters"])
    # llama.cpp: query scale 1/sqrt(head_dim), except the 62-layer 27B which uses hidden/heads.
    scalar = config["hidden_size"] // config["num_attention_heads"] if n == 62 else config["head_dim"]
    config.update(
        hidden_act="gelu_pytorch_tanh", hidden_activation="gelu_pytorch_tanh",
        query_pre_attn_scalar=scalar, sliding_window=int(opt("attention.sliding_window", 4096)),
        sliding_window_pattern=period, _sliding_window_pattern=period,
        layer_types=["sliding_attention" if s else "full_attention" for s in sliding],
        rope_local_base_freq=local_theta,
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": local_theta},
                         "full_attention": full},
        final_logit_softcapping=opt("final_logit_softcapping"),
        attn_logit_softcapping=opt("attn_logit_softcapping"), use_bidirectional_attention=False)


_ARCH_EXTRAS = {"llama": _llama, "mixtral": _mixtral, "qwen2": _qwen2, "qwen3": _qwen3, "gemma3": _gemma3,
                "qwen2moe": _qwen2_moe, "qwen3moe": _qwen3_moe, "olmoe": _olmoe}
