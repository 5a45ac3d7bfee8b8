"""Resumable sampling: a request resumed from prompt + its first k tokens (on a fresh engine, as after a
failover or a migration) yields exactly the tokens and text of the uninterrupted run."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from mixserve.builder import build_engine
from mixserve.config import EngineConfig
from mixserve.engine.engine import Engine, RequestError, ResumePoint
from mixserve.engine.scheduler import derive_seed
from mixserve.sampling_params import SamplingParams
from tests.cluster.tiny import PROMPTS


def make_engine(model: Path, seed: int = 0) -> Engine:
    config = EngineConfig().with_options(model=str(model), num_blocks=64, block_size=4, max_model_len=256)
    return build_engine(config, seed=seed).engine


def run(engine: Engine, prompt: list[int], params: SamplingParams,
        resume: ResumePoint | None = None) -> dict[int, tuple[list[int], list[str]]]:
    """Sample index -> (tokens, text pieces) of the deltas, in order."""
    engine.add_request("r", prompt, params, resume=resume)
    got: dict[int, tuple[list[int], list[str]]] = {}
    while engine.has_unfinished():
        for out in engine.step():
            for o in out.outputs:
                tokens, texts = got.setdefault(o.index, ([], []))
                tokens.extend(o.token_ids)
                texts.append(o.text)
    return got


PARAMS = {
    "greedy": SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True),
    "seeded": SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=24, ignore_eos=True),
    "penalties": SamplingParams(temperature=0.8, top_k=40, seed=7, max_tokens=24, presence_penalty=0.5,
                                frequency_penalty=0.3, repetition_penalty=1.2, min_tokens=20),
    "stop_string": SamplingParams(temperature=1.0, seed=99, max_tokens=24, stop=["t17 t3"]),
}


@pytest.mark.parametrize("name", sorted(PARAMS))
@pytest.mark.parametrize("k", [0, 1, 5, 13])
def test_resume_from_k_gives_identical_tokens(tiny_model: Path, name: str, k: int) -> None:
    params = PARAMS[name]
    engine = make_engine(tiny_model)
    prompt = engine.tokenizer.encode(PROMPTS[0])  # type: ignore[attr-defined]
    tokens, texts = run(engine, prompt, params)[0]
    assert len(tokens) >= k
    # what a client got after the deltas carrying the first k tokens: text is streamed per delta
    sent = "".join(texts[:k])
    other = make_engine(tiny_model, seed=5)  # another replica: another shared generator
    resumed_tokens, resumed_texts = run(other, prompt, params, ResumePoint(tuple(tokens[:k]), len(sent)))[0]
    assert tokens[:k] + resumed_tokens == tokens
    assert sent + "".join(resumed_texts) == "".join(texts)


def test_resume_each_sample_of_n(tiny_model: Path) -> None:
    """Sample i of an n-sample request resumes as a single sample seeded with `derive_seed(seed, i)`."""
    params = SamplingParams(n=3, temperature=1.0, seed=42, max_tokens=16, ignore_eos=True)
    engine = make_engine(tiny_model)
    prompt = engine.tokenizer.encode(PROMPTS[1])  # type: ignore[attr-defined]
    full = run(engine, prompt, params)
    assert len({tuple(t) for t, _ in full.values()}) > 1
    for i, (tokens, _texts) in full.items():
        single = replace(params, n=1, seed=derive_seed(params.seed, i))
        got, _ = run(make_engine(tiny_model), prompt, single, ResumePoint(tuple(tokens[:6]), 0))[0]
        assert tokens[:6] + got == tokens


def test_resume_rejects_bad_input(tiny_model: Path) -> None:
    engine = make_engine(tiny_model)
    with pytest.raises(RequestError, match="n=1"):
        engine.add_request("a", [5, 6], SamplingParams(n=2), resume=ResumePoint((7,), 0))
    with pytest.raises(RequestError, match="outside the vocabulary"):
        engine.add_request("b", [5, 6], SamplingParams(), resume=ResumePoint((10_000,), 0))
    assert not engine.has_unfinished()
