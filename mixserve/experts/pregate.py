"""Pre-gating router (Read-ME): every MoE layer's experts for a step, known before the backbone runs.

A linear predictor per MoE layer maps the FIRST MoE layer's input (the token embedding after one
attention block: the earliest state that sees context) to scores over that layer's experts. It is fitted
in closed form (ridge regression onto the one-hot top-k routing) when `moefy` writes a model, from the
recorded calibration traffic, and saved next to the checkpoint as `pregate.safetensors`
(`weight` `[num_layers, num_experts, hidden_size]`, `layer_ids` `[num_layers]`).

The budgeted provider calls `predict_step` once per step, at the first MoE layer, and starts reading
every layer's predicted experts at once (instead of one layer ahead, as `RouterLookahead` and
`AffinityPredictor` do); its per-layer recall counters score the guesses.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch
from safetensors.torch import load_file, save_file

from mixserve.experts.predict import _ranked_union

PREGATE_FILE = "pregate.safetensors"


class StepPredictor(Protocol):
    """Predicts the experts of every MoE layer of a step from the first MoE layer's input."""

    def predict_step(self, x: torch.Tensor) -> dict[int, list[int]]:
        """`[num_tokens, hidden_size]` first-MoE-layer input -> MoE layer -> ranked expert ids."""
        ...


class PreGate:
    """Linear per-layer scores from the first MoE layer's input (see the module docstring)."""

    def __init__(self, weight: torch.Tensor, layer_ids: list[int], top_m: int) -> None:
        """`weight` `[num_layers, num_experts, hidden_size]`; `top_m`: experts kept per token and layer."""
        if weight.dim() != 3 or weight.shape[0] != len(layer_ids):
            raise ValueError(f"pre-gate weight {list(weight.shape)} does not match {len(layer_ids)} layers")
        if top_m < 1:
            raise ValueError(f"pre-gate top_m must be >= 1, got {top_m}")
        self.weight = weight.float()
        self.layer_ids = list(layer_ids)
        self.top_m = top_m

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """`[num_tokens, hidden_size]` -> `[num_layers, num_tokens, num_experts]`."""
        return torch.einsum("th,leh->lte", x.float(), self.weight)

    def predict_step(self, x: torch.Tensor) -> dict[int, list[int]]:
        scores = self.scores(x)
        return {layer_idx: _ranked_union(scores[i], self.top_m) for i, layer_idx in enumerate(self.layer_ids)}

    def save(self, folder: str | Path) -> None:
        save_file({"weight": self.weight.contiguous(), "layer_ids": torch.tensor(self.layer_ids)},
                  str(Path(folder) / PREGATE_FILE))

    @staticmethod
    def load(folder: str | Path, top_m: int) -> PreGate:
        path = Path(folder) / PREGATE_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no pre-gating router (written by `mixserve moefy`)")
        tensors = load_file(str(path))
        return PreGate(tensors["weight"], tensors["layer_ids"].tolist(), top_m)


def fit_pregate(x0: torch.Tensor, routes: list[torch.Tensor], num_experts: int, ridge: float = 1e-2
                ) -> torch.Tensor:
    """Ridge regression from `x0` `[num_tokens, hidden_size]` onto each layer's one-hot routing
    (`routes[i]` `[num_tokens, top_k]` expert ids); returns `[num_layers, num_experts, hidden_size]`."""
    x = x0.double()
    gram = x.T @ x
    gram += ridge * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=gram.dtype)
    targets = torch.cat([torch.zeros(x.shape[0], num_experts, dtype=x.dtype).scatter_(1, ids, 1.0)
                         for ids in routes], dim=1)  # [num_tokens, num_layers * num_experts]
    w = torch.linalg.solve(gram, x.T @ targets)  # [hidden_size, num_layers * num_experts]
    return w.T.reshape(len(routes), num_experts, x.shape[1]).float().contiguous()


def step_recall(predicted: dict[int, list[int]], routes: dict[int, torch.Tensor]) -> dict[int, float]:
    """Per layer: share of the step's active experts (`routes[L]` `[num_tokens, top_k]`) predicted."""
    out = {}
    for layer_idx, ids in routes.items():
        active = set(ids.flatten().tolist())
        out[layer_idx] = len(active & set(predicted.get(layer_idx, []))) / len(active)
    return out
