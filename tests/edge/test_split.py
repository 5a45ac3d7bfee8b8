"""Edge [0, K) + cloud [K, L) against the whole model, in process (frames through a LocalLink).

- τ >= 1 (always defer) with fp32 transfer: greedy tokens equal the unsplit model's exactly, for
  every split layer, dense and MoE;
- τ = 0: never defers, equals the edge-only exit model (layers [0, K) + final norm + LM head);
- in between: exit rate falls as τ rises, agreement with the full model is reported;
- each position's hidden state crosses the link exactly once (bytes counted).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from mixserve.edge.codec import Codec
from mixserve.edge.frames import HEADER_BYTES
from mixserve.edge.stage import SequenceStage
from tests.edge.conftest import NUM_LAYERS, PROMPT, Split

MAX_TOKENS = 12


def greedy(model: Any, prompt: list[int], n: int, end: int | None = None) -> list[int]:
    """Reference: layers [0, end) (all by default) and the final head, one runner, greedy."""
    stage = SequenceStage(model, 0, end or NUM_LAYERS, 64, torch.float32)
    out: list[int] = []
    ids = prompt
    with torch.inference_mode():
        while len(out) < n:
            out.append(int(model.head(stage.forward(token_ids=ids)[-1:]).argmax(-1)))
            ids = out[-1:]
    return out


def test_whole_model_reference_matches_the_engine_path(llama: Split) -> None:
    from mixserve.llm import LLM  # the real engine (scheduler, runner) over the same checkpoint
    from mixserve.sampling_params import SamplingParams
    llm = LLM(str(llama.path), num_blocks=16, block_size=16, max_model_len=64)
    got = llm.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True))
    assert list(got[0].outputs[0].token_ids) == greedy(llama.model, PROMPT, MAX_TOKENS)


@pytest.mark.parametrize("k", range(1, NUM_LAYERS))
def test_always_defer_equals_the_whole_model(split: Split, k: int) -> None:
    want = greedy(split.model, PROMPT, MAX_TOKENS)
    edge, _ = split.edge(split.cloud(k), k, tau=1.0)
    result = edge.generate(PROMPT, MAX_TOKENS, ignore_eos=True)
    assert result.token_ids == want
    assert result.sources == ["cloud"] * MAX_TOKENS


def test_tau_zero_is_the_edge_only_exit_model(split: Split) -> None:
    service = split.cloud(2)
    edge, _ = split.edge(service, 2, tau=0.0)
    result = edge.generate(PROMPT, MAX_TOKENS, ignore_eos=True)
    assert result.token_ids == greedy(split.model, PROMPT, MAX_TOKENS, end=2)
    assert result.sources == ["edge"] * MAX_TOKENS
    assert service.manager.stats.num_computed_positions == 0  # lazy: the cloud never had to catch up


def test_exit_rate_and_agreement_across_thresholds(llama: Split) -> None:
    want = greedy(llama.model, PROMPT, MAX_TOKENS)
    rates = []
    for tau in (0.0, 0.05, 0.1, 0.2, 0.5, 1.0):
        edge, _ = llama.edge(llama.cloud(2), 2, tau=tau)
        result = edge.generate(PROMPT, MAX_TOKENS, ignore_eos=True)
        # Tokens are decided where the rule says: exit iff the head's top probability >= τ (τ < 1).
        assert all((s == "edge") == (p >= tau and tau < 1) for s, p in zip(result.sources, result.exit_probs))
        rates.append(edge.stats.exit_rate)
        # Until the first edge-decided token disagrees, the continuation is the full model's.
        first = next((i for i, s in enumerate(result.sources) if s == "edge"), MAX_TOKENS)
        assert result.token_ids[:first] == want[:first]
    assert rates == sorted(rates, reverse=True) and rates[0] == 1.0 and rates[-1] == 0.0


@pytest.mark.parametrize("codec", list(Codec))
def test_each_position_crosses_the_link_once(llama: Split, codec: Codec) -> None:
    service = llama.cloud(2)
    edge, _ = llama.edge(service, 2, tau=0.1, codec=codec)
    result = edge.generate(PROMPT, MAX_TOKENS, ignore_eos=True)
    stats = service.manager.stats
    positions = len(PROMPT) + MAX_TOKENS - 1  # the last token's position is never run
    assert stats.num_uploaded_positions == positions
    hidden_bytes = positions * codec.bytes_per_token(64)
    num_frames = 1 + MAX_TOKENS + result.sources.count("cloud") + 1  # OPEN, uploads, INFERs, CLOSE
    assert stats.bytes_received == hidden_bytes + num_frames * HEADER_BYTES == result.usage["link_bytes_sent"]
    # Lazy catch-up: the cloud ran each position at most once, and only up to its last deferral.
    assert stats.num_computed_positions <= positions
    if codec is not Codec.FP32:
        assert result.sources.count("cloud") > 0


def test_naive_split_resends_the_context(llama: Split) -> None:
    want = greedy(llama.model, PROMPT, MAX_TOKENS)
    service = llama.cloud(2)
    edge, _ = llama.edge(service, 2, tau=1.0, naive=True)
    result = edge.generate(PROMPT, MAX_TOKENS, ignore_eos=True)
    assert result.token_ids == want
    sizes = [len(PROMPT) + i for i in range(MAX_TOKENS)]
    assert service.manager.stats.num_computed_positions == sum(sizes)  # quadratic, vs linear above
    assert result.usage["link_bytes_sent"] == sum(n * 256 + HEADER_BYTES for n in sizes)
