"""One registry of the GGUF architectures mixserve reads: per family, how llama.cpp names its tensors
(in HF terms) and which HF config keys its metadata becomes.

Adding a GGUF family is one row of `ARCH_SPECS` (plus its config function here); the mechanisms
(`gguf_names.weight_plan`, `gguf_config.gguf_hf_config`) stay family-free.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mixserve.loading.errors import CheckpointError
from mixserve.loading.gguf_names import ArchSpec


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


_DENSE = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_GEMMA3 = {**_DENSE, "post_attention_norm": "post_attention_layernorm",
           "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm"}
_MOE_MLP = {**_DENSE, "ffn_gate_inp": "mlp.gate", "ffn_gate_shexp": "mlp.shared_expert.gate_proj",
            "ffn_up_shexp": "mlp.shared_expert.up_proj", "ffn_down_shexp": "mlp.shared_expert.down_proj",
            "ffn_gate_inp_shexp": "mlp.shared_expert_gate"}
_PROJ = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}

ARCH_SPECS: dict[str, ArchSpec] = {
    "llama": ArchSpec("LlamaForCausalLM", "llama", _DENSE, permute_qk=True, config=_llama),
    "mixtral": ArchSpec("MixtralForCausalLM", "mixtral", {**_DENSE, "ffn_gate_inp": "block_sparse_moe.gate"},
                        expert_prefix="block_sparse_moe.experts.{e}",
                        expert_names={"gate": "w1", "up": "w3", "down": "w2"}, permute_qk=True,
                        config=_mixtral),
    "qwen2": ArchSpec("Qwen2ForCausalLM", "qwen2", _DENSE, config=_qwen2),
    "qwen3": ArchSpec("Qwen3ForCausalLM", "qwen3", _DENSE, config=_qwen3),
    "gemma3": ArchSpec("Gemma3ForCausalLM", "gemma3_text", _GEMMA3, norm_plus_one=True, config=_gemma3),
    "qwen2moe": ArchSpec("Qwen2MoeForCausalLM", "qwen2_moe", _MOE_MLP,
                         expert_prefix="mlp.experts.{e}", expert_names=_PROJ, config=_qwen2_moe),
    "qwen3moe": ArchSpec("Qwen3MoeForCausalLM", "qwen3_moe", _MOE_MLP,
                         expert_prefix="mlp.experts.{e}", expert_names=_PROJ, config=_qwen3_moe),
    "olmoe": ArchSpec("OlmoeForCausalLM", "olmoe", _MOE_MLP,
                      expert_prefix="mlp.experts.{e}", expert_names=_PROJ, config=_olmoe),
}
"""Keyed by GGUF `general.architecture`, except "mixtral": a llama GGUF that has experts."""


def arch_key(gguf_arch: str, metadata: Mapping[str, object]) -> str:
    """`ARCH_SPECS` key for a file: llama with `llama.expert_count > 0` is Mixtral."""
    if gguf_arch == "llama" and int(metadata.get("llama.expert_count", 0) or 0) > 0:  # type: ignore[call-overload]
        return "mixtral"
    return gguf_arch


def spec_for(path: object, gguf_arch: str, metadata: Mapping[str, object]) -> ArchSpec:
    key = arch_key(gguf_arch, metadata)
    if key not in ARCH_SPECS:
        known = sorted(k for k in ARCH_SPECS if k != "mixtral")
        raise CheckpointError(f"{path}: GGUF architecture {gguf_arch!r} is not supported; supported: {known}")
    return ARCH_SPECS[key]
