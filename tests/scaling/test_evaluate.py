"""The eval harness on the synthetic policy (no model): table, JSON, plot; CLI input errors."""

from __future__ import annotations

import json

import pytest

from mixserve.cli import main
from mixserve.scaling.base import ScalingError
from mixserve.scaling.evaluate import EvalConfig, evaluate, generate_problems
from mixserve.scaling.report import format_table, write_outputs
from mixserve.scaling.synthetic import CountdownStepsPolicy, WordTokenizer, make_synthetic_engine
from mixserve.scaling.tasks import get_task


def test_evaluate_writes_table_json_and_plot(tmp_path) -> None:
    config = EvalConfig(task="countdown_steps", strategies=("sample", "majority", "pf"), budgets=(1, 4),
                        num_problems=6, difficulty=(3,), max_tokens=100, temperature=1.0, out_dir=str(tmp_path))
    problems = generate_problems(config)
    tok = WordTokenizer()
    engine = make_synthetic_engine(CountdownStepsPolicy(problems), tok)
    rows = evaluate(engine, tok, config, progress=False)
    assert [(r["strategy"], r["budget"]) for r in rows] == [(s, b) for s in config.strategies for b in (1, 4)]
    sample4 = rows[1]
    assert sample4["pass_at_k"][4] == pytest.approx(sample4["coverage"])
    assert rows[-1]["verifier"] == "oracle_prm"
    assert "unbiased pass@k" in format_table(rows)
    json_path, png = write_outputs(rows, config, "synthetic", tmp_path)
    assert json.loads(json_path.read_text())["rows"][0]["strategy"] == "sample"
    assert png.stat().st_size > 10_000


@pytest.mark.parametrize("argv, field", [
    (["--strategies", "majority,nope"], "strategies='nope'"),
    (["--budgets", "1,0"], "budgets=0"),
    (["--budgets", "1,x"], "budgets='1,x'"),
    (["--task", "chess"], "task='chess'"),
    (["--difficulty", "7"], "difficulty=7"),
    (["--verifier", "oracle"], "verifier='oracle'"),
])
def test_eval_cli_rejects_bad_input_before_loading(argv, field, capsys) -> None:
    assert main(["eval", *argv]) == 2
    assert field in capsys.readouterr().err


def test_eval_costs_do_not_depend_on_the_order_of_the_cells(tmp_path) -> None:
    """Each cell pays its own prompt prefill (the prefix cache is emptied between cells)."""
    def rows_for(strategies: tuple[str, ...]) -> dict[tuple[str, int], dict]:
        config = EvalConfig(task="countdown_steps", strategies=strategies, budgets=(1, 4), num_problems=4,
                            difficulty=(2,), max_tokens=60, temperature=1.0, out_dir=str(tmp_path))
        problems = generate_problems(config)
        tok = WordTokenizer()
        rows = evaluate(make_synthetic_engine(CountdownStepsPolicy(problems), tok), tok, config, progress=False)
        return {(r["strategy"], r["budget"]): {k: v for k, v in r.items() if k != "seconds"} for r in rows}

    forward = rows_for(("sample", "majority", "compute_optimal"))
    backward = rows_for(("compute_optimal", "majority", "sample"))
    assert forward == backward
    assert forward[("sample", 1)]["prefill_tokens"] == forward[("majority", 1)]["prefill_tokens"]


def test_plot_axes_are_plain_numbers() -> None:
    from mixserve.scaling.report import plain_number

    assert [plain_number(v) for v in (30, 1500, 2.5e6, 4.1e9, 0.5)] == ["30", "1500", "2.5M", "4.1G", "0.5"]


def test_mixed_difficulties_interleave_and_keep_each_difficultys_problems() -> None:
    task = get_task("arithmetic")
    mixed = generate_problems(EvalConfig(task="arithmetic", num_problems=7, difficulty=(1, 3, 5)))
    assert [p.question for p in mixed[0::3]] == [p.question for p in task.generate(3, 0, 1)]
    assert [p.question for p in mixed[1::3]] == [p.question for p in task.generate(2, 0, 3)]
    assert generate_problems(EvalConfig(task="arithmetic", num_problems=3, difficulty=2)) == task.generate(3, 0, 2)
    with pytest.raises(ScalingError, match="difficulty"):
        EvalConfig(difficulty=())
    with pytest.raises(ScalingError, match="difficulty=9"):
        EvalConfig(difficulty=(1, 9))
