"""Mixtures of whole expert models: a budgeted model pool, skill profiles, per-question recruitment,
aggregation, and model-grouped batching (Symbolic-MoE / Skill-MoE, with an MoE²-style budget filter)."""

from mixserve.mixture.pool import LoadResult, ModelLoader, ModelPool, PoolError

__all__ = ["LoadResult", "ModelLoader", "ModelPool", "PoolError"]
