"""Validation of sampling parameters and configuration: bad values name the field."""

from __future__ import annotations

import pytest

from mixserve.config import CacheConfig, ConfigError, ModelConfig, SchedulerConfig
from mixserve.sampling_params import SamplingError, SamplingParams


@pytest.mark.parametrize("field,value", [
    ("temperature", -0.1), ("temperature", float("nan")), ("top_p", 0.0), ("top_p", 1.5),
    ("top_k", 0), ("min_p", -0.1), ("min_p", 1.1), ("n", 0), ("n", 5000), ("max_tokens", 0),
    ("max_tokens", -3), ("presence_penalty", 3.0), ("frequency_penalty", -2.5),
    ("repetition_penalty", 0.0), ("logprobs", 21), ("logprobs", -1), ("prompt_logprobs", 99),
    ("seed", "x"), ("stop", ("",)), ("stop_token_ids", (-1,)), ("min_tokens", -1),
])
def test_invalid_sampling_values_name_the_field(field: str, value: object) -> None:
    with pytest.raises(SamplingError, match=field):
        SamplingParams(**{field: value})


def test_min_tokens_above_max_tokens() -> None:
    with pytest.raises(SamplingError, match="min_tokens"):
        SamplingParams(min_tokens=10, max_tokens=5)


def test_valid_sampling_params() -> None:
    p = SamplingParams(n=4, temperature=0.0, top_p=1.0, stop="###", stop_token_ids=[2])
    assert p.greedy and p.stop == ("###",) and p.stop_token_ids == (2,)
    assert SamplingParams(top_k=1, temperature=1.0).greedy
    assert not SamplingParams(temperature=0.5).greedy


@pytest.mark.parametrize("make,field", [
    (lambda: ModelConfig(dtype="float16"), "dtype"),  # type: ignore[arg-type]
    (lambda: ModelConfig(weight_format="int2"), "weight_format"),  # type: ignore[arg-type]
    (lambda: ModelConfig(max_model_len=1), "max_model_len"),
    (lambda: ModelConfig(model=""), "model"),
    (lambda: CacheConfig(block_size=0), "block_size"),
    (lambda: CacheConfig(num_blocks=0), "num_blocks"),
    (lambda: SchedulerConfig(max_num_batched_tokens=0), "max_num_batched_tokens"),
    (lambda: SchedulerConfig(max_num_seqs=0), "max_num_seqs"),
])
def test_invalid_config_names_the_field(make, field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        make()
