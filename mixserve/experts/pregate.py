"""Pre-gating router (Read-ME): every MoE layer's experts for a step, known before the backbone runs.

A predictor maps the FIRST MoE layer's input (the token embedding after one attention block: the
earliest state that sees context) to scores over every MoE layer's experts, and keeps each layer's top-m.
Two scorers, both fitted on CPU (`pregate_fit.py`) and saved next to the checkpoint as
`pregate.safetensors`:
- linear (`weight` `[num_layers, num_experts, hidden_size]`): closed-form ridge regression onto the
  one-hot top-k routing;
- MLP (`w1` `[hidden, hidden_size]`, `b1`, `w2` `[num_layers * num_experts, hidden]`, `b2`): one GELU
  hidden layer, trained with a multi-label loss on the same targets (a few hundred CPU steps).
Both files hold `layer_ids` `[num_layers]` and, optionally, `top_m` `[num_layers]`: per-layer calibrated
prefetch widths (the smallest m reaching a target recall on held-out calibration tokens); `load(folder)`
uses those unless a width is given.

The budgeted provider calls `predict_step` once per step, at the first MoE layer, and starts reading
every layer's predicted experts at once (instead of one layer ahead, as `RouterLookahead` and
`AffinityPredictor` do); its per-layer recall counters score the guesses.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import torch
from safetensors.torch import load_file, save_file

from mixserve.experts.predict import _ranked_union

PREGATE_FILE = "pregate.safetensors"
_MLP_KEYS = ("w1", "b1", "w2", "b2")


class StepPredictor(Protocol):
    """Predicts the experts of every MoE layer of a step from the first MoE layer's input."""

    def predict_step(self, x: torch.Tensor) -> dict[int, list[int]]:
        """`[num_tokens, hidden_size]` first-MoE-layer input -> MoE layer -> ranked expert ids."""
        ...


class PreGate:
    """Per-layer expert scores from the first MoE layer's input (see the module docstring)."""

    def __init__(self, weight: torch.Tensor | None, layer_ids: list[int], top_m: int | Sequence[int],
                 mlp: dict[str, torch.Tensor] | None = None, num_experts: int | None = None) -> None:
        """`weight` `[num_layers, num_experts, hidden_size]` (linear), or `mlp` with `_MLP_KEYS` and
        `num_experts`; `top_m`: experts kept per token, one for all layers or one per layer."""
        self.layer_ids = list(layer_ids)
        n = len(self.layer_ids)
        if (weight is None) == (mlp is None):
            raise ValueError("a pre-gate needs exactly one of a linear weight or an MLP")
        if weight is not None:
            if weight.dim() != 3 or weight.shape[0] != n:
                raise ValueError(f"pre-gate weight {list(weight.shape)} does not match {n} layers")
            self.num_experts = int(weight.shape[1])
            self.weight: torch.Tensor | None = weight.float()
            self.mlp: dict[str, torch.Tensor] | None = None
        else:
            assert mlp is not None
            missing = [k for k in _MLP_KEYS if k not in mlp]
            if missing or num_experts is None or mlp["w2"].shape[0] != n * num_experts:
                shape = list(mlp["w2"].shape) if "w2" in mlp else "-"
                raise ValueError(f"pre-gate MLP: missing {missing} or w2 {shape} does not match {n} layers "
                                 f"x num_experts={num_experts}")
            self.num_experts = num_experts
            self.weight = None
            self.mlp = {k: mlp[k].float() for k in _MLP_KEYS}
        widths = [top_m] * n if isinstance(top_m, int) else [int(m) for m in top_m]
        if len(widths) != n or any(not 1 <= m <= self.num_experts for m in widths):
            raise ValueError(f"pre-gate top_m={top_m} must be in [1, num_experts={self.num_experts}] "
                             f"(one value, or one per layer for {n} layers)")
        self.top_m = widths

    @property
    def kind(self) -> str:
        return "linear" if self.weight is not None else "mlp"

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """`[num_tokens, hidden_size]` -> `[num_layers, num_tokens, num_experts]`."""
        x = x.float()
        if self.weight is not None:
            return torch.einsum("th,leh->lte", x, self.weight)
        assert self.mlp is not None
        m = self.mlp
        h = torch.nn.functional.gelu(x @ m["w1"].T + m["b1"])
        logits = h @ m["w2"].T + m["b2"]  # [num_tokens, num_layers * num_experts]
        return logits.reshape(x.shape[0], len(self.layer_ids), self.num_experts).transpose(0, 1)

    def predict_step(self, x: torch.Tensor) -> dict[int, list[int]]:
        scores = self.scores(x)
        return {layer_idx: _ranked_union(scores[i], self.top_m[i]) for i, layer_idx in enumerate(self.layer_ids)}

    def save(self, folder: str | Path) -> None:
        tensors = {"layer_ids": torch.tensor(self.layer_ids), "top_m": torch.tensor(self.top_m)}
        if self.weight is not None:
            tensors["weight"] = self.weight.contiguous()
        else:
            assert self.mlp is not None
            tensors.update({k: v.contiguous() for k, v in self.mlp.items()})
        save_file(tensors, str(Path(folder) / PREGATE_FILE),
                  metadata={"kind": self.kind, "num_experts": str(self.num_experts)})

    @staticmethod
    def load(folder: str | Path, top_m: int | Sequence[int] | None = None) -> PreGate:
        """The folder's pre-gate; `top_m` None: the stored per-layer widths (files without them: error)."""
        path = Path(folder) / PREGATE_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no pre-gating router (written by `mixserve moefy` or "
                                    f"`mixserve refit-pregate`)")
        tensors = load_file(str(path))
        if top_m is None:
            if "top_m" not in tensors:
                raise ValueError(f"{path} stores no per-layer top_m: pass top_m")
            top_m = tensors["top_m"].tolist()
        layer_ids = tensors["layer_ids"].tolist()
        if "weight" in tensors:
            return PreGate(tensors["weight"], layer_ids, top_m)
        num_experts = int(tensors["w2"].shape[0]) // len(layer_ids)
        return PreGate(None, layer_ids, top_m, mlp={k: tensors[k] for k in _MLP_KEYS}, num_experts=num_experts)


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


def token_recall(scores: torch.Tensor, routes: list[torch.Tensor], top_m: int | Sequence[int]) -> list[float]:
    """Per layer: share of each token's routed experts (`routes[i]` `[num_tokens, top_k]`) inside the
    top-m of `scores` `[num_layers, num_tokens, num_experts]` (mean over tokens)."""
    widths = [top_m] * len(routes) if isinstance(top_m, int) else list(top_m)
    out = []
    for i, ids in enumerate(routes):
        hit = torch.zeros(scores.shape[1], scores.shape[2], dtype=torch.bool)
        hit.scatter_(1, scores[i].topk(widths[i], dim=1).indices, True)
        out.append(float(hit.gather(1, ids).float().mean()))
    return out


def step_recall(predicted: dict[int, list[int]], routes: dict[int, torch.Tensor]) -> dict[int, float]:
    """Per layer: share of the step's active experts (`routes[L]` `[num_tokens, top_k]`) predicted."""
    out = {}
    for layer_idx, ids in routes.items():
        active = set(ids.flatten().tolist())
        out[layer_idx] = len(active & set(predicted.get(layer_idx, []))) / len(active)
    return out
