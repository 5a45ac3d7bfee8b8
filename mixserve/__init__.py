"""mixserve: an inference engine for experts at every scale."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mixserve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from mixserve.outputs import CompletionOutput, FinishReason, Logprob, RequestOutput
from mixserve.sampling_params import SamplingParams

if TYPE_CHECKING:
    from mixserve.llm import LLM

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "FinishReason", "Logprob",
           "EngineConfig", "ModelConfig", "CacheConfig", "SchedulerConfig"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # LLM pulls in torch; the control plane and its tests must import without it.
    if name == "LLM":
        from mixserve.llm import LLM

        return LLM
    raise AttributeError(name)
