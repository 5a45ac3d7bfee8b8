"""Compute accounting: every token a strategy spends, split by policy and verifier, plus FLOPs.

Per engine request the ledger keeps the latest cumulative counts the engine reports
(`RequestOutput.metrics`: `num_computed_prompt_tokens`, `num_computed_tokens`) and the generated
tokens of each delta. "Prompt tokens" counts each sample's whole context (what an orchestrator that
re-sends the prefix for every sample or step would prefill); "prefill" is what the engine computed;
"reused" is the difference (fork sharing and prefix-cache hits).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from mixserve.outputs import RequestOutput

Role = Literal["policy", "verifier"]


@dataclass(frozen=True)
class ModelCost:
    """What FLOPs estimates need to know about the model (forward pass only)."""

    num_params: int
    """All parameters; a token costs about 2 * num_params FLOPs in the matmuls."""
    num_layers: int
    attention_dim: int
    """num_heads * head_dim: attending at context length c costs 4 * num_layers * attention_dim * c."""

    def flops(self, num_tokens: float, mean_context: float) -> float:
        return num_tokens * (2.0 * self.num_params + 4.0 * self.num_layers * self.attention_dim * mean_context)

    @classmethod
    def from_model(cls, hf_config: dict, model: Any) -> ModelCost:
        """The cost of a loaded model (`model.parameters()` counted once)."""
        return cls.from_hf_config(hf_config, sum(p.numel() for p in model.parameters()))

    @classmethod
    def from_hf_config(cls, hf_config: dict, num_params: int) -> ModelCost:
        heads = int(hf_config["num_attention_heads"])
        head_dim = int(hf_config.get("head_dim") or int(hf_config["hidden_size"]) // heads)
        return cls(num_params, int(hf_config["num_hidden_layers"]), heads * head_dim)


@dataclass(frozen=True)
class ComputeUsage:
    """Tokens and estimated FLOPs spent by one strategy call."""

    num_requests: int = 0
    num_samples: int = 0
    policy_prompt_tokens: int = 0
    policy_prefill_tokens: int = 0
    policy_reused_tokens: int = 0
    policy_generated_tokens: int = 0
    verifier_calls: int = 0
    """Scores computed (programmatic ones included)."""
    verifier_prompt_tokens: int = 0
    verifier_prefill_tokens: int = 0
    verifier_reused_tokens: int = 0
    verifier_generated_tokens: int = 0
    computed_tokens: int = 0
    """Every token the runner computed for this call (prefill, decode, recomputation)."""
    flops: float | None = None
    """Estimated forward FLOPs (None when the model cost is unknown)."""

    @property
    def total_generated_tokens(self) -> int:
        return self.policy_generated_tokens + self.verifier_generated_tokens

    def to_dict(self) -> dict[str, float | int | None]:
        return asdict(self)

    def openai_usage(self) -> dict[str, object]:
        """OpenAI `usage` for a strategy response: prompt = every context presented (policy and
        verifier), cached = what was reused instead of prefilled, plus the full breakdown."""
        prompt = self.policy_prompt_tokens + self.verifier_prompt_tokens
        completion = self.total_generated_tokens
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": self.policy_reused_tokens + self.verifier_reused_tokens},
                "scaling": self.to_dict()}


@dataclass
class _RequestTally:
    role: Role
    prompt_len: int
    num_samples: int = 0
    generated: int = 0
    computed_prompt: int = 0
    computed: int = 0


@dataclass
class Ledger:
    """Accumulates the deltas of a strategy's requests into a `ComputeUsage`."""

    cost: ModelCost | None = None
    tallies: dict[str, _RequestTally] = field(default_factory=dict)
    verifier_calls: int = 0

    def record(self, out: RequestOutput | None, role: Role) -> None:
        if out is None:
            return
        tally = self.tallies.setdefault(out.request_id, _RequestTally(role, len(out.prompt_token_ids)))
        for part in out.outputs:
            tally.num_samples = max(tally.num_samples, part.index + 1)
            tally.generated += len(part.token_ids)
        # Cumulative counts: the latest is the largest (an output without metrics keeps the tally).
        tally.computed_prompt = max(tally.computed_prompt, out.metrics.num_computed_prompt_tokens)
        tally.computed = max(tally.computed, out.metrics.num_computed_tokens)

    def usage(self) -> ComputeUsage:
        sums = {"policy": [0, 0, 0], "verifier": [0, 0, 0]}  # prompt, prefill, generated
        samples = computed = 0
        flops = 0.0
        for t in self.tallies.values():
            s = sums[t.role]
            s[0] += t.prompt_len * max(t.num_samples, 1)
            s[1] += t.computed_prompt
            s[2] += t.generated
            computed += t.computed
            samples += t.num_samples if t.role == "policy" else 0
            if self.cost is not None:
                mean_context = t.prompt_len + t.generated / max(2 * t.num_samples, 1)
                flops += self.cost.flops(t.computed, mean_context)
        p, v = sums["policy"], sums["verifier"]
        return ComputeUsage(
            num_requests=len(self.tallies), num_samples=samples,
            policy_prompt_tokens=p[0], policy_prefill_tokens=p[1], policy_reused_tokens=p[0] - p[1],
            policy_generated_tokens=p[2], verifier_calls=self.verifier_calls,
            verifier_prompt_tokens=v[0], verifier_prefill_tokens=v[1], verifier_reused_tokens=v[0] - v[1],
            verifier_generated_tokens=v[2], computed_tokens=computed,
            flops=flops if self.cost is not None else None)
