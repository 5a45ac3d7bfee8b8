"""The contract every model family implements, and the architecture registry.

A family module (one file per family) defines a frozen `*Args` dataclass built from the HF config
dict, an `nn.Module` with the `CausalLM` methods below, and `load_weights`, which takes HF tensor
names (the GGUF loader translates its names to HF ones, so one weight map serves both formats).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from typing import Any, Protocol

import torch

from mixserve.layers.attention import AttentionMetadata, KVCache


class ArchitectureError(ValueError):
    """The checkpoint names an architecture mixserve does not implement."""


class CausalLM(Protocol):
    """A decoder-only LM over the paged KV cache."""

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                kv_caches: list[KVCache]) -> torch.Tensor:
        """`[num_tokens]` ids and positions -> `[num_tokens, hidden_size]` final hidden states."""
        ...

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """`[n, hidden_size]` -> `[n, vocab_size]` float32 logits (final softcap included)."""
        ...

    def kv_cache_shapes(self) -> list[tuple[int, int]]:
        """`(num_kv_heads, head_dim)` for each attention layer, in the order of `kv_caches`."""
        ...

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy HF-named tensors into the module; raises WeightError naming any mismatch/missing."""
        ...


class WeightError(ValueError):
    """A checkpoint tensor is missing, unexpected, or has the wrong shape (the message names it)."""


_REGISTRY: dict[str, tuple[str, str]] = {
    "LlamaForCausalLM": ("mixserve.models.llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("mixserve.models.llama", "LlamaForCausalLM"),
    "Qwen2ForCausalLM": ("mixserve.models.qwen2", "Qwen2ForCausalLM"),
    "Qwen3ForCausalLM": ("mixserve.models.qwen3", "Qwen3ForCausalLM"),
    "Gemma3ForCausalLM": ("mixserve.models.gemma3", "Gemma3ForCausalLM"),
    "MixtralForCausalLM": ("mixserve.models.mixtral", "MixtralForCausalLM"),
    "Qwen2MoeForCausalLM": ("mixserve.models.qwen2_moe", "Qwen2MoeForCausalLM"),
    "Qwen3MoeForCausalLM": ("mixserve.models.qwen3_moe", "Qwen3MoeForCausalLM"),
    "OlmoeForCausalLM": ("mixserve.models.olmoe", "OlmoeForCausalLM"),
}


def supported_architectures() -> list[str]:
    return sorted(_REGISTRY)


def model_class(hf_config: dict[str, Any]) -> type:
    """The module class for `hf_config["architectures"][0]`."""
    archs = hf_config.get("architectures") or []
    if not archs:
        raise ArchitectureError("config.json has no 'architectures' field; cannot pick a model family")
    arch = archs[0]
    if arch not in _REGISTRY:
        raise ArchitectureError(
            f"unknown architecture {arch!r}; supported: {', '.join(supported_architectures())}")
    module_name, class_name = _REGISTRY[arch]
    return getattr(importlib.import_module(module_name), class_name)


def build_model(hf_config: dict[str, Any], dtype: torch.dtype) -> torch.nn.Module:
    """Instantiate (uninitialised weights) the family for `hf_config` in `dtype`."""
    cls = model_class(hf_config)
    with torch.device("cpu"):
        model = cls(hf_config)
    return model.to(dtype)
