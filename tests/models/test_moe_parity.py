"""MoE families vs HF transformers on tiny random checkpoints written by `save_pretrained`.

Each family is checked for: prompt logits (fp32), greedy continuation vs `generate`, packed batch ==
single sequences, routing trace == HF's router, the HF 5.x fused in-memory expert layout, weight errors,
and a bfloat16 smoke run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from safetensors.torch import load_file

from mixserve.experts import RoutingTrace
from mixserve.models.base import WeightError, build_model, model_class
from tests.harness import forward_packed, greedy, make_kv_caches, prefill_logits

COMMON = dict(vocab_size=256, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
              initializer_range=0.1, eos_token_id=None, bos_token_id=None, pad_token_id=0)
FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "mixtral": ("Mixtral", dict(num_hidden_layers=2, intermediate_size=32, num_local_experts=8,
                                num_experts_per_tok=2, rope_theta=10000.0)),
    "mixtral_sliding": ("Mixtral", dict(num_hidden_layers=2, intermediate_size=32, num_local_experts=4,
                                        num_experts_per_tok=2, sliding_window=5)),
    "qwen2_moe": ("Qwen2Moe", dict(num_hidden_layers=3, intermediate_size=96, moe_intermediate_size=32,
                                   shared_expert_intermediate_size=48, num_experts=8, num_experts_per_tok=2,
                                   mlp_only_layers=[1], norm_topk_prob=False)),
    "qwen3_moe": ("Qwen3Moe", dict(num_hidden_layers=3, intermediate_size=96, moe_intermediate_size=32,
                                   num_experts=6, num_experts_per_tok=2, head_dim=32, mlp_only_layers=[0],
                                   norm_topk_prob=True)),
    "qwen2_moe_tied": ("Qwen2Moe", dict(num_hidden_layers=2, intermediate_size=96, moe_intermediate_size=32,
                                        shared_expert_intermediate_size=48, num_experts=4, num_experts_per_tok=2,
                                        tie_word_embeddings=True)),
    "olmoe": ("Olmoe", dict(num_hidden_layers=2, intermediate_size=32, num_experts=8, num_experts_per_tok=2,
                            clip_qkv=1.5, norm_topk_prob=False)),
}
PROMPT = [3, 17, 99, 5, 200, 41, 7, 8, 150, 33, 64]


@dataclass
class Family:
    hf: Any
    """The HF model (typed Any: its methods are untyped for mypy)."""
    config: dict[str, Any]
    path: Path

    def ours(self, dtype: torch.dtype = torch.float32) -> Any:
        model: Any = build_model(self.config, dtype)
        model.load_weights((k, v.to(dtype)) for k, v in load_file(self.path / "model.safetensors").items())
        return model.eval()


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Family:
    prefix, kwargs = FAMILIES[request.param]
    torch.manual_seed(0)
    cfg = getattr(transformers, f"{prefix}Config")(**COMMON, **kwargs)
    hf = getattr(transformers, f"{prefix}ForCausalLM")(cfg).eval()
    with torch.no_grad():  # norms start at 1 and biases at 0: perturb them so loading bugs show
        for name, p in hf.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.2 * torch.randn_like(p))
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    return Family(hf, json.loads((path / "config.json").read_text()), path)


def hf_logits(hf: Any, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].float()


def test_prompt_logits_match_hf(family: Family) -> None:
    torch.testing.assert_close(prefill_logits(family.ours(), PROMPT), hf_logits(family.hf, PROMPT),
                               atol=1e-4, rtol=1e-4)


def test_greedy_matches_hf_generate(family: Family) -> None:
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        ref = family.hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
    assert greedy(family.ours(), PROMPT, 8) == ref[0, len(PROMPT):].tolist()


def test_packed_batch_equals_single(family: Family) -> None:
    model = family.ours()
    a, b = PROMPT[:7], [9, 250, 4, 77, 1, 60]
    # Both prompts fresh in one packed prefill.
    kv = make_kv_caches(model, 2 * 4096, torch.float32)  # seq_ids 0 and 1 at stride 4096
    packed = forward_packed(model, kv, [a, b], [0, 0], [0, 1])
    torch.testing.assert_close(packed[:len(a)], prefill_logits(model, a), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed[len(a):], prefill_logits(model, b), atol=1e-5, rtol=1e-5)
    # Then a decode of `a` packed with a 3-token chunk of `b` over the cached context.
    step = forward_packed(model, kv, [[11], [12, 13, 14]], [len(a), len(b)], [0, 1])
    torch.testing.assert_close(step[0], prefill_logits(model, a + [11])[-1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(step[1:], prefill_logits(model, b + [12, 13, 14])[-3:], atol=1e-5, rtol=1e-5)


def test_trace_matches_hf_router(family: Family) -> None:
    model = family.ours()
    trace = RoutingTrace()
    model.set_routing_observer(trace)
    prefill_logits(model, PROMPT)
    with torch.no_grad():
        router_logits = family.hf(torch.tensor([PROMPT]), output_router_logits=True).router_logits
    assert trace.num_steps == 1 and len(trace.layer_ids()) == len(router_logits)
    top_k = family.hf.config.num_experts_per_tok
    for layer_idx, logits in zip(trace.layer_ids(), router_logits):
        probs = torch.softmax(logits.reshape(len(PROMPT), -1).float(), dim=-1)
        assert torch.equal(trace.steps[0].topk_ids[layer_idx], probs.topk(top_k).indices)
    model.set_routing_observer(None)
    prefill_logits(model, PROMPT)
    assert trace.num_steps == 1


def test_loads_hf_in_memory_fused_layout(family: Family) -> None:
    """HF 5.x module state dicts hold experts as `mlp.experts.gate_up_proj` `[E, 2*inter, hidden]`."""
    state = family.hf.state_dict()
    assert any(k.endswith("experts.gate_up_proj") for k in state)
    split = {}  # also 3-D gate and up apart (what a GGUF `ffn_gate_exps`/`ffn_up_exps` maps to)
    for name, t in state.items():
        if name.endswith("experts.gate_up_proj"):
            gate, up = t.chunk(2, dim=1)
            split[name.replace("gate_up_proj", "gate_proj")] = gate
            split[name.replace("gate_up_proj", "up_proj")] = up
        else:
            split[name] = t
    ref = hf_logits(family.hf, PROMPT)
    for weights in (state, split):
        model: Any = build_model(family.config, torch.float32)
        model.load_weights(weights.items())
        torch.testing.assert_close(prefill_logits(model.eval(), PROMPT), ref, atol=1e-4, rtol=1e-4)


def test_weight_errors_name_the_tensor(family: Family) -> None:
    weights = load_file(family.path / "model.safetensors")
    expert = next(k for k in sorted(weights) if ".experts.0." in k)
    attn = "model.layers.0.self_attn.q_proj.weight"

    def load(w: dict[str, torch.Tensor]) -> None:
        model: Any = build_model(family.config, torch.float32)
        model.load_weights(w.items())

    for broken in ({k: v for k, v in weights.items() if k != expert},
                   {k: v for k, v in weights.items() if k != attn}):
        missing = (set(weights) - set(broken)).pop()
        with pytest.raises(WeightError, match=missing.replace(".", r"\.")):
            load(broken)
    for name in (expert, attn):
        with pytest.raises(WeightError, match=name.replace(".", r"\.")):
            load({**weights, name: weights[name][:-1]})
    with pytest.raises(WeightError, match="bogus"):
        load({**weights, "model.layers.0.bogus.weight": torch.zeros(3)})
    model = family.ours()
    model.load_weights(weights.items())  # a second full load into the same model is fine
    with pytest.raises(WeightError, match=expert.replace(".", r"\.")):
        model.load_weights([(expert, weights[expert]), (expert, weights[expert])])
    bad_expert = expert.replace(".experts.0.", ".experts.99.")
    with pytest.raises(WeightError, match=r"experts\.99"):
        load({**weights, bad_expert: weights[expert]})


def test_bfloat16_runs_close_to_float32(family: Family) -> None:
    ref = prefill_logits(family.ours(), PROMPT)
    out = prefill_logits(family.ours(torch.bfloat16), PROMPT, dtype=torch.bfloat16)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    cos = torch.nn.functional.cosine_similarity(out, ref, dim=-1)
    assert cos.min() > 0.98, cos
    assert len(greedy(family.ours(torch.bfloat16), PROMPT, 3, dtype=torch.bfloat16)) == 3


def test_args_from_hf_config(family: Family) -> None:
    cls = model_class(family.config)
    args_cls = type(cls(family.config).args)
    required = "num_experts_per_tok"
    with pytest.raises(ValueError, match=required):
        args_cls.from_hf({k: v for k, v in family.config.items() if k != required})
    legacy = {k: v for k, v in family.config.items() if k != "rope_parameters"}
    assert args_cls.from_hf({**legacy, "rope_theta": 1234.0}).rope_theta == 1234.0
    assert args_cls.from_hf(family.config).rope_theta == family.config["rope_parameters"]["rope_theta"]


class CountingProvider:
    """A non-module provider wrapping the model's own: one `get` per MoE layer per step."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.layer_ids: list[int] = []

    def plan(self, layer_idx: int, x: Any, topk_ids: Any, active_ids: list[int]) -> list[list[int]]:
        return self.inner.plan(layer_idx, x, topk_ids, active_ids)

    def get(self, layer_idx: int, expert_ids: list[int]) -> Any:
        self.layer_ids.append(layer_idx)
        return self.inner.get(layer_idx, expert_ids)

    def release(self, weights: Any) -> None:
        self.inner.release(weights)


def test_swapped_provider_is_asked_once_per_layer(family: Family) -> None:
    model = family.ours()
    ref = prefill_logits(model, PROMPT)
    counting = CountingProvider(model.experts)
    model.set_expert_provider(counting)
    assert not any(".experts." in name for name, _ in model.named_parameters())
    torch.testing.assert_close(prefill_logits(model, PROMPT), ref, atol=0, rtol=0)
    assert counting.layer_ids == list(counting.inner.layer_ids)
