"""Step-level beam search with a process reward: keep the `width` best paths of each round, give
each `budget // width` children; finished paths that make the cut are final candidates. Stops when
`width` paths have finished or nothing is left to extend."""

from __future__ import annotations

from mixserve.scaling.search import Node


class BeamPolicy:
    def __init__(self, budget: int, width: int) -> None:
        self.width = width
        self.children = max(1, budget // width)
        self.num_pruned = 0

    @property
    def stats(self) -> dict[str, int]:
        return {"beam_width": self.width, "num_pruned": self.num_pruned}

    def advance(self, population: list[Node], num_finished: int) -> tuple[list[tuple[Node, int]], list[Node]]:
        ranked = sorted(population, key=lambda n: -(n.score or 0.0))  # stable: ties keep arrival order
        kept = ranked[:self.width]
        self.num_pruned += len(population) - len(kept)
        if num_finished >= self.width:
            return [], []
        room = self.width - num_finished
        live = [n for n in kept if not n.complete][:room]
        return [(n, self.children) for n in live], []
