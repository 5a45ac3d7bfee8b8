"""Learned d-layer-ahead gates (Fate-style cross-layer gating): layer L+d's experts from layer L's input.

The pre-gate (`pregate.py`) names every layer's experts from the first MoE layer's input, so every read
can start at once, but the further a layer is from that input the worse the guess (per-token recall at
m = 2K on moefied SmolLM2-135M: 0.87 over 30 layers). Layer L+1's own router on layer L's input
(`RouterLookahead`) is closer but was never trained for that input (0.93, and 0.51 at the second layer).
A gate trained for it does better: a ridge regression from MoE layer L's input onto layer L+d's own
top-k routing (one `[num_experts, hidden_size]` matrix per target layer) gave 0.967 at d = 1 and 0.952
at d = 2 on held-out text. `d` trades recall for lead time: each read has d layers of compute to hide
behind.

The gate is an `ExpertPredictor`: the budgeted provider calls `predict` at every MoE layer L and starts
reading the ranked experts of layer L+d (the first d layers get no prediction). Fitted on CPU by
`pregate_fit.fit_ahead_gate` on the model's own routing (`mixserve refit-pregate --ahead D`), with
per-layer widths `top_m` calibrated to a target recall, and saved next to the checkpoint as
`aheadgate.safetensors` (`weight` `[num_layers - d, num_experts, hidden_size]`, `layer_ids`, `top_m`,
metadata `distance`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mixserve.experts.predict import _ranked_union

AHEADGATE_FILE = "aheadgate.safetensors"


class AheadGate:
    """Per target layer, a linear scorer over experts applied to the input of the layer `distance` before."""

    def __init__(self, weight: torch.Tensor, layer_ids: Sequence[int], distance: int,
                 top_m: int | Sequence[int]) -> None:
        """`weight` `[len(layer_ids) - distance, num_experts, hidden_size]`: row i scores MoE layer
        `layer_ids[i + distance]` from the input of `layer_ids[i]`; `top_m`: one width for every target
        layer or one per target layer."""
        self.layer_ids = list(layer_ids)
        if distance < 1 or distance >= len(self.layer_ids):
            raise ValueError(f"ahead gate distance={distance} must be in [1, {len(self.layer_ids) - 1}] "
                             f"for {len(self.layer_ids)} MoE layers")
        n = len(self.layer_ids) - distance
        if weight.dim() != 3 or weight.shape[0] != n:
            raise ValueError(f"ahead gate weight {list(weight.shape)}: expected [{n}, num_experts, hidden_size] "
                             f"({len(self.layer_ids)} layers, distance {distance})")
        self.distance = distance
        self.weight = weight.float()
        self.num_experts = int(weight.shape[1])
        widths = [top_m] * n if isinstance(top_m, int) else [int(m) for m in top_m]
        if len(widths) != n or any(not 1 <= m <= self.num_experts for m in widths):
            raise ValueError(f"ahead gate top_m={top_m} must be in [1, num_experts={self.num_experts}] "
                             f"(one value, or one per target layer: {n})")
        self.top_m = widths
        self._source = {layer: i for i, layer in enumerate(self.layer_ids[:n])}

    def scores(self, x: torch.Tensor, source: int) -> torch.Tensor:
        """`[num_tokens, num_experts]` scores of layer `layer_ids[source + distance]` from the input `x`
        of MoE layer `layer_ids[source]` (positions, not layer ids)."""
        return x.float() @ self.weight[source].T

    def predict(self, layer_idx: int, x: torch.Tensor, topk_ids: torch.Tensor) -> tuple[int, list[int]] | None:
        i = self._source.get(layer_idx)
        if i is None:
            return None
        return self.layer_ids[i + self.distance], _ranked_union(self.scores(x, i), self.top_m[i])

    def save(self, folder: str | Path) -> None:
        tensors = {"weight": self.weight.contiguous(), "layer_ids": torch.tensor(self.layer_ids),
                   "top_m": torch.tensor(self.top_m)}
        save_file(tensors, str(Path(folder) / AHEADGATE_FILE), metadata={"distance": str(self.distance)})

    @staticmethod
    def load(folder: str | Path, top_m: int | Sequence[int] | None = None) -> AheadGate:
        """The folder's ahead gate; `top_m` None: its stored per-layer widths."""
        path = Path(folder) / AHEADGATE_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no ahead gate (written by `mixserve refit-pregate --ahead D` "
                                    f"or `mixserve moefy`)")
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        if "distance" not in meta:
            raise ValueError(f"{path}: metadata has no 'distance'")
        tensors = load_file(str(path))
        missing = [k for k in ("weight", "layer_ids", "top_m") if k not in tensors]
        if missing:
            raise ValueError(f"{path}: missing tensors {missing}")
        return AheadGate(tensors["weight"], tensors["layer_ids"].tolist(), int(meta["distance"]),
                         tensors["top_m"].tolist() if top_m is None else top_m)
