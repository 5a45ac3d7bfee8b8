"""Particle filtering with a process reward (Puri et al. 2025): N particles; after every step each
particle is weighted by softmax(logit(score) / temperature); when the effective sample size
1 / sum(w^2) falls below `ess_threshold * N` the population is resampled multinomially (a particle
drawn c times is forked c times: refcounts, no recompute). Finished particles are absorbing: they are
kept (and can be drawn again) but never extended."""

from __future__ import annotations

import math
import random

from mixserve.scaling.search import Node

_EPS = 1e-3


def weights(scores: list[float], temperature: float) -> list[float]:
    logits = [math.log(min(max(s, _EPS), 1 - _EPS) / (1 - min(max(s, _EPS), 1 - _EPS))) / temperature
              for s in scores]
    top = max(logits)
    exps = [math.exp(x - top) for x in logits]
    total = sum(exps)
    return [e / total for e in exps]


def effective_sample_size(w: list[float]) -> float:
    return 1.0 / sum(x * x for x in w)


class ParticlePolicy:
    def __init__(self, num_particles: int, temperature: float, ess_threshold: float,
                 rng: random.Random) -> None:
        self.num_particles = num_particles
        self.temperature = temperature
        self.ess_threshold = ess_threshold
        self.rng = rng
        self.num_resamples = 0

    @property
    def stats(self) -> dict[str, int]:
        return {"num_resamples": self.num_resamples}

    def advance(self, population: list[Node], num_finished: int) -> tuple[list[tuple[Node, int]], list[Node]]:
        if all(n.complete for n in population):
            return [], []
        w = weights([n.score or 0.0 for n in population], self.temperature)
        if effective_sample_size(w) < self.ess_threshold * self.num_particles:
            self.num_resamples += 1
            drawn = self.rng.choices(range(len(population)), weights=w, k=self.num_particles)
            counts = [drawn.count(i) for i in range(len(population))]
        else:
            counts = [1] * len(population)
        expand = [(n, c) for n, c in zip(population, counts, strict=True) if c and not n.complete]
        carried = [n for n, c in zip(population, counts, strict=True) for _ in range(c) if n.complete]
        return expand, carried
