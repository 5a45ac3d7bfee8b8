"""One sequence run over a contiguous layer range `[start, end)` with its own KV cache.

Both sides of the split use it: the edge owns `[0, K)` (fed token ids), the cloud `[K, L)` per session
(fed the edge's hidden states). It drives the shared `TorchModelRunner` stage seam with a one-sequence
step whose block table is simply `0, 1, ...`, so every forward is the same computation the whole-model
engine does for a single request (prefill as one chunk, then one position at a time).
"""

from __future__ import annotations

import torch

from mixserve.engine.scheduler import SamplingSpec, ScheduledSeq, SchedulerOutput
from mixserve.models.base import CausalLM
from mixserve.runner.model_runner import TorchModelRunner, kv_bytes_per_block
from mixserve.runner.stage import StageBoundary
from mixserve.sampling_params import SamplingParams

BLOCK_SIZE = 16
_SPEC = SamplingSpec(SamplingParams(temperature=0.0), None)


class SequenceStage:
    """Layers `[start, end)` of `model` for one sequence of at most `max_len` positions."""

    def __init__(self, model: CausalLM, start: int, end: int, max_len: int, dtype: torch.dtype) -> None:
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
        self.num_blocks = -(-max_len // BLOCK_SIZE)
        self.max_len = max_len
        self.runner = TorchModelRunner(model, self.num_blocks, BLOCK_SIZE, dtype, (), layers=(start, end))
        self.start, self.end = start, end
        self.kv_bytes = self.num_blocks * kv_bytes_per_block(self.runner.kv_spec, BLOCK_SIZE, dtype)
        """Bytes of this stage's KV cache."""
        self.num_computed = 0
        """Positions whose KV this stage holds (the next forward starts here)."""

    def forward(self, token_ids: list[int] | None = None, hidden: torch.Tensor | None = None) -> torch.Tensor:
        """Run the next positions: token ids when `start == 0`, else `[n, hidden_size]` hidden states of
        layer `start`. Returns `[n, hidden_size]` hidden states of layer `end` (residual stream)."""
        n = len(token_ids) if token_ids is not None else (0 if hidden is None else hidden.shape[0])
        if n == 0:
            raise ValueError("forward needs at least one position")
        if self.num_computed + n > self.max_len:
            raise ValueError(f"sequence of {self.num_computed + n} positions exceeds max_len={self.max_len}")
        seq = ScheduledSeq("seq", self.num_computed, list(token_ids) if token_ids is not None else [0] * n,
                           list(range(self.num_blocks)), False, (), (), _SPEC)
        out = SchedulerOutput(seqs=[seq], copies=[], block_size=BLOCK_SIZE)
        step: SchedulerOutput | StageBoundary = out
        if hidden is not None:
            step = StageBoundary(out, hidden.to(self.runner.dtype), self.start)
        result = self.runner.execute_stage(step).hidden
        self.num_computed += n
        return result
