"""Reading HF `config.json` dicts: the helpers every family's `*Args.from_hf` shares.

Errors are `ValueError`s that name the family and the key, e.g. "qwen2 config is missing required key
'vocab_size'". Rope parameters are read from both spellings: HF 5.x nests theta and scaling under
`rope_parameters`, 4.x has top-level `rope_theta` and `rope_scaling`.
"""

from __future__ import annotations

from typing import Any


def require(cfg: dict[str, Any], key: str, family: str) -> Any:
    """`cfg[key]`, or ValueError naming `family` and `key` when it is absent or None."""
    if cfg.get(key) is None:
        raise ValueError(f"{family} config is missing required key {key!r}")
    return cfg[key]


def require_silu(cfg: dict[str, Any], family: str) -> None:
    """ValueError unless `hidden_act` is absent or 'silu' (SwiGLU MLPs and experts)."""
    if cfg.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{family}: unsupported hidden_act {cfg['hidden_act']!r} (only 'silu')")


def rope(cfg: dict[str, Any], default_theta: float) -> tuple[float, dict[str, Any] | None]:
    """(RoPE base, scaling parameters or None) from HF 5.x `rope_parameters` or 4.x
    `rope_theta`/`rope_scaling`; `default_theta` when neither states the base."""
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling")
    theta = (cfg.get("rope_parameters") or {}).get("rope_theta", cfg.get("rope_theta", default_theta))
    return float(theta), dict(params) if params else None


def num_experts(cfg: dict[str, Any], family: str, key: str, alias: str) -> int:
    """Experts per MoE layer from `key` (or its `alias`); ValueError naming `key` when both are absent."""
    value = cfg.get(key, cfg.get(alias))
    if value is None:
        raise ValueError(f"{family} config is missing required key {key!r}")
    return int(value)


def sparse_layer_ids(cfg: dict[str, Any], num_layers: int, num_experts: int) -> tuple[int, ...]:
    """Layers with a sparse MoE: `i not in mlp_only_layers` and `(i + 1) % decoder_sparse_step == 0`
    (Qwen-MoE rule); none when `num_experts` is 0."""
    step = int(cfg.get("decoder_sparse_step") or 1)
    mlp_only = set(cfg.get("mlp_only_layers") or [])
    return tuple(i for i in range(num_layers) if i not in mlp_only and num_experts > 0 and (i + 1) % step == 0)


def window_layers(cfg: dict[str, Any], num_layers: int, window: int | None, family: str) -> tuple[bool, ...]:
    """Which layers use the window: `layer_types` when given, else layers from `max_window_layers` on
    (Qwen2/Qwen3); all False without a window."""
    if window is None:
        return (False,) * num_layers
    types = cfg.get("layer_types")
    if types is not None:
        if len(types) != num_layers:
            raise ValueError(f"{family}: layer_types has {len(types)} entries for {num_layers} layers")
        return tuple(t == "sliding_attention" for t in types)
    first = int(cfg.get("max_window_layers", 28))
    return tuple(i >= first for i in range(num_layers))


def attention_shape(cfg: dict[str, Any], family: str, default_head_dim: int | None = None
                    ) -> tuple[int, int, int, int]:
    """(hidden_size, num_attention_heads, num_key_value_heads, head_dim); KV heads default to the query
    heads, head_dim to `default_head_dim` or else `hidden_size // num_attention_heads`."""
    num_heads = int(require(cfg, "num_attention_heads", family))
    hidden_size = int(require(cfg, "hidden_size", family))
    head_dim = cfg.get("head_dim") or default_head_dim or hidden_size // num_heads
    return hidden_size, num_heads, int(cfg.get("num_key_value_heads") or num_heads), int(head_dim)
