"""Selection rules over finished candidates (pure functions; closed-form testable).

Each returns candidate indices, best first. Candidates without an answer never win a vote; when no
candidate has an answer, the first candidate is returned so that a result always exists.

Partial credit (a verifier score strictly between 0 and 1) means, per rule:
- `best_of_n`: a rank only; the highest score wins, so 0.6 beats 0.5 however many samples agree.
- `weighted_majority`: a vote weight; an answer's total is the sum of its samples' scores, so two
  samples at 0.5 tie one at 1.0.
- `best_of_majority`: a reward inside the frequency gate; an answer's reward is its best sample's
  score, and only gated answers can be selected (frequency decides *which* answers compete, the score
  decides *among* them).
- `majority`, `most_confident`, `first_sample`: scores are ignored.
Step-level search (beam, particle filtering) reads scores of partial paths as process rewards: the
estimated chance that the path can still end in a correct answer.
"""

from __future__ import annotations

from collections import Counter, defaultdict

from mixserve.scaling.base import Candidate


def _first_by_answer(cands: list[Candidate]) -> dict[str, Candidate]:
    first: dict[str, Candidate] = {}
    for c in cands:
        if c.answer is not None:
            first.setdefault(c.answer, c)
    return first


def _ranked_answers(totals: dict[str, float], cands: list[Candidate],
                    allowed: set[str] | None = None) -> tuple[int, ...]:
    """Representative candidates of answers by total, ties to the answer seen first; only answers in
    `allowed` are ranked when it is given."""
    first = _first_by_answer(cands)
    if allowed is not None:
        first = {a: c for a, c in first.items() if a in allowed}
    if not first:
        return (cands[0].index,) if cands else ()
    order = sorted(first, key=lambda a: (-totals.get(a, 0.0), first[a].index))
    return tuple(first[a].index for a in order)


def majority(cands: list[Candidate]) -> tuple[int, ...]:
    """Self-consistency: the most frequent answer."""
    counts = Counter(c.answer for c in cands if c.answer is not None)
    return _ranked_answers({a: float(n) for a, n in counts.items()}, cands)[:1]


def weighted_majority(cands: list[Candidate]) -> tuple[int, ...]:
    """The answer with the largest sum of verifier scores."""
    totals: dict[str, float] = defaultdict(float)
    for c in cands:
        if c.answer is not None:
            totals[c.answer] += c.score or 0.0
    return _ranked_answers(totals, cands)[:1]


def best_of_n(cands: list[Candidate], k: int = 1) -> tuple[int, ...]:
    """The k highest-scoring candidates (ties to the earlier one)."""
    order = sorted(cands, key=lambda c: (-(c.score if c.score is not None else float("-inf")), c.index))
    return tuple(c.index for c in order[:k])


def best_of_majority(cands: list[Candidate], k: int = 1, alpha: float = 0.1) -> tuple[int, ...]:
    """Best-of-Majority (Di et al. 2025): keep answers whose frequency is at least `alpha` (at least
    the most frequent answer when none reaches it), then return the k of them with the highest
    reward (the best score among the samples giving that answer)."""
    counts = Counter(c.answer for c in cands if c.answer is not None)
    if not counts:
        return best_of_n(cands, k)
    n = len(cands)
    top = max(counts.values())
    gated = {a for a, m in counts.items() if m >= alpha * n or m == top}
    reward: dict[str, float] = {}
    for c in cands:
        if c.answer in gated:
            assert c.answer is not None
            reward[c.answer] = max(reward.get(c.answer, float("-inf")), c.score or 0.0)
    return _ranked_answers(reward, cands, gated)[:k]


def most_confident(cands: list[Candidate]) -> tuple[int, ...]:
    """The candidate with the highest confidence (no reward model)."""
    order = sorted(cands, key=lambda c: (-(c.confidence if c.confidence is not None else float("-inf")),
                                         c.index))
    return tuple(c.index for c in order[:1])


def first_sample(cands: list[Candidate]) -> tuple[int, ...]:
    return (cands[0].index,) if cands else ()
