"""One benchmark run of the MoE budget benchmark, in its own (possibly memory-limited) process.

`run(spec)` builds the MoE model (the OLMoE-shaped random one, or `--model`, e.g. a moefied one) with
the expert provider of `spec["mode"]`:
  ram       every expert resident: the same BudgetedExpertProvider at 100%, all experts read up front
            (one code path with the budgeted modes, so (a) is their honest ceiling)
  mmap      zero-copy views of the mmap'd checkpoint (page cache only)
  ondemand  read on every use, nothing kept, no prediction
  lru       BudgetedExpertProvider, LRU, no prediction
  lookahead as ours, with the layer-ahead router lookahead even where a pre-gate exists (comparison)
  gate      as ours, with the learned d-layer-ahead gates (`aheadgate.safetensors`, written by moefy /
            refit-pregate) at their calibrated per-layer widths (real routing only)
  ours      BudgetedExpertProvider, LFRU + prefetch from the pre-gating router when the model has one
            (`pregate.safetensors`, written by moefy: all layers at once), else next-layer prefetch
            (router on real routing, affinity on synthetic routing, where the router cannot see the
            replayed choice); per-layer capacity planned from the routing trace the ram run recorded
            on a different (planning) prompt (ours and lookahead)
then prefills `prefill_tokens` ids (`spec["prompt_ids"]`: real text; else random ids) in one forward
pass and decodes greedily, timing both.
With `trace == "zipf"` routing comes from `SyntheticRouting` (same seed in every run: identical
routes across modes) through the replay seam; with `trace == "replay"` from a real model's recorded
routing (`record_real_trace.py`: the first layers of a moefied real model of the same E and top-k), and
lookahead/gate/ours then replay that model's recorded predictions (`ReplayedPredictor`): the random
model's own hidden states carry nothing to predict from. Returns one JSON-able dict.
"""

from __future__ import annotations

import resource
import time
from pathlib import Path
from typing import Any

import torch
from moe_baselines import MmapExpertProvider, OnDemandProvider

from mixserve.experts.aheadgate import AHEADGATE_FILE, AheadGate
from mixserve.experts.budgeted import BudgetedExpertProvider
from mixserve.experts.capacity import plan_capacity_from_trace
from mixserve.experts.predict import AffinityPredictor, RouterLookahead
from mixserve.experts.prediction_trace import ReplayedPredictor, load_predictions
from mixserve.experts.pregate import PREGATE_FILE, PreGate
from mixserve.experts.setup import moe_routers, total_expert_nbytes
from mixserve.experts.store import ExpertStore
from mixserve.experts.synthetic import SyntheticRouting, SyntheticRoutingConfig
from mixserve.experts.trace import RoutingTrace, TraceReplay, TraceStep
from mixserve.layers.attention import AttentionMetadata, KVCache
from mixserve.layers.moe import set_route_source
from mixserve.loading.checkpoint import open_weights
from mixserve.models.base import model_class
from mixserve.runner.model_runner import allocate_kv_caches

DTYPE = torch.bfloat16


def _disk_read_bytes() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    return 0


def _provider(spec: dict[str, Any], store: ExpertStore) -> Any:
    mode = spec["mode"]
    if mode == "ram":
        ram = BudgetedExpertProvider(store, total_expert_nbytes(store, DTYPE), DTYPE, policy="lru",
                                     io_threads=spec["io_threads"])
        ram.preload()
        return ram
    if mode == "mmap":
        return MmapExpertProvider(Path(spec["checkpoint"]))
    if mode == "ondemand":
        return OnDemandProvider(store, spec["budget_bytes"], DTYPE, spec["io_threads"])
    capacity = None
    if mode in ("ours", "lookahead", "gate") and spec.get("plan_trace") and Path(spec["plan_trace"]).is_file():
        slot = BudgetedExpertProvider.slot_sizes(store, DTYPE)
        capacity = plan_capacity_from_trace(RoutingTrace.load(spec["plan_trace"]), store.layer_ids,
                                            store.num_experts, slot, spec["budget_bytes"])
    return BudgetedExpertProvider(store, spec["budget_bytes"], DTYPE, policy="lru" if mode == "lru" else "lfru",  # noqa: E501
                                  io_threads=spec["io_threads"], capacity=capacity)


def first_layers(trace: RoutingTrace, layer_ids: list[int]) -> RoutingTrace:
    """The routing of `layer_ids` only (a model with fewer layers replaying the first ones)."""
    out = RoutingTrace()
    keep = set(layer_ids)
    for s in trace.steps:
        out.steps.append(TraceStep(s.positions, s.query_lens, {k: v for k, v in s.topk_ids.items() if k in keep},
                                   {k: v for k, v in s.topk_weights.items() if k in keep}))
    return out


def _replay(spec: dict[str, Any], model: Any, provider: Any, store: ExpertStore) -> None:
    """Routes and (for the predicting modes) predictions from the recorded real run."""
    folder = Path(spec["replay"])
    set_route_source(model, TraceReplay(first_layers(RoutingTrace.load(folder / "trace.npz"), store.layer_ids)))
    if isinstance(provider, BudgetedExpertProvider) and spec["mode"] in ("lookahead", "gate", "ours"):
        name = {"lookahead": "lookahead", "gate": "gate", "ours": "pregate"}[spec["mode"]]
        replayed = ReplayedPredictor(load_predictions(folder / "predictions.json")[name].restrict(store.layer_ids),
                                     store.layer_ids)
        if spec["mode"] == "ours":
            provider.step_predictor = replayed
        else:
            provider.predictor = replayed


def _build(spec: dict[str, Any]) -> tuple[Any, Any, ExpertStore]:
    pack = Path(spec["pack"])
    cfg, source = open_weights(pack)
    with torch.device("cpu"):
        model: Any = model_class(cfg)(cfg)
    store = ExpertStore(pack, direct_io=spec["direct_io"], verify_checksums=False)
    provider = _provider(spec, store)
    model.set_expert_provider(provider)
    model = model.to(DTYPE)
    model.load_weights((n, t.to(DTYPE)) for n, t in source.iter_tensors())
    if spec["trace"] == "replay":
        _replay(spec, model, provider, store)
    elif spec["mode"] in ("ours", "lookahead", "gate") and isinstance(provider, BudgetedExpertProvider):
        top_k = int(cfg["num_experts_per_tok"])
        pregate = Path(spec["checkpoint"]) / PREGATE_FILE
        if spec["mode"] == "gate":
            if spec["trace"] != "real" or not (Path(spec["checkpoint"]) / AHEADGATE_FILE).is_file():
                raise ValueError("mode 'gate' needs real routing and the model's aheadgate.safetensors")
            provider.predictor = AheadGate.load(spec["checkpoint"])
        elif spec["mode"] == "ours" and spec["trace"] == "real" and pregate.is_file():
            provider.step_predictor = PreGate.load(pregate.parent, 2 * top_k)  # top-2k: ~97% recall
        else:
            provider.predictor = (AffinityPredictor(store.layer_ids, store.num_experts, top_k)
                                  if spec["trace"] == "zipf" else RouterLookahead(moe_routers(model), top_k))
    if spec["trace"] == "zipf":
        set_route_source(model, SyntheticRouting(SyntheticRoutingConfig(
            tuple(store.layer_ids), store.num_experts, int(cfg["num_experts_per_tok"]),
            zipf_alpha=spec["zipf_alpha"], stickiness=spec["stickiness"], affinity=spec["affinity"],
            seed=spec["seed"])))
    return model.eval(), provider, store


def _forward(model: Any, kv: list[KVCache], ids: list[int], start: int) -> int:
    """Run `ids` at positions start.. of one sequence (slots = positions); returns the argmax token."""
    n = len(ids)
    positions = torch.arange(start, start + n)
    meta = AttentionMetadata(query_lens=[n], seq_lens=[start + n], slot_mapping=positions,
                             kv_slots=torch.arange(start + n)[None, :], q_index=None)
    hidden = model.forward_layers(model.embed(torch.tensor(ids)), positions, meta, kv, 0, len(kv))
    return int(model.head(hidden[-1:]).argmax())


def _counters(provider: Any) -> dict[str, float]:
    if isinstance(provider, BudgetedExpertProvider):
        return provider.expert_stats()
    if isinstance(provider, OnDemandProvider):
        return {"expert_hit_rate": 0.0, "expert_bytes_read": float(provider.bytes_read),
                "expert_stall_seconds": provider.stall_seconds, "expert_prefetch_recall": float("nan")}
    return {}


def _reset(provider: Any) -> None:
    if isinstance(provider, BudgetedExpertProvider):
        provider.reset_stats()
    elif isinstance(provider, OnDemandProvider):
        provider.bytes_read, provider.stall_seconds = 0, 0.0


def _phase(provider: Any, tokens: int, seconds: float, disk0: int) -> dict[str, float]:
    c = _counters(provider)
    out = {"tok_s": tokens / seconds, "seconds": seconds,
           "disk_bytes_per_token": (_disk_read_bytes() - disk0) / tokens}
    if c:
        out.update(hit_rate=c["expert_hit_rate"], bytes_per_token=c["expert_bytes_read"] / tokens,
                   stall_share=c["expert_stall_seconds"] / seconds, recall=c["expert_prefetch_recall"])
    return out


def _record_plan_trace(model: Any, spec: dict[str, Any]) -> None:
    """Routing of the planning prompt (prefill + `plan_decode_tokens` greedy steps), saved for `ours`."""
    trace = RoutingTrace()
    model.set_routing_observer(trace)
    ids = list(spec["plan_prompt_ids"])
    n = spec.get("plan_decode_tokens", 32)
    kv = allocate_kv_caches(model.kv_cache_spec(), len(ids) + n + 1, 1, DTYPE)
    token = _forward(model, kv, ids, 0)
    for pos in range(len(ids), len(ids) + n):
        token = _forward(model, kv, [token], pos)
    model.set_routing_observer(None)
    trace.save(spec["plan_trace"])


@torch.inference_mode()
def run(spec: dict[str, Any]) -> dict[str, Any]:
    torch.set_num_threads(spec["threads"])
    load_start = time.perf_counter()
    model, provider, store = _build(spec)
    load_s = time.perf_counter() - load_start
    total = spec["prefill_tokens"] + spec["warmup_tokens"] + spec["decode_tokens"] + 1
    kv = allocate_kv_caches(model.kv_cache_spec(), total, 1, DTYPE)
    gen = torch.Generator().manual_seed(spec["seed"])
    prompt = (list(spec["prompt_ids"])[:spec["prefill_tokens"]] if spec.get("prompt_ids") else
              torch.randint(0, int(model.args.vocab_size), (spec["prefill_tokens"],), generator=gen).tolist())
    _reset(provider)
    disk0, start = _disk_read_bytes(), time.perf_counter()
    token = _forward(model, kv, prompt, 0)
    prefill = _phase(provider, len(prompt), time.perf_counter() - start, disk0)
    pos = len(prompt)
    for _ in range(spec["warmup_tokens"]):
        token = _forward(model, kv, [token], pos)
        pos += 1
    _reset(provider)
    disk0, start = _disk_read_bytes(), time.perf_counter()
    for _ in range(spec["decode_tokens"]):
        token = _forward(model, kv, [token], pos)
        pos += 1
    decode = _phase(provider, spec["decode_tokens"], time.perf_counter() - start, disk0)
    if isinstance(provider, BudgetedExpertProvider):
        provider.check()
        decode["resident_bytes"] = float(provider.resident_nbytes())
        decode["layer_recall"] = {str(k): v for k, v in provider.layer_recall().items()}
    if spec["mode"] == "ram" and spec.get("plan_trace") and spec.get("plan_prompt_ids"):
        _record_plan_trace(model, spec)
    return {"load_s": load_s, "prefill": prefill, "decode": decode,
            "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
