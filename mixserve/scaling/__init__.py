"""Inference-time scaling inside the engine: strategies (event-driven controllers over the public
engine API and `fork_request`), verifiers, compute accounting, a task suite and evaluation."""

from mixserve.scaling.accounting import ComputeUsage, ModelCost
from mixserve.scaling.base import Candidate, ScaleConfig, ScaleResult, ScalingError, Strategy
from mixserve.scaling.driver import run_strategies, run_strategy
from mixserve.scaling.registry import STRATEGIES, VERIFIERS, make_strategy, make_verifier
from mixserve.scaling.verifiers import FunctionVerifier, ScoreQuery, Verifier

__all__ = ["Candidate", "ComputeUsage", "FunctionVerifier", "ModelCost", "STRATEGIES", "ScaleConfig",
           "ScaleResult", "ScalingError", "ScoreQuery", "Strategy", "VERIFIERS", "Verifier",
           "make_strategy", "make_verifier", "run_strategies", "run_strategy"]
