"""Compute-optimal budget allocation over a batch of problems (Snell et al. 2024, "Scaling LLM
test-time compute optimally"): estimate each problem's difficulty from a few cheap samples, stop
early on easy ones and spend what they saved on the ones where more samples can still change the vote.

One controller runs the whole batch under a total sample budget of `budget * num_problems`:

1. Probe: every problem gets `adaptive_first_wave` samples (one request, prompt prefilled once).
2. A problem is *settled* when its vote passes the adaptive stop rule (`adaptive_rule`,
   `adaptive_confidence` / `supermajority`; see adaptive.py); its outstanding samples are aborted.
3. Rounds: once every unsettled problem finished its wave, each gets a new wave that doubles its
   samples (capped at `max_per_problem`, default 4 * budget), in priority order while the batch budget
   lasts. Difficulty is the vote margin (v1 - v2) / answered: a problem near settling is cheap to
   resolve and comes first; one whose samples all disagree (margin 0 from >= 2 distinct answers) is
   likely beyond the model (Snell et al.: the hardest bin gains least from more samples) and comes last.
4. Each problem answers with its majority vote; unspent budget is simply not spent.

Sample budgets count launched samples; samples aborted before they finished are refunded (their
generated tokens still show in the usage).
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from mixserve.scaling.adaptive import should_stop
from mixserve.scaling.base import Candidate, ScaleConfig, ScaleResult
from mixserve.scaling.select import majority
from mixserve.scaling.tracker import Tracker

if TYPE_CHECKING:
    from mixserve.engine.engine import Engine
    from mixserve.outputs import RequestOutput


def vote_margin(answers: Sequence[str | None]) -> tuple[float, int]:
    """(leader margin (v1 - v2) / answered, number of distinct answers); (0, 0) without answers."""
    counts = sorted(Counter(a for a in answers if a is not None).values(), reverse=True)
    if not counts:
        return 0.0, 0
    v2 = counts[1] if len(counts) > 1 else 0
    return (counts[0] - v2) / sum(counts), len(counts)


def leader_share(answers: Sequence[str | None]) -> float:
    """The most frequent answer's share of all samples (unanswered ones included); 0 without samples."""
    counts = Counter(a for a in answers if a is not None)
    return max(counts.values()) / len(answers) if counts else 0.0


def doubling_gain(answers: Sequence[str | None], extra: int, rng: random.Random, draws: int = 200,
                  unseen: float = 1.0) -> float:
    """Estimated gain, from `extra` more samples, in the probability mass of the voted answer.

    Posterior: answer probabilities theta ~ Dirichlet(counts + 1/2) over the answers seen, plus a
    bucket of weight `unseen` (+ unanswered samples) for answers not seen yet, each sample of which is
    a new distinct answer. The value of a vote is theta of the answer it selects (how often the model
    itself gives it); the gain is E[theta(vote after)] - E[theta(vote now)], by Monte Carlo. Easy
    problems (a settled leader) gain nothing, and neither do hopeless ones (theta flat: whichever
    answer wins is as good as the others); contested votes between a strong and weaker answers gain most."""
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return 0.0
    names = list(counts)
    alphas = [counts[a] + 0.5 for a in names] + [unseen + sum(1 for a in answers if a is None)]
    lead = max(counts.values())
    leaders = [i for i, a in enumerate(names) if counts[a] == lead]
    gain = 0.0
    for _ in range(draws):
        gammas = [rng.gammavariate(a, 1.0) for a in alphas]
        total = sum(gammas)
        theta = [g / total for g in gammas]
        before = sum(theta[i] for i in leaders) / len(leaders)
        new = [counts[a] for a in names]
        for j in rng.choices(range(len(alphas)), weights=theta, k=extra):
            if j < len(names):
                new[j] += 1
        top = max(new)
        winners = [i for i, c in enumerate(new) if c == top]
        gain += sum(theta[i] for i in winners) / len(winners) - before
    return gain / draws


@dataclass
class _Problem:
    tracker: Tracker
    candidates: list[Candidate] = field(default_factory=list)
    launched: dict[str, int] = field(default_factory=dict)
    settled: bool = False
    probe_margin: float | None = None
    refunded: int = 0

    @property
    def num_launched(self) -> int:
        return sum(self.launched.values()) - self.refunded

    @property
    def wave_done(self) -> bool:
        return self.settled or len(self.candidates) >= self.num_launched


class ComputeOptimal:
    """The batch controller; `result()` is one `ScaleResult` per problem, in order."""

    name = "compute_optimal"

    def __init__(self, strategy_id: str, trackers: Sequence[Tracker], config: ScaleConfig) -> None:
        self._id = strategy_id
        self.config = config
        self.problems = [_Problem(t) for t in trackers]
        self.total_budget = config.budget * len(trackers)
        self.cap = config.max_per_problem or min(4 * config.budget, 1024)
        self.rounds = 0
        self.rng = random.Random(f"{config.params.seed}:{strategy_id}")
        self._finished = False
        self._cancelled = False

    @property
    def controller_id(self) -> str:
        return self._id

    def owns(self, request_id: str) -> bool:
        return request_id.startswith(self._id + "/")

    @property
    def spent(self) -> int:
        return sum(p.num_launched for p in self.problems)

    def start(self, engine: Engine) -> None:
        probe = min(self.config.adaptive_first_wave, self.config.budget, self.cap)
        for p in self.problems:
            self._launch(engine, p, probe)

    def _launch(self, engine: Engine, p: _Problem, n: int) -> None:
        seed = self.config.params.seed
        params = replace(self.config.params, n=n, seed=None if seed is None else seed + len(p.launched))
        request_id = p.tracker.started(p.tracker.new_id("w"))
        engine.add_request(request_id, list(p.tracker.prompt_ids), params)
        p.launched[request_id] = n

    def _owner(self, request_id: str) -> _Problem:
        for p in self.problems:
            if p.tracker.owns(request_id):
                return p
        raise KeyError(request_id)

    def on_output(self, engine: Engine, out: RequestOutput) -> None:
        p = self._owner(out.request_id)
        for sample in p.tracker.route(engine, out):
            if p.settled:
                break
            p.candidates.append(p.tracker.candidate(len(p.candidates), sample))
            if should_stop([c.answer for c in p.candidates], self.config):
                self._settle(engine, p)
        if all(q.wave_done for q in self.problems):
            self._next_round(engine)

    def _settle(self, engine: Engine, p: _Problem) -> None:
        p.settled = True
        for request_id in p.launched:
            p.tracker.abort(engine, request_id)
        p.refunded += max(p.num_launched - len(p.candidates), 0)

    def _next_round(self, engine: Engine) -> None:
        for p in self.problems:
            if p.probe_margin is None:
                p.probe_margin = vote_margin([c.answer for c in p.candidates])[0]
        open_problems = [p for p in self.problems if not p.settled and p.num_launched < self.cap]
        left = self.total_budget - self.spent

        gains = []
        for p in open_problems:
            n = min(p.num_launched, self.cap - p.num_launched)
            answers = [c.answer for c in p.candidates]
            hopeless = (len(answers) >= 2 * self.config.adaptive_first_wave
                        and leader_share(answers) <= self.config.hopeless_share)
            gain = doubling_gain(answers, n, self.rng) if n > 0 and not hopeless else 0.0
            gains.append((gain / max(n, 1), p, n))
        launched = False
        gains.sort(key=lambda g: -g[0])
        worthwhile = [g for g in gains if g[0] >= self.config.min_gain_per_sample]
        for _, p, n in worthwhile:
            n = min(n, left)
            if n <= 0:
                continue
            self._launch(engine, p, n)
            left -= n
            launched = True
        if launched:
            self.rounds += 1
        else:
            self._finished = True

    @property
    def done(self) -> bool:
        return self._cancelled or self._finished

    def cancel(self, engine: Engine) -> None:
        for p in self.problems:
            p.tracker.cancel(engine)
        self._cancelled = True

    def result(self) -> list[ScaleResult]:
        results = []
        for p in self.problems:
            selected = majority(p.candidates)
            best = p.candidates[selected[0]] if selected else None
            info: dict[str, float | int | str] = {
                "num_samples": len(p.candidates), "num_launched": p.num_launched, "rounds": self.rounds,
                "stopped_early": int(p.num_launched < self.config.budget),
                "probe_margin": p.probe_margin if p.probe_margin is not None else 0.0,
                "batch_budget": self.total_budget, "batch_spent": self.spent}
            results.append(ScaleResult(self.name, best.answer if best else None, best.text if best else "",
                                       selected, tuple(p.candidates), p.tracker.ledger.usage(), info))
        return results


class SingleComputeOptimal(ComputeOptimal):
    """compute_optimal on one problem (the server, `make_strategy`): adaptive consistency with a cap."""

    def result(self) -> ScaleResult:  # type: ignore[override]
        return super().result()[0]
