"""Batch-invariant mode (`batch_invariant=True`): a request's tokens and logprobs are bitwise the same
alone, beside 15 other requests, after a prefix-cache hit, with prompts chunked differently, and when
its generated text is scored again as a prompt (echo). The kernels' properties the mode relies on and
its attention's agreement with SDPA are checked first."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import transformers

from mixserve import LLM, SamplingParams
from mixserve.layers.invariant import InvariantAttention, tiled_linear
from mixserve.layers.quant import quantize_int8, quantize_weight
from tests.edge.conftest import CONFIGS, write_tokenizer


def test_tiled_linear_rows_do_not_depend_on_the_rest_of_the_call() -> None:
    torch.manual_seed(0)
    w, b = torch.randn(96, 80), torch.randn(96)
    x = torch.randn(1, 80)
    alone = tiled_linear(x, w, b)
    assert torch.allclose(alone, F.linear(x, w, b), atol=1e-5)
    for rows in (2, 5, 16, 17, 40):
        for place in (0, rows // 2, rows - 1):
            batch = torch.randn(rows, 80)
            batch[place] = x[0]
            assert torch.equal(tiled_linear(batch, w, b)[place], alone[0]), (rows, place)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_quantized_kernels_compute_each_row_alone(fmt: str) -> None:
    """The int8/int4 kernels need no tiling: a row's result is the same in any batch (measured here,
    relied on by the mode)."""
    torch.manual_seed(1)
    q = quantize_int8(torch.randn(128, 64)) if fmt == "int8" else quantize_weight(torch.randn(128, 64), "int4")
    x = torch.randn(1, 64)
    alone = q.matmul(x)
    for rows in (2, 3, 16, 33, 100):
        batch = torch.randn(rows, 64)
        batch[rows - 1] = x[0]
        assert torch.equal(q.matmul(batch)[rows - 1], alone[0])


class _Layer:
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, window: int | None) -> None:
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale, self.sliding_window = head_dim ** -0.5, window


def _reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: list[int], layer: _Layer) -> torch.Tensor:
    """Each query row alone: softmax over its visible keys (plain fp32 SDPA)."""
    outs = []
    g = layer.num_heads // layer.num_kv_heads
    for r, p in enumerate(positions):
        lo = 0 if layer.sliding_window is None else max(0, p - layer.sliding_window + 1)
        keys = k[lo:p + 1].repeat_interleave(g, dim=1).transpose(0, 1)  # [heads, n, d]
        vals = v[lo:p + 1].repeat_interleave(g, dim=1).transpose(0, 1)
        o = F.scaled_dot_product_attention(q[r][:, None], keys, vals, scale=layer.scale)
        outs.append(o.reshape(-1))
    return torch.stack(outs)


@pytest.mark.parametrize("window", [None, 5])
def test_invariant_attention_matches_sdpa_and_ignores_the_batch(window: int | None) -> None:
    torch.manual_seed(2)
    layer = _Layer(4, 2, 8, window)
    slots = 64
    cache = (torch.randn(slots, 2, 8), torch.randn(slots, 2, 8))
    # Sequence 0: 20 keys in slots 0..19, sequence 1: 37 keys in slots 20..56.
    ctx = [torch.arange(0, 20), torch.arange(20, 57)]
    # A prefill chunk of seq 1 (positions 30..36) beside one decode of seq 0 (position 19).
    positions, rows = [19] + list(range(30, 37)), [0] + [1] * 7
    q = torch.randn(len(positions), 4, 8)
    out = InvariantAttention(positions, rows, ctx).attend(q, cache, layer)  # type: ignore[arg-type]
    for r, (p, s) in enumerate(zip(positions, rows)):
        k, v = cache[0][ctx[s]], cache[1][ctx[s]]
        assert torch.allclose(out[r], _reference(q[r:r + 1], k, v, [p], layer)[0], atol=1e-5)
        alone = InvariantAttention([p], [0], [ctx[s]]).attend(q[r:r + 1], cache, layer)  # type: ignore[arg-type]
        assert torch.equal(alone[0], out[r]), r


# --- end to end on tiny random checkpoints of three families (dense fp32: the tiled path) ---------

TARGET = [5, 17, 99, 3, 250, 42, 42, 7, 128, 64, 11, 19, 23, 29, 31, 37, 41, 43, 47, 53, 59, 61]


@pytest.fixture(scope="module", params=["llama", "gemma3", "qwen3_moe"])
def folder(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp(request.param)
    transformers.AutoModelForCausalLM.from_config(CONFIGS[request.param]()).save_pretrained(path)
    write_tokenizer(path, 256)
    return path


def _run(llm: LLM, prompts: list[list[int]], params: list[SamplingParams]) -> tuple[list[int], list[float]]:
    out = llm.generate(prompts, params)[0].outputs[0]
    return list(out.token_ids), [d[t].logprob for d, t in zip(out.logprobs, out.token_ids, strict=True)]


def _others(n: int) -> tuple[list[list[int]], list[SamplingParams]]:
    rng = random.Random(3)
    prompts = [[rng.randrange(3, 256) for _ in range(rng.randrange(2, 40))] for _ in range(n)]
    params = [SamplingParams(max_tokens=rng.randrange(1, 20), temperature=1.0, seed=i, ignore_eos=True)
              for i in range(n)]
    return prompts, params


def test_a_request_is_bitwise_the_same_whatever_runs_beside_it(folder: Path) -> None:
    greedy = SamplingParams(max_tokens=12, temperature=0, logprobs=0, ignore_eos=True)
    llm = LLM(str(folder), batch_invariant=True, weight_format="dense")
    alone = _run(llm, [TARGET], [greedy])
    prompts, params = _others(15)
    beside = _run(llm, [TARGET] + prompts, [greedy] + params)
    # A prefix-cache hit: the first 16 tokens (one block) were cached by the runs above.
    hit = llm.generate([TARGET], greedy)[0]
    assert hit.num_cached_tokens >= 16
    cached = (list(hit.outputs[0].token_ids),
              [d[t].logprob for d, t in zip(hit.outputs[0].logprobs, hit.outputs[0].token_ids, strict=True)])
    assert alone == beside == cached
    # The prompt computed in chunks of 5 tokens, with no prefix cache.
    chunked = LLM(str(folder), batch_invariant=True, weight_format="dense", max_num_batched_tokens=5,
                  enable_prefix_caching=False)
    assert _run(chunked, [TARGET] + prompts[:3], [greedy] + params[:3]) == alone
    # Echo: the generated text scored as a prompt gives the generation's own logprobs.
    ids = TARGET + alone[0]
    scored = llm.generate([ids], SamplingParams(max_tokens=1, prompt_logprobs=0))[0].prompt_logprobs
    assert scored is not None
    echo = [d[t].logprob for d, t in zip(scored[len(TARGET):], alone[0], strict=True)]
    assert echo == alone[1]


def test_seeded_sampling_is_bitwise_the_same_beside_other_requests(folder: Path) -> None:
    sampled = SamplingParams(max_tokens=10, temperature=0.9, top_p=0.9, seed=7, logprobs=0, ignore_eos=True)
    llm = LLM(str(folder), batch_invariant=True, weight_format="dense", enable_prefix_caching=False)
    alone = _run(llm, [TARGET], [sampled])
    prompts, params = _others(15)
    assert _run(llm, [TARGET] + prompts, [sampled] + params) == alone


def test_the_default_mode_is_not_batch_invariant_on_dense_weights(tmp_path: Path) -> None:
    """What the mode buys: without it, the echo-scored logprobs of a dense model differ in the last bits
    from the generation's (prefill and decode run different kernels)."""
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(CONFIGS["llama"]()).save_pretrained(tmp_path)
    write_tokenizer(tmp_path, 256)
    results: dict[bool, Any] = {}
    for invariant in (False, True):
        llm = LLM(str(tmp_path), batch_invariant=invariant, weight_format="dense", enable_prefix_caching=False)
        gen = _run(llm, [TARGET], [SamplingParams(max_tokens=12, temperature=0, logprobs=0, ignore_eos=True)])
        scored = llm.generate([TARGET + gen[0]], SamplingParams(max_tokens=1, prompt_logprobs=0))[0].prompt_logprobs
        assert scored is not None
        echo = [d[t].logprob for d, t in zip(scored[len(TARGET):], gen[0], strict=True)]
        results[invariant] = (gen[1], echo)
    gen, echo = results[True]
    assert gen == echo
    gen, echo = results[False]
    assert gen != echo and max(abs(a - b) for a, b in zip(gen, echo)) < 1e-4
