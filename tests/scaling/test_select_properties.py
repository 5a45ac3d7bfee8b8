"""Selection rules as properties over random candidates (hypothesis)."""

from __future__ import annotations

from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from mixserve.scaling.base import Candidate
from mixserve.scaling.select import best_of_majority, best_of_n, majority

answers = st.one_of(st.none(), st.sampled_from(["1", "2", "3", "4", "5", "6"]))
scores = st.one_of(st.none(), st.sampled_from([0.0, 1.0]), st.floats(0.0, 1.0))
candidate_lists = st.lists(st.tuples(answers, scores), min_size=1, max_size=24).map(
    lambda items: [Candidate(index=i, text="", answer=a, num_tokens=1, score=s) for i, (a, s) in enumerate(items)])


@settings(max_examples=400, deadline=None)
@given(candidate_lists, st.floats(0.0, 1.0), st.integers(1, 4))
def test_best_of_majority_selects_only_inside_the_gate(cands: list[Candidate], alpha: float, k: int) -> None:
    selected = best_of_majority(cands, k, alpha)
    counts = Counter(c.answer for c in cands if c.answer is not None)
    if not counts:
        assert selected == best_of_n(cands, k)
        return
    top = max(counts.values())
    gated = {a for a, m in counts.items() if m >= alpha * len(cands) or m == top}
    assert selected and len(selected) <= k
    by_index = {c.index: c for c in cands}
    assert all(by_index[i].answer in gated for i in selected)
    # the first selection has the best reward among gated answers
    reward = {a: max(c.score or 0.0 for c in cands if c.answer == a) for a in gated}
    assert reward[by_index[selected[0]].answer] == max(reward.values())


def test_best_of_majority_gate_holds_when_every_gated_reward_is_zero() -> None:
    # the bug the issue reports: ungated answers scored a default 0.0 and won the tie by index
    cands = [Candidate(0, "", "9", 1, score=None), Candidate(1, "", "5", 1, score=0.0),
             Candidate(2, "", "5", 1, score=0.0), Candidate(3, "", "5", 1, score=0.0)]
    assert best_of_majority(cands, 1, alpha=0.5) == (1,)


@settings(max_examples=200, deadline=None)
@given(candidate_lists)
def test_majority_selects_a_most_frequent_answer(cands: list[Candidate]) -> None:
    counts = Counter(c.answer for c in cands if c.answer is not None)
    (i,) = majority(cands)
    if counts:
        assert counts[cands[i].answer] == max(counts.values())
