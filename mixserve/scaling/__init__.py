"""Inference-time scaling inside the engine: strategies (event-driven controllers over the public
engine API and `fork_request`), verifiers, compute accounting, a task suite and evaluation."""

from mixserve.scaling.accounting import ComputeUsage, ModelCost
from mixserve.scaling.answers import EXTRACTORS, get_extractor
from mixserve.scaling.base import Candidate, ScaleConfig, ScaleResult, ScalingError, Strategy
from mixserve.scaling.driver import run_strategies, run_strategy
from mixserve.scaling.registry import STRATEGIES, VERIFIERS, make_strategies, make_strategy, make_verifier
from mixserve.scaling.verifiers import (
    Answered,
    AnswerFunctionVerifier,
    FunctionVerifier,
    ProblemVerifier,
    ScaleProblem,
    ScoreAnswerVerifier,
    ScoreQuery,
    Verifier,
)

__all__ = ["AnswerFunctionVerifier", "Answered", "Candidate", "ComputeUsage", "EXTRACTORS", "FunctionVerifier",
           "ModelCost", "ProblemVerifier", "STRATEGIES", "ScaleConfig", "ScaleProblem", "ScaleResult",
           "ScalingError", "ScoreAnswerVerifier", "ScoreQuery", "Strategy", "VERIFIERS", "Verifier",
           "get_extractor", "make_strategies", "make_strategy", "make_verifier", "run_strategies", "run_strategy"]
