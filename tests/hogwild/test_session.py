"""The W-worker step loop on a tiny random model: steps finish and join the history, the fast path and
the torch reference give the same run, nothing is computed twice, and the pool refills after a run
and after an abort; the format's rules; the strategy through the registry."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch

from mixserve.hogwild.format import HogwildFormat
from mixserve.hogwild.segments import HogwildError
from mixserve.hogwild.session import HogwildConfig, HogwildSession
from mixserve.sampling_params import SamplingParams
from tests.hogwild.conftest import Rig, tiny_model


class CharCodec:
    """One token per character (codes < 256), EOS = 0."""

    bos_token_id = None
    eos_token_ids = [0]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [ord(c) if 0 < ord(c) < 256 else ord("?") for c in text]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(i) for i in ids if i)


# Steps end often: "." and "\n" are favoured, and a step ends at "\n" after "." (separator "\n").
FMT = HogwildFormat(sep="\n", end_of_step_chars=".", rules="Work together, {names}.")
PARAMS = SamplingParams(temperature=1.0, seed=3, logit_bias={ord("."): 4.0, ord("\n"): 4.0})
PROMPT = CharCodec().encode("Q: 2+2?\n")


@pytest.fixture(scope="module")
def gemma() -> torch.nn.Module:
    return tiny_model("gemma3")  # sliding window 5: masks cross segments all the time


def _run(model: torch.nn.Module, **options: object) -> tuple[Rig, object]:
    rig = Rig(model, num_blocks=256, block_size=4)
    config = HogwildConfig(**{"workers": 3, "max_tokens": 40, "params": PARAMS, "format": FMT,
                              "finisher_max_tokens": 4, **options})  # type: ignore[arg-type]
    return rig, HogwildSession(rig.vm, rig.segments, CharCodec(), config).run(PROMPT)


def test_loop_finishes_steps_and_refills_the_pool(gemma: torch.nn.Module) -> None:
    rig, r = _run(gemma)
    assert rig.pool.num_free_blocks == rig.pool.num_blocks
    assert r.num_passes == 40 and r.finished_by == "budget"  # type: ignore[attr-defined]
    finished = [s for s in r.steps if s.finished]  # type: ignore[attr-defined]
    assert finished and {s.worker for s in r.steps} == {"Alice", "Bob", "Carol"}  # type: ignore[attr-defined]
    assert all(s.text.startswith(f"**{s.worker} [{s.index}]:** ") for s in r.steps)  # type: ignore[attr-defined]
    assert all(s.text.endswith(".\n") for s in finished)
    # 3 tokens per pass + 4 finisher tokens; the last sampled token of each worker is never written.
    assert r.num_generated_tokens == 3 * 40 + 4  # type: ignore[attr-defined]
    unwritten = r.num_prefill_tokens + r.num_generated_tokens - r.num_computed_tokens  # type: ignore[attr-defined]
    assert 0 <= unwritten <= 3 + 1  # nothing computed twice


def test_fast_path_and_reference_give_the_same_run(gemma: torch.nn.Module) -> None:
    greedy = SamplingParams(temperature=0.0, logit_bias={ord("."): 4.0, ord("\n"): 4.0})
    _, fast = _run(gemma, params=greedy, max_tokens=16)
    _, ref = _run(gemma, params=greedy, max_tokens=16, reference_attention=True)
    assert fast.transcript == ref.transcript  # type: ignore[attr-defined]
    assert fast.answer_text == ref.answer_text  # type: ignore[attr-defined]


def test_abort_mid_run_refills_the_pool(gemma: torch.nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"n": 0}
    original = HogwildSession._advance

    def failing(self: HogwildSession, tokens: list[int]) -> object:
        calls["n"] += 1
        if calls["n"] == 7:
            raise KeyboardInterrupt("caller went away")
        return original(self, tokens)

    monkeypatch.setattr(HogwildSession, "_advance", failing)
    rig = Rig(gemma, num_blocks=256, block_size=4)
    session = HogwildSession(rig.vm, rig.segments, CharCodec(), HogwildConfig(workers=2, params=PARAMS, format=FMT))
    with pytest.raises(KeyboardInterrupt):
        session.run(PROMPT)
    assert rig.pool.num_free_blocks == rig.pool.num_blocks


def test_pool_running_short_is_a_clear_error_and_refills(gemma: torch.nn.Module) -> None:
    rig = Rig(gemma, num_blocks=40, block_size=4)
    session = HogwildSession(rig.vm, rig.segments, CharCodec(),
                             HogwildConfig(workers=2, max_tokens=200, params=PARAMS, format=FMT))
    with pytest.raises(HogwildError, match="free blocks"):
        session.run(PROMPT)
    assert rig.pool.num_free_blocks == rig.pool.num_blocks


def test_format_rules() -> None:
    fmt = HogwildFormat()
    assert fmt.ends_step("**Bob [2]:** So x = 4.\n\n", "\n")  # separator split over two tokens
    assert fmt.ends_step("**Bob [2]:** So x = 4.\n\n", ".\n\n")
    assert not fmt.ends_step("**Bob [2]:** So x = 4\n\n", "\n")  # no sentence end before it
    assert not fmt.ends_step("**Bob [2]:** So x = 4.\n", "\n")
    assert fmt.answer("so \\boxed{12} or \\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert "Alice, Bob and Carol" in fmt.common(3) and fmt.common(3).endswith("### Past steps\n\n")
    assert fmt.step_prefix("Bob", 3, collab=True).startswith("**Bob [3]:** Quick check")
    with pytest.raises(ValueError, match="workers=9"):
        HogwildConfig(workers=9)
    with pytest.raises(ValueError, match="max_tokens=0"):
        HogwildConfig(max_tokens=0)


def test_strategy_is_registered_and_checks_budget() -> None:
    from mixserve.scaling import STRATEGIES, ScaleConfig, ScalingError, make_strategy

    assert "hogwild" in STRATEGIES
    with pytest.raises(ScalingError, match="budget=9"):
        make_strategy("hogwild", [1, 2, 3], config=ScaleConfig(budget=9))
