"""The eval harness on the synthetic policy (no model): table, JSON, plot; CLI input errors."""

from __future__ import annotations

import json

import pytest

from mixserve.cli import main
from mixserve.scaling.evaluate import EvalConfig, evaluate
from mixserve.scaling.report import format_table, write_outputs
from mixserve.scaling.synthetic import CountdownStepsPolicy, WordTokenizer, make_synthetic_engine
from mixserve.scaling.tasks import get_task


def test_evaluate_writes_table_json_and_plot(tmp_path) -> None:
    config = EvalConfig(task="countdown_steps", strategies=("sample", "majority", "pf"), budgets=(1, 4),
                        num_problems=6, difficulty=3, max_tokens=100, temperature=1.0, out_dir=str(tmp_path))
    problems = get_task(config.task).generate(config.num_problems, config.seed, config.difficulty)
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
