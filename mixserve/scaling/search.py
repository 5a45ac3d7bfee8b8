"""Step-level search over paused samples: every path is a paused engine sample; extending it is a
`fork_request` (KV shared, nothing recomputed), dropping it a `release_request`.

A round: every live path generates one step (up to `step_separator`, which stays in the context),
each new node is scored by the verifier as a process reward (`final=False`) or, once the path ended
(EOS, or the last allowed step, which runs without a separator), as an outcome (`final=True`). When
the whole round is scored, a `StepPolicy` (beam search or particle filtering) says how many children
each live node gets and which finished nodes stay in the population; then all parents are released.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Protocol

from mixserve.outputs import FinishReason
from mixserve.sampling_params import SamplingParams
from mixserve.scaling.base import ScaleConfig, ScaleResult
from mixserve.scaling.samples import Sample
from mixserve.scaling.tracker import Tracker, derive_seed

if TYPE_CHECKING:
    from mixserve.engine.engine import Engine
    from mixserve.outputs import RequestOutput


@dataclass
class Node:
    """A path: all its steps so far, where its KV lives, and its latest score."""

    key: str
    source: tuple[str, int]
    """The paused sample holding this path's KV."""
    text: str
    token_ids: list[int]
    depth: int
    complete: bool
    sample: Sample
    score: float | None = None
    released: bool = field(default=False, repr=False)


class StepPolicy(Protocol):
    @property
    def stats(self) -> dict[str, int]: ...

    def advance(self, population: list[Node], num_finished: int) -> tuple[list[tuple[Node, int]], list[Node]]:
        """(live nodes to extend, with how many children each; finished nodes kept in the population)."""


class StepSearch:
    def __init__(self, name: str, tracker: Tracker, config: ScaleConfig, policy: StepPolicy) -> None:
        self.name = name
        self.t = tracker
        self.config = config
        self.policy = policy
        self.expected: dict[tuple[str, int], Node | None] = {}
        """Samples of the current round -> their parent node (None for the first round)."""
        self.round: list[Node] = []
        self.carried: list[Node] = []
        self.finished: list[Node] = []
        self.depth = 0
        self.num_rounds = 0
        self._done = False

    @property
    def controller_id(self) -> str:
        return self.t.strategy_id

    def owns(self, request_id: str) -> bool:
        return self.t.owns(request_id)

    def _params(self, key: str, last: bool, n: int = 1) -> SamplingParams:
        base = self.config.params
        if last:
            return replace(base, n=n, seed=derive_seed(base.seed, key))
        return replace(base, n=n, seed=derive_seed(base.seed, key), stop=(self.config.step_separator,),
                       include_stop_str_in_output=True, max_tokens=self.config.step_max_tokens)

    def start(self, engine: Engine) -> None:
        request_id = self.t.started(self.t.new_id("n"))
        engine.add_request(request_id, list(self.t.prompt_ids),
                           self._params(request_id, self.config.max_steps == 1, self.config.budget),
                           pause_on_finish=True)
        self.expected = {(request_id, i): None for i in range(self.config.budget)}

    def on_output(self, engine: Engine, out: RequestOutput) -> None:
        if self._done:
            return
        for sample in self.t.route(engine, out):
            key = (sample.request_id, sample.index)
            if key in self.expected:
                self._add_node(engine, sample, self.expected[key])
        if len(self.round) == len(self.expected) and not self.t.pending:
            self._advance(engine)

    def _add_node(self, engine: Engine, sample: Sample, parent: Node | None) -> None:
        ended = sample.finish_reason is FinishReason.STOP and not sample.ended_by_stop_string
        depth = (parent.depth if parent else 0) + 1
        node = Node(key=self.t.new_id("k"), source=(sample.request_id, sample.index),
                    text=(parent.text if parent else "") + sample.text,
                    token_ids=(parent.token_ids if parent else []) + sample.token_ids, depth=depth,
                    complete=ended or depth >= self.config.max_steps, sample=sample)
        self.round.append(node)
        if self.t.verifier is not None:
            self.t.score(engine, node.key, node.text, node.complete, [*self.t.prompt_ids, *node.token_ids],
                         node.source if self.t.verifier.needs_context else None)
        if node.complete:
            self._release(engine, node)
            self.finished.append(node)

    def _release(self, engine: Engine, node: Node) -> None:
        if not node.released:
            engine.release_request(*node.source)
            node.released = True

    def _advance(self, engine: Engine) -> None:
        for node in self.round:
            node.score = self.t.scores.get(node.key, 0.0)
        self.num_rounds += 1
        population = self.round + self.carried
        expansions, self.carried = self.policy.advance(population, len(self.finished))
        self.expected = {}
        for node, count in expansions:
            for _ in range(count):
                child_id = self.t.started(self.t.new_id("n"))
                last = node.depth + 1 >= self.config.max_steps
                engine.fork_request(node.source[0], child_id, self._params(child_id, last),
                                    sample_index=node.source[1], pause_on_finish=True)
                self.expected[(child_id, 0)] = node
        for node in self.round:
            self._release(engine, node)
        self.round = []
        self._done = not self.expected

    @property
    def done(self) -> bool:
        return self._done

    def cancel(self, engine: Engine) -> None:
        self.t.cancel(engine)
        self._done = True

    def result(self) -> ScaleResult:
        nodes = self.finished or self.round
        cands = [self.t.candidate(i, n.sample, text=n.text, score_key=n.key) for i, n in enumerate(nodes)]
        cands = [replace(c, num_tokens=len(n.token_ids)) for c, n in zip(cands, nodes, strict=True)]
        order = sorted(cands, key=lambda c: (-(c.score if c.score is not None else -1.0), c.index))
        best = order[0] if order else None
        return ScaleResult(self.name, best.answer if best else None, best.text if best else "",
                           (best.index,) if best else (), tuple(cands), self.t.ledger.usage(),
                           {"num_rounds": self.num_rounds, "num_finished": len(self.finished),
                            **self.policy.stats})


def make_rng(seed: int | None, strategy_id: str) -> random.Random:
    return random.Random(derive_seed(0 if seed is None else seed, strategy_id))
