"""Expert weights for MoE layers: the provider seam, the all-resident provider, routing traces, and
experts under a memory budget (pack/store, budgeted cache, policies, predictors, synthetic routing).

Model wiring from `ExpertConfig` lives in `mixserve.experts.setup` (not re-exported: it imports
`layers.moe`, which imports this package)."""

from mixserve.experts.budgeted import BudgetedExpertProvider
from mixserve.experts.pack import dtype_plan, write_pack
from mixserve.experts.policy import BeladyPolicy, EvictionPolicy, LFRUPolicy, LFUPolicy, LRUPolicy
from mixserve.experts.predict import AffinityPredictor, ExpertPredictor, RouterLookahead
from mixserve.experts.provider import (
    ExpertKey,
    ExpertProj,
    ExpertProvider,
    ExpertWeights,
    InMemoryExpertProvider,
    borrow_experts,
)
from mixserve.experts.simulate import SimResult, compare_policies, simulate
from mixserve.experts.store import ExpertStore, PackError
from mixserve.experts.synthetic import SyntheticRouting, SyntheticRoutingConfig
from mixserve.experts.trace import RouteSource, RoutingObserver, RoutingTrace, TraceReplay, TraceStep

__all__ = [
    "AffinityPredictor",
    "BeladyPolicy",
    "BudgetedExpertProvider",
    "EvictionPolicy",
    "ExpertPredictor",
    "ExpertStore",
    "LFRUPolicy",
    "LFUPolicy",
    "LRUPolicy",
    "PackError",
    "RouteSource",
    "RouterLookahead",
    "SimResult",
    "SyntheticRouting",
    "SyntheticRoutingConfig",
    "TraceReplay",
    "compare_policies",
    "dtype_plan",
    "simulate",
    "write_pack",
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
