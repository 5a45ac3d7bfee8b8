"""Fitting the pre-gating router on an MoE model's OWN routing, and calibrating its prefetch widths.

`moefy` first fitted the pre-gate on routes computed from the dense model's hidden states; the moefied
model's hidden states drift from those (its layers drop most of each FFN), so its later layers route
differently and the dense-fitted pre-gate's recall fell from 0.97 (calibration, dense routes) to 0.86 on
the moefied model's real routing. Here the MoE model itself runs over the calibration text:

- `record_routes` keeps, per MoE layer, the router's top-k per token, the first MoE layer's input (the
  pre-gate's input) and the next-layer lookahead scores (layer L+1's router on layer L's input), so the
  same recording scores the pre-gate and the lookahead it is compared with.
- `fit_linear` (closed-form ridge, `pregate.fit_pregate`) or `fit_mlp` (one GELU hidden layer, Adam on a
  multi-label loss, seeded, CPU) fit the scorer on a split of the windows; `calibrate_top_m` picks per
  layer the smallest m whose recall on the other windows reaches `target_recall`.
- `fit_ahead_gate` fits the d-layer-ahead gates (`aheadgate.py`) on every layer's recorded input.
- `refit_pregate(folder)` does all of it for a written MoE folder and rewrites `pregate.safetensors`
  (and, with `ahead` > 0, `aheadgate.safetensors`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from mixserve.experts.aheadgate import AheadGate
from mixserve.experts.moefy_calib import calibration_text, forward_logits, token_windows
from mixserve.experts.pregate import PreGate, fit_pregate, token_recall
from mixserve.layers.moe import moe_layers
from mixserve.loading.checkpoint import load_checkpoint
from mixserve.models.base import build_model

Kind = Literal["linear", "mlp"]


@dataclass
class RouteRecord:
    """An MoE model's routing over some token windows."""

    x0: torch.Tensor
    """`[num_tokens, hidden_size]` input of the first MoE layer (the pre-gate's input)."""
    routes: list[torch.Tensor]
    """Per MoE layer, `[num_tokens, top_k]` the router's chosen experts."""
    lookahead: list[torch.Tensor | None]
    """Per MoE layer L, `[num_tokens, num_experts]` layer L's router scores on layer L-1's input
    (None for the first layer)."""
    window_lens: list[int]
    """Tokens per window, in order."""
    inputs: list[torch.Tensor] = field(default_factory=list)
    """With `keep_inputs`: per MoE layer, `[num_tokens, hidden_size]` its input (else empty)."""

    def select(self, windows: Sequence[int]) -> RouteRecord:
        """The tokens of the given windows only."""
        starts = [sum(self.window_lens[:i]) for i in range(len(self.window_lens))]
        idx = torch.cat([torch.arange(starts[w], starts[w] + self.window_lens[w]) for w in windows])
        return RouteRecord(self.x0[idx], [r[idx] for r in self.routes],
                           [None if s is None else s[idx] for s in self.lookahead],
                           [self.window_lens[w] for w in windows], [x[idx] for x in self.inputs])


def record_routes(model: nn.Module, windows: Sequence[Sequence[int]], keep_inputs: bool = False) -> RouteRecord:
    """Run the MoE `model` over `windows` (fresh sequences) and record its routing (see the docstring);
    `keep_inputs`: also every layer's input (num_layers x num_tokens x hidden_size floats)."""
    layers = moe_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__}: no MoE layers to record routes from")
    x0s: list[torch.Tensor] = []
    routes: list[list[torch.Tensor]] = [[] for _ in layers]
    ahead: list[list[torch.Tensor]] = [[] for _ in layers]
    inputs: list[list[torch.Tensor]] = [[] for _ in layers]

    def hook(i: int, x: torch.Tensor) -> None:
        x = x.detach().float()
        if i == 0:
            x0s.append(x.clone())
        routes[i].append(layers[i].route(x)[0].clone())
        if keep_inputs:
            inputs[i].append(x.clone())
        if i + 1 < len(layers):
            ahead[i + 1].append(layers[i + 1].gate.scores(x).float())

    handles = [layer.register_forward_pre_hook(lambda _m, args, i=i: hook(i, args[0]))
               for i, layer in enumerate(layers)]
    try:
        for ids in windows:
            forward_logits(model, ids)
    finally:
        for handle in handles:
            handle.remove()
    return RouteRecord(torch.cat(x0s), [torch.cat(r) for r in routes],
                       [None] + [torch.cat(a) for a in ahead[1:]], [len(w) for w in windows],
                       [torch.cat(x) for x in inputs] if keep_inputs else [])


def fit_linear(rec: RouteRecord, num_experts: int, top_m: int | Sequence[int], ridge: float = 1e-2) -> PreGate:
    return PreGate(fit_pregate(rec.x0, rec.routes, num_experts, ridge), list(range(len(rec.routes))), top_m)


def fit_mlp(rec: RouteRecord, num_experts: int, top_m: int | Sequence[int], hidden: int = 512, steps: int = 400,
            lr: float = 2e-3, weight_decay: float = 1e-2, batch: int = 1024, seed: int = 0) -> PreGate:
    """One GELU hidden layer, `[num_layers * num_experts]` logits, BCE on the multi-hot top-k (seeded)."""
    gen = torch.Generator().manual_seed(seed)
    x = rec.x0.float()
    num_layers = len(rec.routes)
    target = torch.cat([torch.zeros(x.shape[0], num_experts).scatter_(1, ids, 1.0) for ids in rec.routes], dim=1)
    d = x.shape[1]
    w1 = (torch.randn(hidden, d, generator=gen) / d ** 0.5).requires_grad_()
    b1 = torch.zeros(hidden, requires_grad=True)
    w2 = (torch.randn(num_layers * num_experts, hidden, generator=gen) / hidden ** 0.5).requires_grad_()
    b2 = torch.zeros(num_layers * num_experts, requires_grad=True)
    params = [w1, b1, w2, b2]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    scale = x.pow(2).mean().sqrt().clamp(min=1e-6)  # inputs to unit RMS, folded back into w1 at the end
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (min(batch, x.shape[0]),), generator=gen)
        h = torch.nn.functional.gelu((x[idx] / scale) @ w1.T + b1)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(h @ w2.T + b2, target[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    mlp = {"w1": (w1 / scale).detach(), "b1": b1.detach(), "w2": w2.detach(), "b2": b2.detach()}
    return PreGate(None, list(range(num_layers)), top_m, mlp=mlp, num_experts=num_experts)


def fit_ahead_gate(rec: RouteRecord, num_experts: int, distance: int, top_m: int | Sequence[int],
                   layer_ids: Sequence[int] | None = None, ridge: float = 1e-2) -> AheadGate:
    """Ridge from MoE layer i's input (`rec.inputs`, recorded with `keep_inputs`) onto layer i+d's routing."""
    if not rec.inputs:
        raise ValueError("fit_ahead_gate needs every layer's input: record_routes(..., keep_inputs=True)")
    n = len(rec.routes)
    weight = torch.stack([fit_pregate(rec.inputs[i], [rec.routes[i + distance]], num_experts, ridge)[0]
                          for i in range(n - distance)])
    return AheadGate(weight, list(layer_ids) if layer_ids is not None else list(range(n)), distance, top_m)


def ahead_scores(gate: AheadGate, rec: RouteRecord) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(`[num_layers - d, num_tokens, num_experts]` scores, the routes they predict) on `rec`."""
    d = gate.distance
    scores = torch.stack([gate.scores(rec.inputs[i], i) for i in range(len(rec.routes) - d)])
    return scores, rec.routes[d:]


def write_dense_pregate(x0: torch.Tensor, routes: list[torch.Tensor], num_experts: int, top_k: int,
                        out: Path) -> tuple[list[float], list[float]]:
    """`moefy --pregate-from dense`: fit on the routes `moefy` computed from the dense model's states,
    save with width K; returns its per-layer recall at K and 2K on those same tokens."""
    gate = fit_linear(RouteRecord(x0, routes, [], []), num_experts, top_k)
    gate.save(out)
    scores = gate.scores(x0)
    return token_recall(scores, routes, top_k), token_recall(scores, routes, min(2 * top_k, num_experts))


def calibrate_top_m(scores: torch.Tensor, routes: list[torch.Tensor], target_recall: float) -> list[int]:
    """Per layer, the smallest m whose top-m holds `target_recall` of the routed experts (else all E)."""
    num_experts = scores.shape[2]
    out = []
    for i, ids in enumerate(routes):
        m = next((m for m in range(ids.shape[1], num_experts + 1)
                  if token_recall(scores[i:i + 1], [ids], m)[0] >= target_recall), num_experts)
        out.append(m)
    return out


@dataclass(frozen=True)
class RefitConfig:
    """`mixserve refit-pregate MODEL`: what the pre-gate is fitted on and how."""

    model: str
    """MoE folder (e.g. written by `mixserve moefy`); its `pregate.safetensors` is replaced."""
    kind: Kind = "linear"
    """`linear` (closed-form ridge) or `mlp` (one hidden layer, a few hundred CPU steps)."""
    target_recall: float = 0.95
    """Per-layer top-m is the smallest m reaching this recall on the held-back calibration windows."""
    calibration_files: tuple[str, ...] = ()
    """Text files to record routing on; empty: the standard-library docstring set (`moefy_calib`)."""
    max_calibration_tokens: int = 16384
    """Tokens recorded (4096 gave held-out recall 0.79 at top-2K on moefied SmolLM2-135M, 16384 0.87)."""
    window: int = 256
    holdout: float = 0.2
    """Share of the calibration windows held back to calibrate top-m (and report recall on)."""
    seed: int = 0
    ahead: int = 1
    """Also fit the d-layer-ahead gates (`aheadgate.safetensors`) at this distance d; 0: none. Keeps every
    layer's input while recording (num_layers x tokens x hidden_size floats: 1.1 GB for SmolLM2-135M at
    16384 tokens)."""

    def __post_init__(self) -> None:
        if self.kind not in ("linear", "mlp"):
            raise ValueError(f"--kind={self.kind!r}: expected 'linear' or 'mlp'")
        if not 0.0 < self.target_recall <= 1.0:
            raise ValueError(f"--target-recall={self.target_recall} must be in (0, 1]")
        if not 0.0 < self.holdout < 1.0:
            raise ValueError(f"--holdout={self.holdout} must be in (0, 1)")
        if self.max_calibration_tokens < 2 or self.window < 2:
            raise ValueError("max_calibration_tokens and window must be at least 2")
        if self.ahead < 0:
            raise ValueError(f"--ahead={self.ahead} must be >= 0 (0: no ahead gate)")


@dataclass
class RefitReport:
    model: str
    kind: str
    num_tokens: int
    top_m: list[int] = field(default_factory=list)
    """Per layer: the calibrated prefetch width."""
    recall_top_k: list[float] = field(default_factory=list)
    """Per layer, held-back calibration windows: recall of the pre-gate's top-K."""
    recall_2k: list[float] = field(default_factory=list)
    """The same with top-2K."""
    recall: list[float] = field(default_factory=list)
    """The same at the calibrated top-m."""
    ahead: int = 0
    """Distance of the ahead gate written (0: none)."""
    ahead_top_m: list[int] = field(default_factory=list)
    """Per target layer (MoE layers d.. in order): the ahead gate's calibrated width."""
    ahead_recall_2k: list[float] = field(default_factory=list)
    """Per target layer, held-back windows: recall of the ahead gate's top-2K."""
    ahead_recall: list[float] = field(default_factory=list)
    """The same at its calibrated widths."""


def load_moe(folder: str | Path) -> tuple[Any, Any]:
    """(mixserve model in float32, checkpoint) of an MoE folder; ValueError for a dense one."""
    ckpt = load_checkpoint(Path(folder))
    if not (ckpt.hf_config.get("num_experts") or ckpt.hf_config.get("num_local_experts")):
        raise ValueError(f"{folder}: not an MoE model (no num_experts in config.json); refit-pregate needs one")
    model: Any = build_model(ckpt.hf_config, torch.float32)
    model.load_weights(ckpt.weights(dtype=torch.float32))
    return model.eval(), ckpt


def split_windows(num_windows: int, holdout: float) -> tuple[list[int], list[int]]:
    """(fit, held back) window indices: every round(1/holdout)-th window is held back."""
    if num_windows < 2:
        raise ValueError(f"{num_windows} calibration window(s): need at least 2 to hold some back")
    every = max(2, round(1 / holdout))
    back = [i for i in range(num_windows) if i % every == every - 1] or [num_windows - 1]
    return [i for i in range(num_windows) if i not in back], back


def fit_on(rec: RouteRecord, kind: Kind, num_experts: int, top_m: int | Sequence[int], seed: int = 0) -> PreGate:
    return fit_linear(rec, num_experts, top_m) if kind == "linear" else fit_mlp(rec, num_experts, top_m, seed=seed)


def refit_pregate(config: RefitConfig, model: Any = None, tokenizer: Any = None) -> RefitReport:
    """Record the MoE model's own routing on the calibration text, fit, calibrate top-m, save."""
    if model is None:
        model, ckpt = load_moe(config.model)
        tokenizer = ckpt.tokenizer
    num_experts = moe_layers(model)[0].num_experts
    top_k = moe_layers(model)[0].top_k
    cal = calibration_text(config.calibration_files)
    encoded = [tokenizer.encode(t) for t in cal.texts]
    windows = token_windows(encoded, config.window, config.max_calibration_tokens)
    if len(windows) < 5:  # too little text for whole held-back windows at this size: cut it finer
        windows = token_windows(encoded, max(2, -(-sum(map(len, windows)) // 5)), config.max_calibration_tokens)
    layers = moe_layers(model)
    if config.ahead >= len(layers):
        raise ValueError(f"--ahead={config.ahead}: the model has {len(layers)} MoE layers; the distance must be "
                         f"smaller")
    rec = record_routes(model, windows, keep_inputs=config.ahead > 0)
    fit_idx, back_idx = split_windows(len(windows), config.holdout)
    gate = fit_on(rec.select(fit_idx), config.kind, num_experts, top_k, config.seed)
    back = rec.select(back_idx)
    scores = gate.scores(back.x0)
    top_m = calibrate_top_m(scores, back.routes, config.target_recall)
    gate = PreGate(gate.weight, gate.layer_ids, top_m, mlp=gate.mlp, num_experts=num_experts)
    gate.save(config.model)
    report = RefitReport(config.model, config.kind, sum(rec.window_lens), top_m,
                         token_recall(scores, back.routes, top_k),
                         token_recall(scores, back.routes, min(2 * top_k, num_experts)),
                         token_recall(scores, back.routes, top_m))
    if config.ahead:
        ahead = fit_ahead_gate(rec.select(fit_idx), num_experts, config.ahead, top_k,
                               [m.layer_idx for m in layers])
        a_scores, a_routes = ahead_scores(ahead, back)
        a_top_m = calibrate_top_m(a_scores, a_routes, config.target_recall)
        ahead = AheadGate(ahead.weight, ahead.layer_ids, ahead.distance, a_top_m)
        ahead.save(config.model)
        report.ahead, report.ahead_top_m = config.ahead, a_top_m
        report.ahead_recall_2k = token_recall(a_scores, a_routes, min(2 * top_k, num_experts))
        report.ahead_recall = token_recall(a_scores, a_routes, a_top_m)
    path = Path(config.model) / "pregate.json"
    path.write_text(json.dumps({"config": asdict(config), "calibration": {"source": cal.source, "sha256": cal.sha256},
                                "report": asdict(report)}, indent=2))
    return report
