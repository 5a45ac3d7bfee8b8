"""Sampling: logits of one step -> token ids (+ logprobs). See `sampler` for the pipeline."""

from mixserve.sample.logprobs import gather_logprobs, prompt_logprobs
from mixserve.sample.sampler import Sampler, SamplerOutput, SamplingRow

__all__ = ["Sampler", "SamplerOutput", "SamplingRow", "gather_logprobs", "prompt_logprobs"]
