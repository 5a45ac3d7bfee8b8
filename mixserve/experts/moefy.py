"""`moefy`: a dense checkpoint (llama, qwen2, qwen3 or gemma3 family; HF folder or GGUF) -> an MoE
checkpoint with routed experts and an optional shared expert (MoEfication).

Each FFN `down(act(gate x) * up x)` is a sum over its intermediate neurons, so splitting the neurons into
a shared group S and routed groups E_1..E_E gives exactly
    FFN(x) = FFN_S(x) + sum_e FFN_{E_e}(x).
The MoE model keeps S always on and runs only the top-k routed groups a fitted router picks. The layout
written depends on the dense family (`LAYOUTS`):
- llama (SwiGLU, no biases) and qwen2 (SwiGLU, q/k/v bias): the standard Qwen2-MoE layout (HF
  `Qwen2MoeForCausalLM`, `qkv_bias` as the dense model has it: routed experts, a shared expert behind a
  sigmoid gate), so transformers and mixserve load the same folder.
- qwen3 (per-head q/k RMSNorm): the Qwen3-MoE layout (HF `Qwen3MoeForCausalLM`); it has no shared
  expert, so `shared_fraction` must be 0.
- gemma3 (GeGLU tanh-gelu MLP, four sandwich norms, `(1 + w)` RMSNorm, scaled embedding): mixserve's own
  `Gemma3MoeForCausalLM` (`models/gemma3_moe.py`: the Gemma3 text config plus the MoE fields; GeGLU
  experts and an ungated shared expert). transformers has no such class and cannot load that folder;
  its parity is checked at K = E against transformers' dense `Gemma3ForCausalLM` instead (tested).
Exact rescalings make each layout compute the masked sum above:
- All three scale routed outputs by the renormalised softmax weights of the chosen experts. The router
  weight is the fitted regression times a small temperature `ROUTER_SPREAD / spread` (spread: the
  largest logit range on the calibration tokens), so the chosen weights are 1/K within about 1% and the
  top-k choice is unchanged (scaling preserves order); routed down projections are multiplied by K.
  With K = E every expert is always on: the router is zero, the weights are exactly 1/K.
- Qwen2-MoE scales the shared expert by sigmoid(x @ g): g = 0 gives 1/2, so its down projection is
  doubled (the Gemma3-MoE shared expert has no gate).

Invariant (tested): with K = E and no shared expert the written model computes the dense function.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from mixserve.experts.moefy_calib import FFNRecord, calibration_text, record_ffn, token_windows
from mixserve.experts.moefy_split import Method, expert_mass, fit_router, split_neurons, topk_recall
from mixserve.experts.pregate_fit import RefitConfig, refit_pregate, write_dense_pregate
from mixserve.hub import resolve_model
from mixserve.loading.checkpoint import Checkpoint, load_checkpoint
from mixserve.models.base import build_model

ROUTER_SPREAD = 0.01
"""Largest router-logit range on calibration tokens after scaling: chosen weights are 1/K within ~1%."""

_MOE_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_intermediate_size")


@dataclass(frozen=True)
class MoefyConfig:
    """What `moefy` builds and from what."""

    model: str
    """Dense model: known name (smollm2-135m), HF folder or GGUF file."""
    out: str
    """Folder to write the MoE checkpoint into (created; must be empty if it exists)."""
    num_experts: int
    """Routed experts per layer (E)."""
    top_k: int
    """Routed experts each token uses (K <= E)."""
    shared_fraction: float = 0.0
    """Share of each FFN's neurons (most often active first) in the always-on shared expert."""
    method: Method = "coactivation"
    """`coactivation` (cluster neurons by activation pattern) or `kmeans` (cluster gate-projection rows)."""
    calibration_files: tuple[str, ...] = ()
    """Text files to calibrate on; empty: the standard-library docstring set (`moefy_calib`)."""
    max_calibration_tokens: int = 4096
    """Tokens of calibration text to record."""
    window: int = 256
    """Tokens per calibration forward pass."""
    seed: int = 0
    """Seed of the clustering."""
    cache_dir: str | None = None
    """Where known models are pulled to."""
    pregate_from: str = "moe"
    """What the pre-gating router is fitted on: `moe` (the written model's own routing of the calibration
    text, `pregate_fit.refit_pregate`) or `dense` (routes computed from the dense model's hidden states)."""
    target_recall: float = 0.95
    """With `pregate_from=moe`: per-layer prefetch width m, the smallest reaching this held-back recall."""
    pregate_tokens: int = 16384
    """With `pregate_from=moe`: calibration tokens the written model's routing is recorded on (cheap: only
    routes and the first layer's input are kept; 4096 gave held-out recall 0.79 at top-2K, 16384 0.87)."""

    def __post_init__(self) -> None:
        if self.num_experts < 1:
            raise ValueError(f"--num-experts={self.num_experts} must be at least 1")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"--top-k={self.top_k} must be in [1, --num-experts={self.num_experts}]")
        if not 0.0 <= self.shared_fraction < 1.0:
            raise ValueError(f"--shared-fraction={self.shared_fraction} must be in [0, 1)")
        if self.method not in ("coactivation", "kmeans"):
            raise ValueError(f"--method={self.method!r}: expected 'coactivation' or 'kmeans'")
        if self.max_calibration_tokens < 2 or self.window < 2:
            raise ValueError("max_calibration_tokens and window must be at least 2")
        if self.pregate_tokens < 2:
            raise ValueError(f"--pregate-tokens={self.pregate_tokens} must be at least 2")
        if self.pregate_from not in ("moe", "dense"):
            raise ValueError(f"--pregate-from={self.pregate_from!r}: expected 'moe' or 'dense'")
        if not 0.0 < self.target_recall <= 1.0:
            raise ValueError(f"--target-recall={self.target_recall} must be in (0, 1]")


@dataclass
class MoefyReport:
    """What was written, and how well each layer's router matches the activation it predicts."""

    out: str
    num_experts: int
    top_k: int
    num_shared: int
    """Neurons of the shared expert per layer."""
    expert_size: int
    """Neurons (moe_intermediate_size) per routed expert."""
    method: str
    calibration: dict[str, Any]
    """source, sha256, num_tokens."""
    router_recall: list[float] = field(default_factory=list)
    """Per layer: share of the true top-k experts (by activation mass) the router picks, calibration set."""
    covered_mass: list[float] = field(default_factory=list)
    """Per layer: share of the routed activation mass inside the router's top-k, calibration set."""
    pregate_from: str = "moe"
    pregate_recall: list[float] = field(default_factory=list)
    """Per layer: share of each token's top-k the pre-gating router's top-k names (calibration text:
    `dense`, all of it against the dense-state routes; `moe`, the held-back windows, own routing)."""
    pregate_recall_2k: list[float] = field(default_factory=list)
    """The same with the pre-gate's top-2k (prefetching twice the active experts)."""
    pregate_top_m: list[int] = field(default_factory=list)
    """`moe` only: per-layer calibrated prefetch width stored in `pregate.safetensors`."""
    seconds: float = 0.0


def plan_sizes(intermediate_size: int, num_experts: int, shared_fraction: float) -> tuple[int, int]:
    """(shared neurons, neurons per routed expert); raises ValueError unless the routed neurons divide
    evenly into `num_experts`."""
    num_shared = round(shared_fraction * intermediate_size)
    routed = intermediate_size - num_shared
    if routed < num_experts or routed % num_experts:
        ok = [e for e in (2, 4, 8, 16, 32, 64, 128, 256) if e <= routed and routed % e == 0]
        raise ValueError(f"--num-experts={num_experts} does not divide the {routed} routed neurons "
                         f"(intermediate_size {intermediate_size} - {num_shared} shared); "
                         f"powers of two that do: {ok}")
    return num_shared, routed // num_experts


@dataclass(frozen=True)
class Layout:
    """How one dense family's moefied model is written."""

    dense: str
    """The dense `model_type` it applies to."""
    architecture: str
    """`architectures[0]` of the written config.json."""
    activation: str
    """The dense MLP's gate activation (`hidden_act` / `hidden_activation`) the experts keep."""
    shared_gate: bool
    """The shared expert sits behind a sigmoid gate (written as 0: its down projection is doubled)."""
    has_shared: bool
    """The layout has a shared expert at all (else `shared_fraction` must be 0)."""
    untie: bool
    """Write an explicit LM head (same values as the embedding) instead of a tied one."""
    transformers_loads: bool
    """transformers has a class for the written folder."""


LAYOUTS: dict[str, Layout] = {
    "llama": Layout("llama", "Qwen2MoeForCausalLM", "silu", True, True, True, True),
    "qwen2": Layout("qwen2", "Qwen2MoeForCausalLM", "silu", True, True, True, True),
    "qwen3": Layout("qwen3", "Qwen3MoeForCausalLM", "silu", False, False, True, True),
    "gemma3_text": Layout("gemma3_text", "Gemma3MoeForCausalLM", "gelu_pytorch_tanh", False, True, False, False),
}
"""Dense `model_type` -> the layout its moefied model is written in (see the module docstring)."""


def check_dense(ckpt: Checkpoint) -> dict[str, Any]:
    """The dense config of `ckpt` if moefy supports it (`LAYOUTS`); ValueError naming the field otherwise."""
    cfg = ckpt.hf_config
    moe = [k for k in _MOE_KEYS if cfg.get(k)]
    if moe:
        raise ValueError(f"{ckpt.path}: already an MoE model ({moe[0]}={cfg[moe[0]]}); moefy needs a dense one")
    layout = LAYOUTS.get(str(cfg.get("model_type")))
    if layout is None:
        raise ValueError(f"{ckpt.path}: model_type={cfg.get('model_type')!r}; moefy supports the dense families "
                         f"{sorted(LAYOUTS)}")
    where = f"{ckpt.path}: model_type={layout.dense}"
    biases = ("attention_bias", "mlp_bias") if layout.dense == "llama" else ("mlp_bias",)
    for key in biases:
        if cfg.get(key):
            raise ValueError(f"{where}: {key}=True has no place in the {layout.architecture} layout")
    act_key = "hidden_activation" if layout.dense == "gemma3_text" else "hidden_act"
    act = cfg.get(act_key) or cfg.get("hidden_act") or layout.activation
    if act != layout.activation:
        raise ValueError(f"{where}: {act_key}={act!r}; moefy needs {layout.activation!r} for this family")
    if layout.dense in ("qwen2", "qwen3") and cfg.get("use_sliding_window"):
        raise ValueError(f"{where}: use_sliding_window=True is not supported by moefy (the MoE layout places "
                         f"the window on other layers)")
    return cfg


def layout_of(cfg: dict[str, Any]) -> Layout:
    """The layout of a config `check_dense` accepted."""
    return LAYOUTS[str(cfg["model_type"])]


def check_plan(cfg: dict[str, Any], shared_fraction: float) -> None:
    """ValueError if the family's layout cannot hold the requested shared expert."""
    layout = layout_of(cfg)
    if shared_fraction and not layout.has_shared:
        raise ValueError(f"--shared-fraction={shared_fraction}: the {layout.architecture} layout (dense "
                         f"model_type={layout.dense}) has no shared expert; use 0")


def moe_config(cfg: dict[str, Any], num_experts: int, top_k: int, num_shared: int, expert_size: int
               ) -> dict[str, Any]:
    """The config.json of the moefied model, in the layout of its dense family (`LAYOUTS`)."""
    layout = layout_of(cfg)
    if layout.dense == "gemma3_text":
        return _gemma3_moe_config(cfg, num_experts, top_k, num_shared, expert_size)
    theta = cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    rope_parameters = cfg.get("rope_parameters") or {"rope_type": "default", "rope_theta": theta}
    out = {
        "architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe",
        "vocab_size": cfg["vocab_size"], "hidden_size": cfg["hidden_size"],
        "intermediate_size": cfg["intermediate_size"], "moe_intermediate_size": expert_size,
        "shared_expert_intermediate_size": num_shared, "num_hidden_layers": cfg["num_hidden_layers"],
        "num_attention_heads": cfg["num_attention_heads"],
        "num_key_value_heads": cfg.get("num_key_value_heads", cfg["num_attention_heads"]),
        "head_dim": cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"],
        "num_experts": num_experts, "num_experts_per_tok": top_k, "norm_topk_prob": True,
        "decoder_sparse_step": 1, "mlp_only_layers": [], "qkv_bias": False, "hidden_act": "silu",
        "rms_norm_eps": cfg.get("rms_norm_eps", 1e-6), "rope_theta": theta, "rope_parameters": rope_parameters,
        "max_position_embeddings": cfg.get("max_position_embeddings", 2048), "use_sliding_window": False,
        "tie_word_embeddings": False,
        "bos_token_id": cfg.get("bos_token_id"), "eos_token_id": cfg.get("eos_token_id"),
        "pad_token_id": cfg.get("pad_token_id"), "output_router_logits": False, "dtype": "float32",
    }
    if cfg.get("rope_scaling"):
        out["rope_scaling"] = cfg["rope_scaling"]
    if layout.dense == "qwen2":
        out["qkv_bias"] = True  # HF Qwen2 always has q/k/v biases
    if layout.dense == "qwen3":
        for key in ("shared_expert_intermediate_size", "qkv_bias"):
            del out[key]
        out.update({"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
                    "attention_bias": bool(cfg.get("attention_bias", False))})
    return out


def _gemma3_moe_config(cfg: dict[str, Any], num_experts: int, top_k: int, num_shared: int, expert_size: int
                       ) -> dict[str, Any]:
    """mixserve's Gemma3-MoE config (`models/gemma3_moe.py`): the dense Gemma3 text config, every field
    kept (RoPE tables, layer types, softcaps, tied head), plus the MoE fields."""
    drop = ("architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "auto_map")
    out = {k: v for k, v in cfg.items() if k not in drop}
    return {"architectures": ["Gemma3MoeForCausalLM"], "model_type": "gemma3_moe_text", **out,
            "hidden_activation": "gelu_pytorch_tanh", "num_experts": num_experts, "num_experts_per_tok": top_k,
            "moe_intermediate_size": expert_size, "shared_expert_intermediate_size": num_shared,
            "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [], "dtype": "float32",
            "_note": "mixserve's own layout (mixserve/models/gemma3_moe.py); transformers has no class for it"}


@dataclass
class Calibrated:
    """A dense model and its recorded FFN traffic: what every moefy variant of it starts from."""

    ckpt: Checkpoint
    config: dict[str, Any]
    """The dense HF config."""
    tensors: dict[str, torch.Tensor]
    """Every dense tensor (HF names, float32)."""
    records: list[FFNRecord]
    """Per layer, the FFN inputs and intermediate activations on the calibration tokens."""
    calibration: dict[str, Any]
    """source, sha256, num_tokens."""


def calibrate(config: MoefyConfig, progress: bool = True) -> Calibrated:
    """Load the dense model named by `config` and record its FFNs on the calibration text."""
    ckpt = load_checkpoint(resolve_model(config.model, config.cache_dir, progress=progress))
    cfg = check_dense(ckpt)
    check_plan(cfg, config.shared_fraction)  # fail early
    plan_sizes(int(cfg["intermediate_size"]), config.num_experts, config.shared_fraction)
    tensors = dict(ckpt.weights(dtype=torch.float32))
    dense: Any = build_model(cfg, torch.float32)
    dense.load_weights(tensors.items())
    dense.eval()
    cal = calibration_text(config.calibration_files)
    windows = token_windows([ckpt.tokenizer.encode(t) for t in cal.texts], config.window,
                            config.max_calibration_tokens)
    num_tokens = sum(map(len, windows))
    _log(progress, f"recording FFN activations on {num_tokens} calibration tokens")
    records = record_ffn(dense, windows)
    return Calibrated(ckpt, cfg, tensors, records,
                      {"source": cal.source, "sha256": cal.sha256, "num_tokens": num_tokens})


def moefy(config: MoefyConfig, progress: bool = True, calibrated: Calibrated | None = None) -> MoefyReport:
    """Build and write the MoE checkpoint (see the module docstring); returns the report also written
    to `OUT/moefy.json`. `calibrated`: reuse a recording of the same model and calibration text."""
    start = time.perf_counter()
    out = Path(config.out)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"output folder {out} exists and is not empty")
    cal = calibrated if calibrated is not None else calibrate(config, progress)
    cfg, tensors = cal.config, cal.tensors
    check_plan(cfg, config.shared_fraction)
    layout = layout_of(cfg)
    num_shared, expert_size = plan_sizes(int(cfg["intermediate_size"]), config.num_experts,
                                         config.shared_fraction)
    report = MoefyReport(str(out), config.num_experts, config.top_k, num_shared, expert_size, config.method,
                         dict(cal.calibration), pregate_from=config.pregate_from)
    moe_tensors = {k: v for k, v in tensors.items() if ".mlp." not in k}
    if layout.untie:  # an explicit LM head, same values: every loader of those layouts reads that the same way
        moe_tensors.setdefault("lm_head.weight", tensors["model.embed_tokens.weight"].clone())
    elif cfg.get("tie_word_embeddings", True):  # gemma3: kept tied (the 262k-row embedding is most of it)
        moe_tensors.pop("lm_head.weight", None)
    routes = []
    for layer, rec in enumerate(cal.records):
        layer_tensors, ids = _layer_tensors(layer, rec.x, rec.h, tensors, config, num_shared, report, layout)
        moe_tensors.update(layer_tensors)
        routes.append(ids)
        _log(progress, f"layer {layer}: router recall {report.router_recall[-1]:.3f}, "
                       f"covered mass {report.covered_mass[-1]:.3f}")
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in moe_tensors.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    hf = moe_config(cfg, config.num_experts, config.top_k, num_shared, expert_size)
    (out / "config.json").write_text(json.dumps(hf, indent=2))
    (out / "generation_config.json").write_text(json.dumps(cal.ckpt.generation_config or {}, indent=2))
    _write_tokenizer(cal.ckpt, out)
    report.pregate_recall, report.pregate_recall_2k = write_dense_pregate(
        cal.records[0].x, routes, config.num_experts, config.top_k, out)
    if config.pregate_from == "moe":
        _log(progress, "fitting the pre-gate on the written model's own routing")
        refit = refit_pregate(RefitConfig(str(out), target_recall=config.target_recall,
                                          calibration_files=config.calibration_files,
                                          max_calibration_tokens=config.pregate_tokens,
                                          window=config.window, seed=config.seed))
        report.pregate_recall, report.pregate_recall_2k = refit.recall_top_k, refit.recall_2k
        report.pregate_top_m = refit.top_m
    report.seconds = time.perf_counter() - start
    (out / "moefy.json").write_text(json.dumps({"config": asdict(config), "report": asdict(report)}, indent=2))
    return report


def _layer_tensors(layer: int, x: torch.Tensor, h: torch.Tensor, dense: dict[str, torch.Tensor],
                   config: MoefyConfig, num_shared: int, report: MoefyReport, layout: Layout
                   ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """One layer's MoE tensors in `layout` (split, router, the rescalings of the module docstring) and
    the router's `[num_tokens, top_k]` choice on the calibration tokens."""
    p = f"model.layers.{layer}.mlp"
    gate, up, down = dense[f"{p}.gate_proj.weight"], dense[f"{p}.up_proj.weight"], dense[f"{p}.down_proj.weight"]
    split = split_neurons(h, gate, config.num_experts, num_shared, config.method, seed=config.seed + layer)
    target = expert_mass(h, split)  # [num_tokens, num_experts]
    k, e = config.top_k, config.num_experts
    if k == e:
        router = torch.zeros(e, x.shape[1])
        report.router_recall.append(1.0)
        report.covered_mass.append(1.0)
        ids = torch.arange(e).expand(x.shape[0], e)
    else:
        w = fit_router(x, target)
        logits = x @ w.T
        ids = logits.topk(k, dim=1).indices
        spread = float((logits.max(1).values - logits.min(1).values).max().clamp(min=1e-12))
        router = w * (ROUTER_SPREAD / spread)
        report.router_recall.append(topk_recall(logits, target, k))
        chosen = logits.topk(k, dim=1).indices
        report.covered_mass.append(float(target.gather(1, chosen).sum(1).mean()))
    out = {f"{p}.gate.weight": router}
    if layout.shared_gate:  # Qwen2-MoE: sigmoid(0) = 1/2 on the shared expert, undone by doubling down
        out.update({f"{p}.shared_expert.gate_proj.weight": gate[split.shared],
                    f"{p}.shared_expert.up_proj.weight": up[split.shared],
                    f"{p}.shared_expert.down_proj.weight": 2.0 * down[:, split.shared],
                    f"{p}.shared_expert_gate.weight": torch.zeros(1, x.shape[1])})
    elif num_shared:  # Gemma3-MoE: an ungated shared expert (Qwen3-MoE has none: num_shared is 0)
        out.update({f"{p}.shared_expert.gate_proj.weight": gate[split.shared],
                    f"{p}.shared_expert.up_proj.weight": up[split.shared],
                    f"{p}.shared_expert.down_proj.weight": down[:, split.shared]})
    for i, idx in enumerate(split.experts):
        out[f"{p}.experts.{i}.gate_proj.weight"] = gate[idx]
        out[f"{p}.experts.{i}.up_proj.weight"] = up[idx]
        out[f"{p}.experts.{i}.down_proj.weight"] = float(k) * down[:, idx]
    return out, ids


def _write_tokenizer(ckpt: Checkpoint, out: Path) -> None:
    """tokenizer.json (+ tokenizer_config.json with the special tokens and chat template)."""
    tok = ckpt.tokenizer
    tok.backend.save(str(out / "tokenizer.json"))
    special = {"bos_token": tok.bos_token_id, "eos_token": tok.eos_token_id, "pad_token": tok.pad_token_id,
               "unk_token": tok.unk_token_id}
    tok_config: dict[str, Any] = {k: tok.backend.id_to_token(v) for k, v in special.items() if v is not None}
    if not tok.chat_template_is_default and tok.chat_template:
        tok_config["chat_template"] = tok.chat_template
    (out / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2))


def _log(enabled: bool, message: str) -> None:
    if enabled:
        print(f"[moefy] {message}", file=sys.stderr, flush=True)
