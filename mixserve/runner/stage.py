"""What one pipeline stage hands the next: the step it ran and the hidden states after its blocks.

A model runs as stages (`CausalLM.embed`, `forward_layers(a, b)`, `head`), so a step can run on
several runners, each owning a contiguous layer range `[a, b)` and the KV caches of those layers
only. Every stage gets the same plain step data and rebuilds positions and attention metadata from
it (all stages share one block layout); only the residual stream travels between them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mixserve.engine.scheduler import ScheduledSeq, SchedulerOutput


def batch_order(seqs: list[ScheduledSeq]) -> list[ScheduledSeq]:
    """The order a runner packs a step's tokens in: every single-token (decode) sequence first,
    then each longer chunk, each part in scheduling order (so decodes share one attention group)."""
    return sorted(seqs, key=lambda s: s.num_tokens != 1)


@dataclass(frozen=True)
class StageBoundary:
    """The output of layers `[.., layer)` for one step, to be continued by the stage owning `layer`."""

    step: SchedulerOutput
    """The step being run (the same object every stage executes)."""
    hidden: torch.Tensor
    """`[num_tokens, hidden_size]` residual stream (before the final norm): the tokens of
    `batch_order(step.seqs)`, packed."""
    layer: int
    """The first layer these hidden states have not been through."""

    def __post_init__(self) -> None:
        if self.hidden.dim() != 2 or self.hidden.shape[0] != self.step.num_tokens:
            raise ValueError(f"hidden states {tuple(self.hidden.shape)} do not match the step's "
                             f"{self.step.num_tokens} tokens")
