"""The sparse MoE layer shared by every MoE family, and the SiLU-gated MLP used for dense/shared experts.

Invariant: one call routes all its tokens, tells the `ExpertProvider` ONCE which experts are active
(`plan`, which answers with waves: one for all-resident providers, several when a budgeted cache is
smaller than the active set), and runs each active expert ONCE, as one matmul pair over all the
tokens routed to it:

    ids, weights = top_k(score(x @ router^T))             [num_tokens, top_k]
    order = argsort(ids.flatten())                         token-expert pairs grouped by expert id
    for each wave, for each expert e of the wave (a contiguous run of `order`):
        y[run] = down_e(act(gate_e x) * up_e x)            gate_up fused: one [2*inter, hidden] matmul
    out = zeros.index_add_(0, token_of(order), y * weight) scatter-add back to tokens

Each expert's rows are computed by the same ops whatever the waves, so outputs are bitwise the same
for any provider holding the same weights. `set_route_source` is the replay seam: it lets a
`RouteSource` replace the router's choice (trace replay, synthetic skewed routing for benchmarks).

The families differ only in flags: how scores are made (softmax/sigmoid), whether the selected weights
are renormalised to sum to 1, in which dtype they scale the expert outputs, an optional shared expert
with a sigmoid gate (Qwen2-MoE), and the activation of the gated MLPs (`silu` for SwiGLU everywhere but
the moefied Gemma3 family, whose experts are GeGLU: `gelu_tanh`).
"""

from __future__ import annotations

from typing import Literal, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from mixserve.experts.provider import ExpertProvider, ExpertWeights, borrow_experts
from mixserve.experts.trace import RouteSource, RoutingObserver
from mixserve.layers.invariant import tiled_linear
from mixserve.layers.linear import Linear

Scoring = Literal["softmax", "sigmoid"]
Activation = Literal["silu", "gelu_tanh"]
"""The gate activation of a gated MLP: `silu` (SwiGLU) or `gelu_tanh` (GeGLU, HF `gelu_pytorch_tanh`)."""
ACTIVATIONS: tuple[Activation, ...] = ("silu", "gelu_tanh")


def check_activation(activation: str) -> Activation:
    """`activation` if it is one of `ACTIVATIONS`, else ValueError naming it."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown gated-MLP activation {activation!r}; expected one of {list(ACTIVATIONS)}")
    return activation  # type: ignore[return-value]


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """`[n, 2 * inter]` (gate | up) -> `[n, inter]` silu(gate) * up."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def act_and_mul(gate_up: torch.Tensor, activation: Activation) -> torch.Tensor:
    """`[n, 2 * inter]` (gate | up) -> `[n, inter]` act(gate) * up."""
    if activation == "silu":
        return silu_and_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.gelu(gate, approximate="tanh") * up


class GatedMLP(nn.Module):
    """down(act(gate x) * up x), gate and up fused in one `[2 * inter, hidden]` Linear; act is silu
    unless `activation` says otherwise."""

    def __init__(self, hidden_size: int, intermediate_size: int, activation: Activation = "silu") -> None:
        super().__init__()
        self.intermediate_size = intermediate_size
        self.activation = check_activation(activation)
        self.gate_up_proj = Linear(hidden_size, 2 * intermediate_size)
        self.down_proj = Linear(intermediate_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(act_and_mul(self.gate_up_proj(x), self.activation))


class RouterGate(nn.Module):
    """x W^T with W `[num_outputs, hidden_size]`: a plain matmul, deliberately not a `Linear`, so
    `enable_int8` never quantizes it (int8 router weights would change routing decisions)."""

    def __init__(self, hidden_size: int, num_outputs: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_outputs, hidden_size), requires_grad=False)
        self.invariant = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return tiled_linear(x, self.weight) if self.invariant else F.linear(x, self.weight)


class Router(Protocol):
    """An MoE layer's routing, as the layer itself and next-layer predictors call it."""

    def route(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`[num_tokens, hidden_size]` -> (`[num_tokens, top_k]` int64 expert ids, float32 weights)."""
        ...

    def scores(self, hidden: torch.Tensor) -> torch.Tensor:
        """`[num_tokens, hidden_size]` -> `[num_tokens, num_experts]` float32 routing scores (the
        distribution `route` picks its top-k from)."""
        ...


class TopKRouter(nn.Module):
    """The `Router` of every family here: scores = softmax or sigmoid of x W^T (W `[num_experts,
    hidden_size]`, a plain matmul like `RouterGate`), the top-k of them, renormalised to sum to 1 if
    `normalize_topk`. The families differ only in these flags."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, *, scoring: Scoring = "softmax",
                 normalize_topk: bool) -> None:
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k={top_k} must be in [1, num_experts={num_experts}]")
        if scoring not in ("softmax", "sigmoid"):
            raise ValueError(f"unknown scoring {scoring!r}; expected 'softmax' or 'sigmoid'")
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size), requires_grad=False)
        self.top_k = top_k
        self.scoring: Scoring = scoring
        self.normalize_topk = normalize_topk
        self.invariant = False

    def scores(self, hidden: torch.Tensor) -> torch.Tensor:
        x = hidden.to(self.weight.dtype)
        logits = tiled_linear(x, self.weight) if self.invariant else F.linear(x, self.weight)  # like HF
        if self.scoring == "softmax":
            return torch.softmax(logits, dim=-1, dtype=torch.float32)
        return torch.sigmoid(logits.float())

    def route(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        weights, ids = torch.topk(self.scores(hidden), self.top_k, dim=-1)
        if self.normalize_topk:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return ids, weights


class MoE(nn.Module):
    """Top-k routed experts (weights from an `ExpertProvider`) plus an optional gated shared expert.

    The router (`gate`, a `TopKRouter`, `[num_experts, hidden_size]`) is owned by the layer; expert
    weights are not: `forward` borrows them from the provider it is given. Parameter names follow HF
    (`gate.weight`, `shared_expert.*`, `shared_expert_gate.weight`), with the shared expert's gate/up fused.
    """

    def __init__(self, layer_idx: int, hidden_size: int, intermediate_size: int, num_experts: int,
                 top_k: int, *, scoring: Scoring = "softmax", normalize_topk: bool,
                 weights_in_activation_dtype: bool, shared_intermediate_size: int | None = None,
                 shared_expert_gate: bool = False, activation: Activation = "silu") -> None:
        """`normalize_topk`: rescale the selected weights to sum to 1 (Mixtral always; Qwen/OLMoE
        `norm_topk_prob`). `weights_in_activation_dtype`: round the float32 routing weights to the
        activation dtype before scaling expert outputs (Qwen/OLMoE) instead of scaling in float32 and
        rounding the product (Mixtral); the two only differ below float32. `shared_intermediate_size`:
        add an always-on expert of that width, scaled by sigmoid(x @ w) if `shared_expert_gate`.
        `activation`: the gate activation of every expert and of the shared expert (`Activation`)."""
        super().__init__()
        self.gate = TopKRouter(hidden_size, num_experts, top_k, scoring=scoring, normalize_topk=normalize_topk)
        if shared_expert_gate and shared_intermediate_size is None:
            raise ValueError("shared_expert_gate needs a shared expert (shared_intermediate_size)")
        self.layer_idx = layer_idx
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_experts = num_experts
        self.invariant = False
        """Batch-invariant mode: expert matmuls in fixed-size row tiles (`layers/invariant.py`)."""
        self.weights_in_activation_dtype = weights_in_activation_dtype
        self.activation = check_activation(activation)
        self.shared_expert = (GatedMLP(hidden_size, shared_intermediate_size, activation)
                              if shared_intermediate_size is not None else None)
        self.shared_expert_gate = RouterGate(hidden_size, 1) if shared_expert_gate else None
        self.route_source: RouteSource | None = None

    @property
    def top_k(self) -> int:
        return self.gate.top_k

    @property
    def scoring(self) -> Scoring:
        return self.gate.scoring

    @property
    def normalize_topk(self) -> bool:
        return self.gate.normalize_topk

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`[num_tokens, hidden_size]` -> (`[num_tokens, top_k]` int64 ids, float32 weights)."""
        return self.gate.route(x)

    def forward(self, x: torch.Tensor, experts: ExpertProvider,
                observer: RoutingObserver | None = None) -> torch.Tensor:
        """`[num_tokens, hidden_size]` -> `[num_tokens, hidden_size]`."""
        if x.dim() != 2 or x.shape[1] != self.hidden_size:
            raise ValueError(f"MoE layer {self.layer_idx} expects [num_tokens, {self.hidden_size}] "
                             f"input, got {list(x.shape)}")
        ids, weights = self.route(x)
        if self.route_source is not None:
            ids, weights = self.route_source.route(self.layer_idx, ids, weights)
        if observer is not None:
            observer.record(self.layer_idx, ids, weights)
        if self.weights_in_activation_dtype:
            weights = weights.to(x.dtype)
        flat_ids = ids.flatten()  # [num_tokens * top_k], token t's choices at t*top_k ...
        order = torch.argsort(flat_ids, stable=True)
        token_of = order // self.top_k  # [num_tokens * top_k] token row of each sorted pair
        counts = torch.bincount(flat_ids, minlength=self.num_experts)
        active = torch.nonzero(counts).flatten()
        active_ids: list[int] = active.tolist()
        waves = experts.plan(self.layer_idx, x, ids, active_ids)
        if sorted(e for wave in waves for e in wave) != active_ids:
            raise ValueError(f"MoE layer {self.layer_idx}: provider waves {waves} do not partition the "
                             f"active experts {active_ids}")
        xs = x[token_of]  # [num_tokens * top_k, hidden_size] grouped by expert
        y = torch.empty_like(xs)
        starts = dict(zip(active_ids, (torch.cumsum(counts[active], 0) - counts[active]).tolist()))
        num_rows = dict(zip(active_ids, counts[active].tolist()))
        for wave in waves:
            with borrow_experts(experts, self.layer_idx, wave) as w:
                self._run_experts(xs, y, starts, num_rows, w)
        y = (y * weights.flatten()[order, None]).to(x.dtype)
        out = torch.zeros_like(x).index_add_(0, token_of, y)
        if self.shared_expert is not None:
            shared = self.shared_expert(x)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(x)) * shared
            out = out + shared
        return out

    def _run_experts(self, xs: torch.Tensor, out: torch.Tensor, starts: dict[int, int],
                     num_rows: dict[int, int], w: ExpertWeights) -> None:
        """Rows `starts[e]:starts[e] + num_rows[e]` of `xs` (grouped by expert) -> the same rows of `out`
        (unweighted expert outputs), for the experts of `w`."""
        gate_up_shape = (2 * self.intermediate_size, self.hidden_size)
        down_shape = (self.hidden_size, self.intermediate_size)
        if len(w.gate_up) != len(w.expert_ids) or len(w.down) != len(w.expert_ids):
            raise ValueError(f"MoE layer {self.layer_idx}: provider returned {len(w.gate_up)} gate_up / "
                             f"{len(w.down)} down tensors for {len(w.expert_ids)} experts")
        for expert_id, gate_up, down in zip(w.expert_ids, w.gate_up, w.down):
            if gate_up.shape != gate_up_shape or down.shape != down_shape:
                raise ValueError(
                    f"MoE layer {self.layer_idx} expert {expert_id}: gate_up {list(gate_up.shape)} / down "
                    f"{list(down.shape)}, expected {list(gate_up_shape)} / {list(down_shape)}")
            start, n = starts[expert_id], num_rows[expert_id]
            linear = tiled_linear if self.invariant else F.linear
            h = act_and_mul(linear(xs[start:start + n], gate_up), self.activation)  # [n, intermediate_size]
            out[start:start + n] = linear(h, down)


def moe_layers(model: nn.Module) -> list[MoE]:
    """Every MoE layer of `model`, in module order (= forward order for every family here)."""
    return [m for m in model.modules() if isinstance(m, MoE)]


def set_route_source(model: nn.Module, source: RouteSource | None) -> None:
    """Attach a `RouteSource` to every MoE layer of `model` (None: route with the routers again).

    This is the replay seam: a recorded `TraceReplay` or a `SyntheticRouting` decides which experts
    each token uses (the router still runs, so compute cost is unchanged); outputs then follow the
    replayed routing, not the model's own. Meant for benchmarks and cache-policy evaluation."""
    for layer in moe_layers(model):
        layer.route_source = source
