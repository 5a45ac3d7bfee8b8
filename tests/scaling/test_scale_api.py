"""`LLM.scale` as users call it: chat messages, batches of problems, problem-aware verifiers,
extractors by name; and compute-optimal allocation against uniform majority on a synthetic mix."""

from __future__ import annotations

from typing import Any

import pytest

from mixserve.engine.dispatcher import Dispatcher
from mixserve.llm import LLM
from mixserve.sampling_params import SamplingParams
from mixserve.scaling import (
    AnswerFunctionVerifier,
    ScaleConfig,
    ScaleProblem,
    ScaleResult,
    ScalingError,
    ScoreAnswerVerifier,
    make_strategies,
    make_strategy,
    run_strategies,
    run_strategy,
)
from mixserve.scaling.answers import EXTRACTORS, get_extractor
from mixserve.scaling.synthetic import AnswerPolicy, AnswerSpec, WordTokenizer, make_synthetic_engine

PARAMS = SamplingParams(temperature=1.0, max_tokens=32, seed=11)


class ChatWordTokenizer(WordTokenizer):
    """A word tokenizer with a toy chat template: the last user turn, then a newline."""

    chat_template_is_default = False

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        return "".join(f"{m['content']}\n" for m in messages if m["role"] == "user")


def synthetic_llm(specs: dict[str, AnswerSpec]) -> LLM:
    """An `LLM` whose engine is the synthetic policy (no weights): everything `scale` touches is real."""
    llm = LLM.__new__(LLM)
    llm.tokenizer = ChatWordTokenizer()
    llm.engine = make_synthetic_engine(AnswerPolicy(specs), llm.tokenizer)
    llm.dispatcher = Dispatcher(llm.engine)
    llm.cost = lambda: None  # type: ignore[method-assign]
    return llm


SPECS = {str(i): AnswerSpec(str(40 + i), 0.3 + 0.08 * i, (("7", 1.0), ("9", 1.0))) for i in range(8)}


def same(a: ScaleResult, b: ScaleResult) -> None:
    assert (a.answer, a.text, a.selected) == (b.answer, b.text, b.selected)
    assert [(c.text, c.answer, c.score) for c in a.candidates] == [(c.text, c.answer, c.score) for c in b.candidates]
    assert a.usage == b.usage


def test_scale_with_messages_equals_chat_prompt_and_strategy_by_hand() -> None:
    llm = synthetic_llm(SPECS)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "Q3: solve"}]
    got = llm.scale(messages=messages, strategy="majority", budget=8, params=PARAMS, strategy_id="m")
    assert got == llm.scale(messages, strategy="majority", budget=8, params=PARAMS, strategy_id="m")
    ids = llm.encode(llm.chat_prompt(messages))
    assert llm.tokenizer.decode(ids) == "Q3: solve\n"
    by_hand = run_strategy(llm.dispatcher, make_strategy("majority", ids, 8, PARAMS, strategy_id="m"))
    same(got, by_hand)
    assert got.answer in ("43", "7", "9") and len(got.candidates) == 8
    with pytest.raises(ValueError, match="not both"):
        llm.scale("Q1: x\n", messages=messages)


@pytest.mark.parametrize("strategy", ["majority", "bon", "adaptive"])
def test_batched_scale_equals_single_calls(strategy: str) -> None:
    """8 problems in one call (one engine, batched together) == 8 calls, seeded. The synthetic runner
    draws by (request id, seed), so the single calls take the ids the batch gives problem i."""
    prompts = [f"Q{i}: solve\n" for i in range(8)]
    verifier = (lambda text: 1.0 if "4" in text else 0.0) if strategy == "bon" else None
    llm = synthetic_llm(SPECS)
    batch = llm.scale(prompts, strategy=strategy, budget=6, params=PARAMS, verifier=verifier, strategy_id="b")
    assert isinstance(batch, list) and len(batch) == 8
    singles = [synthetic_llm(SPECS).scale(p, strategy=strategy, budget=6, params=PARAMS, verifier=verifier,
                                          strategy_id=f"b-p{i}") for i, p in enumerate(prompts)]
    for a, b in zip(batch, singles, strict=True):
        same(a, b)
    pool = llm.engine.scheduler.kv.pool
    assert not llm.engine.has_unfinished() and pool.num_free_blocks == pool.num_blocks


def test_problem_forms_and_errors() -> None:
    llm = synthetic_llm(SPECS)
    forms = ["Q1: a\n", llm.encode("Q1: a\n"), [{"role": "user", "content": "Q1: a"}],
             ScaleProblem("Q1: a\n", data={"x": 1}), {"messages": [{"role": "user", "content": "Q1: a"}]}]
    results = llm.scale(forms, budget=2, params=PARAMS, strategy_id="f")
    assert len(results) == 5 and all(len(r.candidates) == 2 for r in results)
    for bad in ([], {"prompt": "x", "messages": []}, 3.5, [""]):
        with pytest.raises(ScalingError) as err:
            llm.scale(bad, budget=2, params=PARAMS)
        assert err.value.field == "prompt"


# -- verifiers that see the problem ---------------------------------------------------------------
def score_answer(answer: str | None, entry: dict[str, Any]) -> float:
    """A reasoning-gym-like scorer: 1 for the exact answer, 0.01 for a numeric one, 0 otherwise."""
    if answer is None:
        return 0.0
    if answer == entry["answer"]:
        return 1.0
    return 0.01 if answer.isdigit() else 0.0


def test_score_answer_adapter_sees_each_problems_entry() -> None:
    specs = {str(i): AnswerSpec(str(40 + i), 0.25, (("7", 2.0), ("9", 1.0))) for i in range(4)}
    llm = synthetic_llm(specs)
    problems = [ScaleProblem(f"Q{i}: solve\n", data={"answer": str(40 + i)}) for i in range(4)]
    results = llm.scale(problems, strategy="bon", budget=12, params=PARAMS, verifier=ScoreAnswerVerifier(score_answer),
                        strategy_id="rg")
    for i, r in enumerate(results):
        assert all(c.score == score_answer(c.answer, {"answer": str(40 + i)}) for c in r.candidates)
        assert r.answer == str(40 + i)  # the wrong majority ("7") loses to the verified answer
    majority = llm.scale(problems, strategy="majority", budget=12, params=PARAMS, strategy_id="rg")
    assert sum(r.answer == "7" for r in majority) >= 2


def test_answer_function_adapter_with_data_errors_and_range() -> None:
    llm = synthetic_llm(SPECS)
    calls: list[tuple[str, Any]] = []

    def run_tests(answer: str, data: Any) -> bool:
        calls.append((answer, data))
        if answer == "9":
            raise RuntimeError("the unit test crashed")
        return int(answer) == data

    problem = ScaleProblem("Q2: solve\n", data=42)
    r = llm.scale(problem, strategy="bon", budget=8, params=PARAMS,
                  verifier=AnswerFunctionVerifier(run_tests, with_data=True), strategy_id="fn")
    assert calls and all(d == 42 for _, d in calls)
    assert {c.answer: c.score for c in r.candidates} == {a: float(a == "42") for a in {c.answer for c in r.candidates}}
    with pytest.raises(ScalingError, match=r"verifier score 2\.0"):
        llm.scale(problem, strategy="bon", budget=2, params=PARAMS, verifier=AnswerFunctionVerifier(lambda a: 2.0))


# -- extractors ---------------------------------------------------------------------------------
EXTRACTOR_TABLE = [
    # (extractor, text, expected)
    ("auto", "so the answer is: 1", "1"),
    ("auto", "The final answer is \"30'\".", "30"),
    ("auto", "We get \\boxed{\\frac{1}{2}} in the end", "\\frac{1}{2}"),
    ("auto", "Answer: 1,000", "1000"),
    ("auto", "3.50 apples then 7.0", "7"),
    ("auto", "no digits at all", None),
    ("number", "Answer: 12 (since 3 * 4 = 12), not 13", "12"),
    ("number", "first 5 then -2.5", "-5/2"),
    ("number", "Answer: none", None),
    ("boxed", "\\boxed{2} then \\boxed{ 3x+1 }", "3x+1"),
    ("boxed", "answer: 4", None),
    ("answer_line", "Answer: Paris.\nThanks", "paris"),
    ("answer_line", "answer: first\nFinal answer: `second`", "second"),
    ("answer_line", "Answer:\n", None),
    ("choice", "I think (B) is right.", "b"),
    ("choice", "The answer is C) because ...", "c"),
    ("choice", "Reasoning...\nD", "d"),
    ("choice", "Answer: (a)", "a"),
    ("choice", "no letter here", None),
]


@pytest.mark.parametrize(("name", "text", "expected"), EXTRACTOR_TABLE)
def test_extractor_table(name: str, text: str, expected: str | None) -> None:
    assert EXTRACTORS[name](text) == expected


def test_extractor_by_name_errors_and_reaches_strategies() -> None:
    with pytest.raises(ScalingError) as err:
        get_extractor("roman")
    assert err.value.field == "extractor" and "choice" in str(err.value)
    llm = synthetic_llm(SPECS)
    r = llm.scale("Q1: solve\n", budget=3, params=PARAMS, extractor="boxed")
    assert all(c.answer is None for c in r.candidates)  # no \boxed{} in "Answer: 41"


# -- compute-optimal allocation -----------------------------------------------------------------
def mixed_specs(n: int) -> dict[str, AnswerSpec]:
    """Half easy (p = 0.9), 30% contested (0.4 against four answers at 0.15), 20% beyond the model
    (0.1 against nine answers at 0.1)."""
    out = {}
    for i in range(n):
        kind = i % 10
        if kind < 5:
            out[str(i)] = AnswerSpec("42", 0.9, (("7", 1.0), ("8", 1.0)))
        elif kind < 8:
            out[str(i)] = AnswerSpec("42", 0.4, tuple((str(w), 1.0) for w in range(1, 5)))
        else:
            out[str(i)] = AnswerSpec("42", 0.1, tuple((str(w), 1.0) for w in range(1, 10)))
    return out


def run_mix(name: str, budget: int, n: int = 100) -> tuple[float, int, list[ScaleResult]]:
    specs = mixed_specs(n)
    tok = WordTokenizer()
    engine = make_synthetic_engine(AnswerPolicy(specs), tok)
    made = make_strategies(name, [tok.encode(f"Q{pid}: solve\n") for pid in specs], budget,
                           SamplingParams(temperature=1.0, max_tokens=16, seed=7), strategy_id=name)
    results: list[ScaleResult] = []
    for r in run_strategies(engine, made):
        results.extend(r if isinstance(r, list) else [r])
    pool = engine.scheduler.kv.pool
    assert not engine.has_unfinished() and pool.num_free_blocks == pool.num_blocks
    accuracy = sum(r.answer == "42" for r in results) / len(results)
    return accuracy, sum(r.usage.policy_generated_tokens for r in results), results


def test_compute_optimal_matches_uniform_majority_with_fewer_tokens() -> None:
    uniform_acc, uniform_tokens, _ = run_mix("majority", 16)
    acc, tokens, results = run_mix("compute_optimal", 10)
    assert acc >= uniform_acc
    assert tokens <= 0.7 * uniform_tokens
    launched = [r.info["num_launched"] for r in results]
    assert results[0].info["batch_spent"] <= results[0].info["batch_budget"] == 10 * len(results)
    easy = [n for i, n in enumerate(launched) if i % 10 < 5]
    contested = [n for i, n in enumerate(launched) if 5 <= i % 10 < 8]
    assert sum(easy) / len(easy) < 8 < sum(contested) / len(contested)  # stop early, spend where it helps
    assert max(launched) <= 40  # max_per_problem defaults to 4 * budget


def test_compute_optimal_on_one_problem_and_its_errors() -> None:
    llm = synthetic_llm(SPECS)
    r = llm.scale("Q7: solve\n", strategy="compute_optimal", budget=8, params=PARAMS, strategy_id="one")
    assert isinstance(r, ScaleResult) and r.answer == "47"
    with pytest.raises(ScalingError) as err:
        llm.scale(["Q1: a\n"], strategy="compute_optimal", verifier="judge")
    assert err.value.field == "verifier"
    with pytest.raises(ScalingError):
        ScaleConfig(max_per_problem=0)
