"""Expert weights for MoE layers: the provider seam, the all-resident provider, routing traces."""

from mixserve.experts.provider import (
    ExpertKey,
    ExpertProj,
    ExpertProvider,
    ExpertWeights,
    InMemoryExpertProvider,
    borrow_experts,
)
from mixserve.experts.trace import RoutingObserver, RoutingTrace, TraceStep

__all__ = [
    "ExpertKey",
    "ExpertProj",
    "ExpertProvider",
    "ExpertWeights",
    "InMemoryExpertProvider",
    "RoutingObserver",
    "RoutingTrace",
    "TraceStep",
    "borrow_experts",
]
