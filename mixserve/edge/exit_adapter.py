"""An optional exit adapter: a linear map fitted on CPU that makes layer K's hidden state look like the
last layer's before the model's own final norm + LM head read it (`mixserve edge fit-exit`).

    exit_logits(h_K) = head(x W + b),   x = h_K / rms(h_K)

`W, b` come from ridge regression (closed form) of the whole model's last hidden state, also scaled to
unit RMS, on layer K's, over positions of sequences the whole model generates itself (self-distillation:
no data set needed). With `W = I, b = 0` it is the default exit head up to the norm's scale invariance.
Agreement (exit head's top-1 == the whole model's) is measured on held-out sequences for both heads and
saved with the adapter.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from mixserve.edge.frames import model_key
from mixserve.edge.stage import SequenceStage
from mixserve.models.base import CausalLM


@dataclass(frozen=True)
class FitConfig:
    """How `fit_exit_adapter` collects positions and fits."""

    max_tokens: int = 64
    """Tokens the whole model samples after each prompt."""
    temperature: float = 0.8
    """Sampling temperature of those continuations (diversity of the fitted positions)."""
    ridge: float = 1.0
    """L2 penalty of the regression (on unit-RMS features)."""
    holdout: float = 0.25
    """Share of the sequences kept out of the fit to measure agreement."""
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_tokens < 1 or self.temperature <= 0 or self.ridge < 0 or not 0 < self.holdout < 1:
            raise ValueError(f"invalid fit config {self}")


def _unit_rms(h: torch.Tensor) -> torch.Tensor:
    return h / h.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()


class ExitAdapter:
    """`[n, hidden_size]` layer-K hidden states -> exit logits through the model's own head."""

    def __init__(self, model: CausalLM, weight: torch.Tensor, bias: torch.Tensor, meta: dict[str, Any]) -> None:
        self.model = model
        self.weight = weight
        self.bias = bias
        self.meta = meta

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        x = _unit_rms(hidden.float())
        return self.model.head((x @ self.weight + self.bias).to(hidden.dtype))

    def save(self, path: str | Path) -> None:
        save_file({"weight": self.weight.contiguous(), "bias": self.bias.contiguous()}, str(path),
                  metadata={k: json.dumps(v) for k, v in self.meta.items()})

    @staticmethod
    def load(path: str | Path, model: CausalLM, hf_config: dict[str, Any], split_layer: int) -> ExitAdapter:
        """Read an adapter; refuses one fitted for another model or split layer."""
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
        want = f"{model_key(hf_config, split_layer):016x}"
        if meta.get("model_key") != want:
            raise ValueError(f"{path}: exit adapter for model key {meta.get('model_key')} (split layer "
                             f"{meta.get('split_layer')}), this edge runs {want} (split layer {split_layer})")
        tensors = load_file(str(path))
        return ExitAdapter(model, tensors["weight"], tensors["bias"], meta)


@torch.inference_mode()
def collect(model: CausalLM, prompts: list[list[int]], split_layer: int, config: FitConfig,
            progress: Callable[[int, int], None] | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per sequence: layer-K inputs and last-layer outputs `[positions, hidden_size]` while the whole model
    samples `max_tokens` after the prompt."""
    num_layers = model.kv_cache_spec().end
    gen = torch.Generator().manual_seed(config.seed)
    out = []
    for prompt in prompts:
        n = len(prompt) + config.max_tokens
        lower = SequenceStage(model, 0, split_layer, n, torch.float32)
        upper = SequenceStage(model, split_layer, num_layers, n, torch.float32)
        xs, ys, ids = [], [], prompt
        for _ in range(config.max_tokens):
            x = lower.forward(token_ids=ids)
            y = upper.forward(hidden=x)
            xs.append(x.float())
            ys.append(y.float())
            probs = torch.softmax(model.head(y[-1:])[0] / config.temperature, -1)
            ids = [int(torch.multinomial(probs, 1, generator=gen))]
        out.append((torch.cat(xs), torch.cat(ys)))
        if progress is not None:
            progress(len(out), len(prompts))
    return out


@torch.inference_mode()
def agreement(model: CausalLM, head: Any, xs: torch.Tensor, ys: torch.Tensor) -> float:
    """Share of positions where `head(x)`'s top-1 equals the whole model's (`head` of the last layer)."""
    hits = 0
    for i in range(0, xs.shape[0], 512):
        want = model.head(ys[i:i + 512]).argmax(-1)
        hits += int((head(xs[i:i + 512]).argmax(-1) == want).sum())
    return hits / max(xs.shape[0], 1)


def fit_exit_adapter(model: CausalLM, hf_config: dict[str, Any], split_layer: int, prompts: list[list[int]],
                     config: FitConfig, progress: Callable[[int, int], None] | None = None) -> ExitAdapter:
    """Collect positions, fit `W, b` by ridge regression, and measure both heads on held-out sequences."""
    seqs = collect(model, prompts, split_layer, config, progress)
    num_test = max(1, int(len(seqs) * config.holdout))
    train, test = seqs[num_test:], seqs[:num_test]
    if not train:
        raise ValueError(f"fit-exit needs at least 2 prompts, got {len(prompts)}")
    x = _unit_rms(torch.cat([s[0] for s in train])).double()
    y = _unit_rms(torch.cat([s[1] for s in train])).double()
    xa = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], 1)  # bias column
    gram = xa.T @ xa + config.ridge * torch.eye(xa.shape[1], dtype=x.dtype)
    solution = torch.linalg.solve(gram, xa.T @ y)
    weight, bias = solution[:-1].float(), solution[-1].float()
    test_x, test_y = torch.cat([s[0] for s in test]), torch.cat([s[1] for s in test])
    adapter = ExitAdapter(model, weight, bias, {})
    adapter.meta = {"model_key": f"{model_key(hf_config, split_layer):016x}", "split_layer": split_layer,
                    "num_train_positions": int(x.shape[0]), "num_test_positions": int(test_x.shape[0]),
                    "agreement_default_head": agreement(model, model.head, test_x, test_y),
                    "agreement_adapter": agreement(model, adapter, test_x, test_y), "fit": config.__dict__}
    return adapter


def default_path(model_path: str | Path, split_layer: int) -> Path:
    """Beside the model: `<file>.exit<K>.safetensors` for a GGUF, `<folder>/exit<K>.safetensors` for HF."""
    p = Path(model_path)
    name = f"exit{split_layer}.safetensors"
    return p / name if p.is_dir() else p.with_name(f"{p.name}.{name}")
