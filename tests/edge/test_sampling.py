"""Seeded sampling on the split model: the same token whichever side decides a position.

- τ > 1 (always defer), fp32 transfer: seeded sampled tokens equal the unsplit engine's
  (`LLM.generate` with the same seed) exactly, for temperature / top-k / top-p / min-p / penalties /
  logit bias / min_tokens, dense and MoE;
- τ = 0: equal edge-only sampling (layers [0, K) + the exit head, the same sampler and seeding);
- the exit rule reads the processed distribution; frames of another version or with a bad sampling
  block are refused with a clear error.
"""

from __future__ import annotations

import functools
from typing import Any

import pytest
import torch

from mixserve.edge.codec import Codec
from mixserve.edge.edge import Stopping
from mixserve.edge.frames import ErrorCode, Frame, FrameKind, decode_frame, pack_body
from mixserve.edge.sampling import SplitSampling, TokenPicker, for_sample
from mixserve.edge.stage import SequenceStage
from mixserve.sampling_params import SamplingParams
from tests.edge.conftest import PROMPT, Split

MAX_TOKENS = 12
PARAMS = {
    "plain": dict(temperature=1.0),
    "filters": dict(temperature=0.8, top_k=20, top_p=0.9, min_p=0.02),
    "penalties": dict(temperature=1.2, repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.4,
                      logit_bias={3: 4.0, 7: -100.0}),
}


@functools.lru_cache(maxsize=4)
def unsplit(path: str) -> Any:
    """The real engine over the same checkpoint (one per model for the whole module)."""
    from mixserve.llm import LLM

    return LLM(path, num_blocks=16, block_size=16, max_model_len=64)


def params(name: str, seed: int = 11, **kw: Any) -> SamplingParams:
    return SamplingParams(**PARAMS[name], seed=seed, max_tokens=MAX_TOKENS, ignore_eos=True, **kw)


def edge_only(model: Any, k: int, p: SamplingParams, n: int) -> list[int]:
    """Reference: layers [0, k) + the final norm and head, the project's sampler, position seeding."""
    stage = SequenceStage(model, 0, k, 64, torch.float32)
    picker, s = TokenPicker(), for_sample(p, len(PROMPT), p.seed)
    out: list[int] = []
    ids = PROMPT
    with torch.inference_mode():
        while len(out) < n:
            logits = model.head(stage.forward(token_ids=ids)[-1:])[0]
            out.append(picker.pick(logits, s, PROMPT + out, len(PROMPT) + len(out))[0])
            ids = out[-1:]
    return out


def run_edge(split: Split, k: int, tau: float, p: SamplingParams, **kw: Any) -> Any:
    edge, _ = split.edge(split.cloud(k), k, tau=tau, **kw)
    edge.eos_token_ids = (2,)  # the tokenizer's `t2`, as the engine has it
    return edge.generate(PROMPT, MAX_TOKENS, sampling=for_sample(p, len(PROMPT), p.seed),
                         stopping=Stopping(p.ignore_eos, p.min_tokens, p.stop_token_ids))


SEEDS = {"plain": 11, "filters": 2**63 + 5, "penalties": -3}


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_always_defer_samples_the_unsplit_engines_tokens(split: Split, name: str) -> None:
    p = params(name, SEEDS[name])
    want = list(unsplit(str(split.path)).generate([PROMPT], p)[0].outputs[0].token_ids)
    result = run_edge(split, 2, 1.5, p)
    assert result.token_ids == want
    assert result.sources == ["cloud"] * MAX_TOKENS


def test_seeds_matter(llama: Split) -> None:
    # different seeds give different samples (the equality above would be vacuous otherwise)
    one, two = (run_edge(llama, 2, 1.5, params("plain", seed)).token_ids for seed in (1, 2))
    assert one != two


def test_min_tokens_and_logprobs_follow_the_engine(llama: Split) -> None:
    llm = unsplit(str(llama.path))
    p = SamplingParams(temperature=1.0, seed=5, max_tokens=MAX_TOKENS, min_tokens=6, stop_token_ids=(9,),
                       logit_bias={9: 6.0}, logprobs=3)
    want = llm.generate([PROMPT], p)[0].outputs[0]
    result = run_edge(llama, 1, 2.0, p)
    n = len(want.token_ids)
    assert result.token_ids[:n] == list(want.token_ids) and 9 not in result.token_ids[:6]
    assert want.logprobs is not None
    for got, ref in zip(result.logprobs, want.logprobs):
        assert {t: (round(lp.logprob, 4), lp.rank) for t, lp in got.items()} == \
            {t: (round(lp.logprob, 4), lp.rank) for t, lp in ref.items()}


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_tau_zero_is_edge_only_sampling(split: Split, name: str) -> None:
    p = params(name)
    result = run_edge(split, 2, 0.0, p)
    assert result.token_ids == edge_only(split.model, 2, p, MAX_TOKENS)
    assert result.sources == ["edge"] * MAX_TOKENS


def test_exit_rule_reads_the_processed_distribution(llama: Split) -> None:
    # a low temperature sharpens the distribution: more tokens exit at the same τ
    hot = run_edge(llama, 2, 0.3, SamplingParams(temperature=2.0, seed=3, ignore_eos=True))
    cold = run_edge(llama, 2, 0.3, SamplingParams(temperature=0.2, seed=3, ignore_eos=True))
    assert cold.sources.count("edge") > hot.sources.count("edge")
    assert all((s == "edge") == (prob >= 0.3) for s, prob in zip(cold.sources, cold.exit_probs))


def test_lossy_codec_and_sampling_still_decides_every_token(llama: Split) -> None:
    result = run_edge(llama, 2, 0.5, params("penalties"), codec=Codec.INT8)
    assert len(result.token_ids) == MAX_TOKENS and "standalone" not in result.sources


def test_old_versions_and_bad_sampling_blocks_are_refused(llama: Split) -> None:
    service = llama.cloud(2)
    sid, key = b"s" * 16, service.model_key
    old = bytearray(Frame(FrameKind.OPEN, sid, key, count=64).encode())
    old[4] = 1  # version 1: before sampling blocks
    err = decode_frame(service.handle(bytes(old))[0], 1 << 20)
    assert err.kind is FrameKind.ERROR and "version 1 is not supported (this is 2)" in err.payload.decode()
    for block, message in ((b"{not json", "malformed"), (b'{"seed": 1, "num_prompt": 0, "temperature": -1}',
                                                          "temperature"),
                           (b'{"seed": 1, "num_prompt": 0, "warp": 2}', "warp")):
        flags, payload = pack_body(block, None)
        err = decode_frame(service.handle(Frame(FrameKind.OPEN, sid, key, count=64, payload=payload,
                                                code=flags).encode())[0], 1 << 20)
        assert err.kind is FrameKind.ERROR and err.code == ErrorCode.BAD_REQUEST, err
        assert message in err.payload.decode()
    assert not service.manager.sessions  # nothing was opened


def test_sampling_block_round_trips() -> None:
    s = for_sample(params("penalties", seed=2**64 - 1), 7, 2**64 - 1)
    assert SplitSampling.from_json(s.to_json()) == s and s.needs_ids and not s.is_default


def test_naive_split_and_rebuilt_sessions_sample_the_same(llama: Split) -> None:
    p = params("penalties", seed=9)
    want = list(unsplit(str(llama.path)).generate([PROMPT], p)[0].outputs[0].token_ids)
    assert run_edge(llama, 2, 1.5, p, naive=True).token_ids == want  # params + ids in every INFER_FULL
    service = llama.cloud(2)
    edge, _ = llama.edge(service, 2, tau=1.5)
    edge.eos_token_ids = (2,)

    def evict(token: int, source: str, entry: object) -> bool:
        if len(service.manager.sessions) and edge.stats.num_tokens in (3, 7):
            service.manager.sessions.clear()  # as a restart or an eviction would
        return False

    result = edge.generate(PROMPT, MAX_TOKENS, sampling=for_sample(p, len(PROMPT), p.seed),
                           stopping=Stopping(True), on_step=evict)
    assert result.token_ids == want and result.sources == ["cloud"] * MAX_TOKENS
    assert edge.link.num_rebuilds == 2  # reopened with the sampling block, resent with the token ids


def test_standalone_fallback_draws_the_edge_only_sample(llama: Split) -> None:
    p = params("filters", seed=4)
    edge, _ = llama.edge(None, 2, tau=1.5)  # no cloud at all: every deferral falls back
    result = edge.generate(PROMPT, MAX_TOKENS, sampling=for_sample(p, len(PROMPT), p.seed),
                           stopping=Stopping(True))
    assert result.sources == ["standalone"] * MAX_TOKENS
    assert result.token_ids == edge_only(llama.model, 2, p, MAX_TOKENS)
