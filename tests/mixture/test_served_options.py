"""A served mixture answers with the server's mixture options (aggregation, keyword prompt, temperature)."""

from __future__ import annotations

import asyncio

from mixserve.mixture.pipeline import MixtureConfig
from mixserve.mixture.profiles import Profiles
from mixserve.mixture.served import ServedMixture
from mixserve.mixture.skills import KeywordMapper, SkillConfig
from mixserve.sampling_params import SamplingParams
from tests.mixture.conftest import synthetic_pool


class _Embedder:
    def encode(self, texts: list[str]) -> list[list[float]]:
        return [[1.0, 0.0] for _ in texts]


def test_served_mixture_uses_its_config_and_skills() -> None:
    pool, _ = synthetic_pool({"a": {"gcd": 1.0}, "b": {"gcd": 0.0}})
    profiles = Profiles({"a": {"gcd": 1}, "b": {"gcd": -1}})
    served = ServedMixture("m", profiles, pool, SamplingParams(max_tokens=4, temperature=0.0),
                           config=MixtureConfig(aggregation="majority"), skills=SkillConfig(prompt="paper"))
    served.mapper = KeywordMapper(profiles.vocabulary(), _Embedder())
    loop = asyncio.new_event_loop()
    try:
        mixture = served._mixture(loop)
    finally:
        loop.close()
    assert mixture.config.aggregation == "majority" and mixture.skills.prompt == "paper"
    default = ServedMixture("d", profiles, pool, SamplingParams(max_tokens=4))
    default.mapper = served.mapper
    loop = asyncio.new_event_loop()
    try:
        plain = default._mixture(loop)
    finally:
        loop.close()
    assert plain.config == MixtureConfig() and plain.skills == SkillConfig()  # the paper's defaults
