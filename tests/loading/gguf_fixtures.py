"""Writing tiny GGUF files from tiny transformers models, the way llama.cpp's converter does.

Independent of mixserve's GGUF->HF mapping: HF->GGUF names come from `gguf.get_tensor_name_map`,
and the value changes are llama.cpp's own (`convert_hf_to_gguf.py`): q/k permuted for llama's
interleaved rope, Gemma norms stored `+1`, stacked `[num_experts, ...]` expert tensors, Qwen2-MoE's
shared-expert gate squeezed. Loading the file back must give the HF state dict exactly (F32).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from gguf import MODEL_ARCH, MODEL_ARCH_NAMES, GGMLQuantizationType, get_tensor_name_map


def byte_level_tokens(vocab_size: int) -> list[str]:
    """A byte-level vocabulary of `vocab_size`: the 256 byte symbols, 3 specials, then fillers."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    tokens = list(bytes_to_unicode().values())
    tokens += ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokens += [f"tok{i}" for i in range(vocab_size - len(tokens))]
    return tokens[:vocab_size]


def llama_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's `LlamaModel.permute` (HF half-split rope rows -> interleaved)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _arch(name: str) -> MODEL_ARCH:
    return next(a for a, n in MODEL_ARCH_NAMES.items() if n == name)


def gguf_tensors(state: dict[str, torch.Tensor], gguf_arch: str, cfg: Any) -> dict[str, np.ndarray]:
    """HF state dict -> GGUF-named numpy tensors (experts stacked, llama.cpp fixes applied)."""
    name_map = get_tensor_name_map(_arch(gguf_arch), cfg.num_hidden_layers)
    out: dict[str, np.ndarray] = {}
    experts: dict[str, dict[int, torch.Tensor]] = {}
    for hf_name, w in state.items():
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        w = w.detach().float()
        m = re.match(r"(.*\.experts)\.(\d+)\.(\w+)\.weight$", hf_name)
        if m:  # stack per-expert weights under the name of the stacked module
            experts.setdefault(f"{m.group(1)}.{m.group(3)}", {})[int(m.group(2))] = w
            continue
        base, suffix = hf_name.rsplit(".", 1)
        g = name_map.get_name(base)
        assert g is not None, hf_name
        if gguf_arch == "llama" and g.endswith((".attn_q", ".attn_k")):
            heads = cfg.num_attention_heads if g.endswith(".attn_q") else cfg.num_key_value_heads
            w = llama_permute(w, heads)
        if gguf_arch == "gemma3" and "norm" in g:
            w = w + 1.0
        if g.endswith("ffn_gate_inp_shexp"):
            w = w.reshape(-1)
        out[f"{g}.{suffix}"] = w.numpy()
    for base, by_index in experts.items():
        g = name_map.get_name(base)
        assert g is not None, base
        out[f"{g}.weight"] = torch.stack([by_index[i] for i in sorted(by_index)]).numpy()
    return out


def checkpoint_state(model: Any, folder: Path) -> dict[str, torch.Tensor]:
    """The state dict as an HF checkpoint stores it (transformers 5 fuses experts in memory and
    splits them per expert again on save)."""
    from safetensors.torch import load_file

    model.save_pretrained(folder)
    state: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        state.update(load_file(f))
    return state


def write_tiny_gguf(path: Path, model: Any, state: dict[str, torch.Tensor], gguf_arch: str,
                    meta: dict[str, Any], qtype: GGMLQuantizationType = GGMLQuantizationType.F32,
                    chat_template: str | None = None) -> Path:
    """Write `model` (its checkpoint `state`) as a GGUF with metadata `meta` (keys without `{arch}.`)."""
    cfg = model.config
    writer = gguf.GGUFWriter(str(path), gguf_arch)
    for key, value in meta.items():
        full = f"{gguf_arch}.{key}"
        if isinstance(value, bool):
            writer.add_bool(full, value)
        elif isinstance(value, int):
            writer.add_uint32(full, value)
        elif isinstance(value, float):
            writer.add_float32(full, value)
        else:
            writer.add_key_value(full, value, gguf.GGUFValueType.STRING)
    tokens = byte_level_tokens(cfg.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t.startswith("<|") else 1 for t in tokens])
    writer.add_token_merges([])
    writer.add_bos_token_id(257)
    writer.add_eos_token_id(258)
    if chat_template is not None:
        writer.add_chat_template(chat_template)
    for name, arr in gguf_tensors(state, gguf_arch, cfg).items():
        if qtype == GGMLQuantizationType.F32 or arr.ndim == 1:
            writer.add_tensor(name, arr.astype(np.float32))
        else:
            writer.add_tensor(name, gguf.quants.quantize(arr.astype(np.float32), qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def base_meta(cfg: Any) -> dict[str, Any]:
    """The metadata keys llama.cpp writes for every decoder."""
    return {
        "context_length": cfg.max_position_embeddings, "embedding_length": cfg.hidden_size,
        "block_count": cfg.num_hidden_layers, "feed_forward_length": cfg.intermediate_size,
        "attention.head_count": cfg.num_attention_heads, "attention.head_count_kv": cfg.num_key_value_heads,
        "attention.layer_norm_rms_epsilon": float(cfg.rms_norm_eps),
        "rope.freq_base": float(cfg.rope_parameters["rope_theta"] if "rope_theta" in cfg.rope_parameters
                                else cfg.rope_parameters["full_attention"]["rope_theta"]),
    }
