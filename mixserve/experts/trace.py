"""Observable routing: which experts each token used, per step and per MoE layer.

A model with a `RoutingObserver` attached calls `begin_step` once per forward, then every MoE layer
calls `record` with its top-k choice. A `RouteSource` attached to the MoE layers (`set_route_source`
in `layers/moe.py`) is the replay seam: the router still runs, but the source decides which experts
each token uses (`TraceReplay` replays a recorded trace, `SyntheticRouting` draws skewed routes), so
cache policies can be measured on realistic routing with a random-initialised model.

`RoutingTrace` keeps the tensors as they come (no sync, no conversion) and converts lazily in
`to_dict`/`save`, so traces of real runs can be replayed later (cache-policy simulation, predictor
training). With no observer attached the model does one `is None` check per layer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch


class RoutingObserver(Protocol):
    """Receives routing decisions as the model computes them."""

    def begin_step(self, positions: torch.Tensor, query_lens: list[int]) -> None:
        """A forward pass starts: `[num_tokens]` positions, packed as `query_lens` tokens per sequence."""
        ...

    def record(self, layer_idx: int, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> None:
        """MoE layer `layer_idx` chose `[num_tokens, top_k]` experts with float32 weights."""
        ...


class RouteSource(Protocol):
    """Overrides routing decisions (for replay and benchmarks; outputs then differ from the router's)."""

    def route(self, layer_idx: int, topk_ids: torch.Tensor, topk_weights: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """The router chose `[num_tokens, top_k]` ids/float32 weights; return the ones to use instead."""
        ...


@dataclass
class TraceStep:
    """Routing of one forward pass."""

    positions: torch.Tensor
    """`[num_tokens]` int64 positions of the step's tokens."""
    query_lens: list[int]
    """Tokens per sequence (the packing of `positions`)."""
    topk_ids: dict[int, torch.Tensor] = field(default_factory=dict)
    """layer_idx -> `[num_tokens, top_k]` int64 expert ids (rank order: best first)."""
    topk_weights: dict[int, torch.Tensor] = field(default_factory=dict)
    """layer_idx -> `[num_tokens, top_k]` float32 routing weights used to mix the experts."""


class RoutingTrace:
    """A `RoutingObserver` that keeps every step; `save`/`load` as .npz (compact) or .json."""

    def __init__(self) -> None:
        self.steps: list[TraceStep] = []

    def begin_step(self, positions: torch.Tensor, query_lens: list[int]) -> None:
        # Clone: a runner may reuse its positions buffer next step; ids/weights are fresh per call.
        self.steps.append(TraceStep(positions.detach().clone(), list(query_lens)))

    def record(self, layer_idx: int, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> None:
        if not self.steps:
            raise RuntimeError("record() before begin_step(): attach the trace to the model, not a layer")
        step = self.steps[-1]
        step.topk_ids[layer_idx] = topk_ids.detach()
        step.topk_weights[layer_idx] = topk_weights.detach()

    def clear(self) -> None:
        self.steps.clear()

    @property
    def num_steps(self) -> int:
        return len(self.steps)

    def layer_ids(self) -> list[int]:
        """MoE layers seen in any step, ascending."""
        return sorted({layer_idx for s in self.steps for layer_idx in s.topk_ids})

    def expert_counts(self, layer_idx: int, num_experts: int) -> torch.Tensor:
        """`[num_experts]` int64: token-expert assignments of `layer_idx` over all steps."""
        counts = torch.zeros(num_experts, dtype=torch.long)
        for s in self.steps:
            if layer_idx in s.topk_ids:
                counts += torch.bincount(s.topk_ids[layer_idx].flatten().cpu(), minlength=num_experts)
        return counts

    # ---- serialisation -------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Plain lists, JSON-ready: {"steps": [{"positions", "query_lens", "layers": {"L": {...}}}]}."""
        return {"steps": [{
            "positions": s.positions.tolist(),
            "query_lens": s.query_lens,
            "layers": {str(layer_idx): {"ids": s.topk_ids[layer_idx].tolist(),
                                        "weights": s.topk_weights[layer_idx].float().tolist()}
                       for layer_idx in sorted(s.topk_ids)},
        } for s in self.steps]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RoutingTrace:
        trace = cls()
        for s in data["steps"]:
            step = TraceStep(torch.tensor(s["positions"], dtype=torch.long), list(s["query_lens"]))
            for key, layer in s["layers"].items():
                step.topk_ids[int(key)] = torch.tensor(layer["ids"], dtype=torch.long)
                step.topk_weights[int(key)] = torch.tensor(layer["weights"], dtype=torch.float32)
            trace.steps.append(step)
        return trace

    def save(self, path: str | Path) -> None:
        """Write `.json` (via `to_dict`) or anything else as `.npz` (int32 ids, float32 weights)."""
        path = Path(path)
        if path.suffix == ".json":
            path.write_text(json.dumps(self.to_dict()))
            return
        arrays: dict[str, Any] = {"num_steps": np.array(len(self.steps))}
        for i, s in enumerate(self.steps):
            arrays[f"s{i}.positions"] = s.positions.cpu().numpy()
            arrays[f"s{i}.query_lens"] = np.array(s.query_lens, dtype=np.int64)
            for layer_idx, ids in s.topk_ids.items():
                arrays[f"s{i}.l{layer_idx}.ids"] = ids.cpu().numpy().astype(np.int32)
                arrays[f"s{i}.l{layer_idx}.weights"] = s.topk_weights[layer_idx].float().cpu().numpy()
        with path.open("wb") as f:
            np.savez_compressed(f, **arrays)

    @classmethod
    def load(cls, path: str | Path) -> RoutingTrace:
        path = Path(path)
        if path.suffix == ".json":
            return cls.from_dict(json.loads(path.read_text()))
        trace = cls()
        with np.load(path) as data:
            layers: dict[int, list[int]] = {}
            for key in data.files:
                if key.endswith(".ids"):  # "s{step}.l{layer}.ids"
                    step_key, layer_key, _ = key.split(".")
                    layers.setdefault(int(step_key[1:]), []).append(int(layer_key[1:]))
            for i in range(int(data["num_steps"])):
                step = TraceStep(torch.from_numpy(data[f"s{i}.positions"]).long(),
                                 data[f"s{i}.query_lens"].tolist())
                for layer_idx in sorted(layers.get(i, [])):
                    step.topk_ids[layer_idx] = torch.from_numpy(data[f"s{i}.l{layer_idx}.ids"]).long()
                    step.topk_weights[layer_idx] = torch.from_numpy(data[f"s{i}.l{layer_idx}.weights"])
                trace.steps.append(step)
        return trace


class TraceReplay:
    """A `RouteSource` replaying a recorded trace: the n-th call of layer L gets step n's routing of L.

    Raises ValueError (naming step and layer) when the token count differs from the recording or the
    trace runs out."""

    def __init__(self, trace: RoutingTrace) -> None:
        self.trace = trace
        self.cursor: dict[int, int] = {}

    def route(self, layer_idx: int, topk_ids: torch.Tensor, topk_weights: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.cursor.get(layer_idx, 0)
        steps = [s for s in self.trace.steps if layer_idx in s.topk_ids]
        if n >= len(steps):
            raise ValueError(f"trace replay: layer {layer_idx} asked for step {n}, the trace has {len(steps)}")
        ids, weights = steps[n].topk_ids[layer_idx], steps[n].topk_weights[layer_idx]
        if ids.shape != topk_ids.shape:
            raise ValueError(f"trace replay: step {n} layer {layer_idx} recorded {list(ids.shape)} routes, "
                             f"the model asks for {list(topk_ids.shape)}")
        self.cursor[layer_idx] = n + 1
        return ids.to(topk_ids.device), weights.to(topk_weights.dtype)
