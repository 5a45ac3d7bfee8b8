"""Edge–cloud split inference (CE-CoLLM): layers `[0, K)` plus an early-exit head on the edge, layers
`[K, L)` and the final head in the cloud, which receives each position's hidden state once."""

from mixserve.edge.cloud import CloudContextManager, CloudService
from mixserve.edge.codec import Codec
from mixserve.edge.config import CloudConfig, EdgeConfig
from mixserve.edge.edge import EdgeResult, EdgeRunner, EdgeStats
from mixserve.edge.frames import Frame, FrameError, FrameKind
from mixserve.edge.sampling import SplitSampling, TokenPicker

__all__ = ["Codec", "CloudConfig", "CloudContextManager", "CloudService", "EdgeConfig", "EdgeResult",
           "EdgeRunner", "EdgeStats", "Frame", "FrameError", "FrameKind", "SplitSampling", "TokenPicker"]
