"""Counter-based randomness: the uniform a seeded row draws is a function of (seed, position) only.

A seeded request's token at sequence position `p` (the index it will have in prompt + output) is drawn
from a generator seeded with `position_seed(seed, p)`, never from a generator that advanced over earlier
steps. So the randomness of every token is fixed by the request alone: a request resumed elsewhere from
its prompt plus the tokens it already produced (failover, migration, recompute after preemption)
continues with exactly the tokens the uninterrupted run would have produced.
"""

from __future__ import annotations

import torch

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    """One round of SplitMix64 (Steele et al.): a bijective 64-bit mixer with good avalanche."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def position_seed(seed: int, position: int) -> int:
    """The generator seed of the token at sequence `position` of a request seeded with `seed`:
    a 63-bit mix of both (any int seed in `SamplingParams`' range; `position >= 0`)."""
    return _splitmix64(_splitmix64(seed & _MASK64) ^ position) & 0x7FFF_FFFF_FFFF_FFFF


def position_generator(seed: int, position: int) -> torch.Generator:
    """A fresh CPU generator for the token at `position` of a request seeded with `seed`."""
    return torch.Generator().manual_seed(position_seed(seed, position))
