"""The contract every model family implements, and the architecture registry.

A family module (one file per family) defines a frozen `*Args` dataclass built from the HF config
dict, an `nn.Module` with the `CausalLM` methods below, and `load_weights`, which takes HF tensor
names (the GGUF loader translates its names to HF ones, so one weight map serves both formats).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import islice
from typing import Any, Protocol, runtime_checkable

import torch

from mixserve.layers.attention import AttentionMetadata, KVCache


class ArchitectureError(ValueError):
    """The checkpoint names an architecture mixserve does not implement."""


@dataclass(frozen=True)
class LayerKVSpec:
    """KV cache geometry of one attention layer: K is `[num_slots, num_kv_heads, k_head_size]`,
    V is `[num_slots, num_kv_heads, v_head_size]` (the two head sizes may differ)."""

    num_kv_heads: int
    """KV heads of the layer."""
    k_head_size: int
    """Channels per key head."""
    v_head_size: int
    """Channels per value head."""

    def __post_init__(self) -> None:
        if min(self.num_kv_heads, self.k_head_size, self.v_head_size) < 1:
            raise ValueError(f"invalid layer KV spec {self}: every size must be >= 1")


@dataclass(frozen=True)
class KVCacheSpec:
    """KV cache geometry of the contiguous layer range `[start, end)`, one entry per layer.

    `CausalLM.kv_cache_spec()` covers the whole model (`start == 0`, `end == num_layers`); a runner
    that owns blocks `[a, b)` allocates `spec.slice(a, b)` and passes those caches, in layer order,
    to `forward_layers(..., a, b)`.
    """

    layers: tuple[LayerKVSpec, ...]
    """Geometry of layers `start, start + 1, ...`."""
    start: int = 0
    """Index of the first layer covered."""

    def __post_init__(self) -> None:
        if self.start < 0 or not self.layers:
            raise ValueError(f"invalid KV spec: start={self.start} with {len(self.layers)} layer(s)")

    @property
    def end(self) -> int:
        """One past the last layer covered."""
        return self.start + len(self.layers)

    @staticmethod
    def uniform(num_layers: int, num_kv_heads: int, head_dim: int) -> KVCacheSpec:
        """Every layer of a `num_layers` model alike, K and V both `head_dim` wide."""
        return KVCacheSpec((LayerKVSpec(num_kv_heads, head_dim, head_dim),) * num_layers)

    def slice(self, start: int, end: int) -> KVCacheSpec:
        """The layers `[start, end)` (absolute indices, within this spec's range)."""
        if not self.start <= start < end <= self.end:
            raise ValueError(f"layer range [{start}, {end}) is empty or outside [{self.start}, {self.end})")
        return KVCacheSpec(self.layers[start - self.start:end - self.start], start)

    def bytes_per_token(self, element_size: int) -> int:
        """Bytes of K and V of one token across the covered layers."""
        return sum(s.num_kv_heads * (s.k_head_size + s.v_head_size) for s in self.layers) * element_size


@runtime_checkable
class CausalLM(Protocol):
    """A decoder-only LM over the paged KV cache, run as stages.

    `embed` -> `forward_layers(0, a)` -> `forward_layers(a, b)` -> ... -> `head` is the whole model
    (`forward` composes them); each stage may run in a different runner with its own KV caches.
    Hidden states between stages are the residual stream `[num_tokens, hidden_size]` before the
    final norm.
    """

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """`[num_tokens]` ids -> `[num_tokens, hidden_size]` input of block 0 (any embedding scale applied)."""
        ...

    def forward_layers(self, hidden: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                       kv_caches: list[KVCache], start: int, end: int) -> torch.Tensor:
        """Run blocks `[start, end)` on `[num_tokens, hidden_size]` hidden states at `[num_tokens]`
        positions; `kv_caches[i]` is the cache of layer `start + i` (`len(kv_caches) == end - start`)."""
        ...

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """`[n, hidden_size]` output of the last block -> `[n, vocab_size]` float32 logits (final norm,
        LM head and any final softcap)."""
        ...

    def kv_cache_spec(self) -> KVCacheSpec:
        """KV geometry of every layer, `[0, num_layers)`."""
        ...

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy HF-named tensors into the module; raises WeightError naming any mismatch/missing."""
        ...


def as_causal_lm(module: torch.nn.Module) -> CausalLM:
    """`module` (a family's top-level class) seen through the `CausalLM` contract."""
    if not isinstance(module, CausalLM):
        raise TypeError(f"{type(module).__name__} does not implement the CausalLM stages")
    return module


def check_layer_range(start: int, end: int, num_layers: int, kv_caches: list[KVCache]) -> None:
    """Raise ValueError unless `[start, end)` is a non-empty range of the model's layers with one
    KV cache per layer (a short cache list would silently skip blocks)."""
    if not 0 <= start < end <= num_layers or len(kv_caches) != end - start:
        raise ValueError(f"layers [{start}, {end}) of a {num_layers}-layer model need "
                         f"{max(end - start, 0)} KV caches, got {len(kv_caches)}")


def run_blocks(blocks: torch.nn.ModuleList, rotary: Any, hidden: torch.Tensor, positions: torch.Tensor,
               meta: AttentionMetadata, kv_caches: list[KVCache], start: int, end: int,
               *extra: object) -> torch.Tensor:
    """Blocks `[start, end)` of a family on `hidden`, the RoPE table computed once for the stage and
    shared by its blocks; `extra` goes to every block after the metadata (MoE: provider, observer).
    The caller checks the range (`check_layer_range`)."""
    cos_sin = rotary.cos_sin(positions)
    for layer, kv_cache in zip(islice(blocks, start, end), kv_caches):
        hidden = layer(hidden, cos_sin, kv_cache, meta, *extra)
    return hidden  # [num_tokens, hidden_size]


def whole_model(lm: CausalLM, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                kv_caches: list[KVCache], num_layers: int) -> torch.Tensor:
    """Embedding, every block, head: `[num_tokens, vocab_size]` float32 logits of every token."""
    return lm.head(lm.forward_layers(lm.embed(input_ids), positions, meta, kv_caches, 0, num_layers))


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
    "Gemma3MoeForCausalLM": ("mixserve.models.gemma3_moe", "Gemma3MoeForCausalLM"),  # mixserve's own (moefy)
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
