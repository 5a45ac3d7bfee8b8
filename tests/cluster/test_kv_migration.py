"""KV-block migration between two engines (what `POST /v1/cluster/migrate` does between replicas): a running
sample's full blocks are exported from engine A, imported into engine B, and the sample resumes on B from
the tokens its client has. Outputs equal the uninterrupted run, and B computes only the last partial block
(its `recomputed_tokens` counter): the KV moved, it was not recomputed. Imports that cannot fit are refused
and the resume recomputes, with the same tokens."""

from __future__ import annotations

import pickle
from dataclasses import replace
from pathlib import Path

import pytest

from mixserve.builder import build_engine
from mixserve.config import EngineConfig
from mixserve.engine.engine import Engine, RequestError, ResumePoint
from mixserve.engine.kv_transfer import KVExport
from mixserve.sampling_params import SamplingParams
from tests.cluster.test_resume import run
from tests.cluster.tiny import PROMPTS

BLOCK = 4
PARAMS = {
    "greedy": SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True),
    "seeded": SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=30, ignore_eos=True),
}


def make_engine(model: Path, seed: int = 0, **options: object) -> Engine:
    config = EngineConfig().with_options(**{"model": str(model), "num_blocks": 64, "block_size": BLOCK,
                                            "max_model_len": 256, **options})
    return build_engine(config, seed=seed).engine


def run_until(engine: Engine, prompt: list[int], params: SamplingParams, k: int) -> tuple[list[int], str]:
    """Start request "r" and step until its client has at least `k` tokens: (tokens, text) it has."""
    engine.add_request("r", prompt, params)
    tokens: list[int] = []
    text = ""
    while len(tokens) < k:
        for out in engine.step():
            tokens.extend(out.outputs[0].token_ids)
            text += out.outputs[0].text
    return tokens, text


def migrate(source: Engine, target: Engine, prompt: list[int], params: SamplingParams, k: int
            ) -> tuple[list[int], str, int]:
    """Run on `source` until k tokens, export (through pickle, as between processes), import into
    `target`, resume there: (all tokens, all text, tokens imported)."""
    head, text = run_until(source, prompt, params, k)
    export = source.export_kv("r")
    source.abort_request("r")
    assert export is not None
    imported = target.import_kv(pickle.loads(pickle.dumps(export)))
    tail, texts = run(target, prompt, params, ResumePoint(tuple(head), len(text)))[0]
    return head + tail, text + "".join(texts), imported


@pytest.mark.parametrize("name", sorted(PARAMS))
@pytest.mark.parametrize("k", [1, 6, 13])
def test_blocks_move_and_only_the_partial_block_is_recomputed(tiny_model: Path, name: str, k: int) -> None:
    params = PARAMS[name]
    reference = make_engine(tiny_model)
    prompt = reference.tokenizer.encode(PROMPTS[0])  # type: ignore[attr-defined]
    want_tokens, want_texts = run(reference, prompt, params)[0]
    target = make_engine(tiny_model, seed=5)
    tokens, text, imported = migrate(make_engine(tiny_model), target, prompt, params, k)
    assert tokens == want_tokens
    assert text == "".join(want_texts)
    known = len(prompt) + k  # what the client had (k tokens exactly: one token per step)
    assert imported >= (known - 1) // BLOCK * BLOCK > 0
    assert target.counters["migrated_kv_tokens"] == imported
    # the proof that KV moved: the target computed only the known tokens of the last, partial block
    assert target.counters["recomputed_tokens"] == known - (known - 1) // BLOCK * BLOCK
    assert 1 <= target.counters["recomputed_tokens"] <= BLOCK
    # ... where a plain resume recomputes everything it knows
    plain = make_engine(tiny_model, seed=5)
    run(plain, prompt, params, ResumePoint(tuple(want_tokens[:k]), 0))
    assert plain.counters["recomputed_tokens"] == known


def test_export_is_plain_data_of_the_full_blocks(tiny_model: Path) -> None:
    engine = make_engine(tiny_model)
    prompt = engine.tokenizer.encode(PROMPTS[1])  # type: ignore[attr-defined]
    head, _ = run_until(engine, prompt, PARAMS["greedy"], 5)
    export = engine.export_kv("r")
    assert isinstance(export, KVExport) and export.block_size == BLOCK
    assert list(export.token_ids) == (prompt + head)[:len(export.token_ids)]
    assert len(export.token_ids) % BLOCK == 0 and export.num_blocks == len(export.token_ids) // BLOCK
    assert len(export.blocks) == 2  # the tiny model's layers
    assert tuple(export.blocks[0][0].shape) == (export.num_blocks, BLOCK, 2, 16)
    assert export.nbytes == export.num_blocks * BLOCK * 2 * 2 * 2 * 16 * 4  # tokens*layers*(K,V)*heads*dim*fp32
    with pytest.raises(RequestError, match="not live"):
        engine.export_kv("nope")


def _tampered(export: KVExport, which: str) -> KVExport:
    if which == "layers":
        return replace(export, blocks=export.blocks[:1])
    if which == "dtype":
        return replace(export, blocks=[(k.double(), v.double()) for k, v in export.blocks])
    if which == "heads":
        return replace(export, blocks=[(k[:, :, :1], v[:, :, :1]) for k, v in export.blocks])
    return replace(export, token_ids=export.token_ids[:-1])  # not whole blocks


@pytest.mark.parametrize("bad", ["layers", "dtype", "heads", "partial", "block_size", "no_prefix_cache"])
def test_bad_imports_are_refused_and_the_resume_recomputes(tiny_model: Path, bad: str) -> None:
    params = PARAMS["seeded"]
    reference = make_engine(tiny_model)
    prompt = reference.tokenizer.encode(PROMPTS[2])  # type: ignore[attr-defined]
    want_tokens, _ = run(reference, prompt, params)[0]
    source = make_engine(tiny_model)
    head, text = run_until(source, prompt, params, 9)
    export = source.export_kv("r")
    assert export is not None
    options: dict[str, object] = {"block_size": 8} if bad == "block_size" else \
        {"enable_prefix_caching": False} if bad == "no_prefix_cache" else {}
    target = make_engine(tiny_model, seed=5, **options)
    free = target.scheduler.pool.num_free_blocks
    given = export if bad in ("block_size", "no_prefix_cache") else _tampered(export, bad)
    assert target.import_kv(given) == 0
    assert target.counters["kv_imports_refused"] == 1 and target.counters["migrated_kv_tokens"] == 0
    assert target.scheduler.pool.num_free_blocks == free and not target.scheduler.pool.hash_to_block
    tail, _ = run(target, prompt, params, ResumePoint(tuple(head), len(text)))[0]
    assert head + tail == want_tokens
    assert target.counters["recomputed_tokens"] == len(prompt) + len(head)
