"""`hogwild` as a scaling strategy: `budget` workers share one cache for `params.max_tokens` passes.

It is a `Controller` like the others, so `mixserve eval --strategies hogwild` and the server's
`strategy` field reach it; it runs its whole loop inside `start` (between two engine steps) on the
engine's model, KV caches and block pool, and is done when `start` returns. Compute accounting:
every worker sees the prompt (`policy_prompt_tokens = workers * len(prompt)`), which is prefilled
once together with the format's headers (`policy_prefill_tokens`); `computed_tokens` counts every
token whose K/V were computed, each once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mixserve.hogwild.api import hogwild
from mixserve.hogwild.format import NAMES
from mixserve.hogwild.session import HogwildConfig, HogwildResult
from mixserve.scaling.accounting import ComputeUsage
from mixserve.scaling.base import Candidate, ScaleConfig, ScaleResult, ScalingError
from mixserve.scaling.tracker import Tracker

if TYPE_CHECKING:
    from mixserve.engine.engine import Engine
    from mixserve.outputs import RequestOutput


class HogwildStrategy:
    name = "hogwild"

    def __init__(self, tracker: Tracker, config: ScaleConfig) -> None:
        if config.budget > len(NAMES):
            raise ScalingError(f"invalid budget={config.budget}: hogwild runs at most {len(NAMES)} workers",
                               field="budget")
        self.t = tracker
        self.config = HogwildConfig(workers=config.budget, max_tokens=config.params.max_tokens or 256,
                                    params=config.params)
        self.run: HogwildResult | None = None

    @property
    def controller_id(self) -> str:
        return self.t.strategy_id

    def owns(self, request_id: str) -> bool:
        return self.t.owns(request_id)

    def start(self, engine: Engine) -> None:
        self.run = hogwild(engine, engine.tokenizer, list(self.t.prompt_ids), self.config)

    def on_output(self, engine: Engine, out: RequestOutput) -> None:
        """Never called: the strategy adds no engine requests."""

    @property
    def done(self) -> bool:
        return self.run is not None

    def cancel(self, engine: Engine) -> None:
        """Nothing in flight: the loop runs (and frees its blocks) inside `start`."""

    def result(self) -> ScaleResult:
        r = self.run
        assert r is not None
        answer = self.t.extract(r.answer_text) if r.answer_text else None
        text = r.transcript + r.answer_text
        candidate = Candidate(0, text, answer, r.num_generated_tokens, finish_reason=r.finished_by)
        prompt = r.workers * r.num_prompt_tokens
        usage = ComputeUsage(
            num_requests=1, num_samples=r.workers, policy_prompt_tokens=prompt,
            policy_prefill_tokens=r.num_prefill_tokens, policy_reused_tokens=max(prompt - r.num_prefill_tokens, 0),
            policy_generated_tokens=r.num_generated_tokens, computed_tokens=r.num_computed_tokens,
            flops=None if self.t.cost is None else self.t.cost.flops(
                r.num_computed_tokens, r.num_prefill_tokens + r.num_generated_tokens / 2))
        info: dict[str, float | int | str] = {
            "workers": r.workers, "passes": r.num_passes, "steps": sum(s.finished for s in r.steps),
            "finished_by": r.finished_by, "seconds": round(r.seconds, 3)}
        return ScaleResult(self.name, answer, text, (0,), (candidate,), usage, info)
