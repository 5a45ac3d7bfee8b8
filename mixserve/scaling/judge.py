"""LLM-judge / self-evaluation verifier: the probability of "yes" after a judge question, read from
the logprobs of one forward pass (max_tokens=1, no generation) through an ordinary engine request.

When the candidate is a paused sample, the judge request forks from it and appends only the
question tokens, so the candidate's KV is reused and the verifier prefills a few tokens only.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from mixserve.sampling_params import SamplingParams
from mixserve.scaling.verifiers import ScoreQuery

if TYPE_CHECKING:
    from mixserve.engine.engine import Engine
    from mixserve.outputs import RequestOutput

QUESTION = "Is the answer above correct? Answer yes or no."
_MARK = "\x00"
SUFFIX = "/judge"


class JudgeVerifier:
    """Score = P(yes) / (P(yes) + P(no)) over the top-`top_logprobs` next tokens (0.5 when neither)."""

    needs_context = True
    name = "judge"

    def __init__(self, suffix_ids: list[int], yes_ids: set[int], no_ids: set[int],
                 top_logprobs: int = 20) -> None:
        self.suffix_ids = suffix_ids
        self.yes_ids, self.no_ids = yes_ids, no_ids
        self.params = SamplingParams(temperature=0.0, max_tokens=1, logprobs=top_logprobs)
        self.pending: dict[str, str] = {}

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, question: str = QUESTION) -> JudgeVerifier:
        """Ask `question` as a new user turn after the candidate (chat models) or as plain text."""
        if tokenizer.chat_template_is_default:
            suffix = f"\n\nQuestion: {question}\nAnswer:"
        else:
            full = tokenizer.apply_chat_template(
                [{"role": "user", "content": "q"}, {"role": "assistant", "content": _MARK},
                 {"role": "user", "content": question}], add_generation_prompt=True)
            suffix = full.split(_MARK, 1)[1]

        def first_ids(words: tuple[str, ...]) -> set[int]:
            return {ids[0] for w in words if (ids := tokenizer.encode(w, add_special_tokens=False))}

        return cls(tokenizer.encode(suffix, add_special_tokens=False),
                   first_ids(("yes", "Yes", " yes", " Yes", "YES")),
                   first_ids(("no", "No", " no", " No", "NO")))

    def submit(self, engine: Engine, query: ScoreQuery) -> float | None:
        request_id = query.key + SUFFIX
        if query.source is not None:
            engine.fork_request(query.source[0], request_id, self.params, sample_index=query.source[1],
                                append_token_ids=self.suffix_ids)
        else:
            engine.add_request(request_id, list(query.context_ids) + self.suffix_ids, self.params)
        self.pending[request_id] = query.key
        return None

    def owns(self, request_id: str) -> bool:
        return request_id in self.pending

    def on_output(self, engine: Engine, out: RequestOutput) -> list[tuple[str, float]]:
        if not out.finished or out.request_id not in self.pending:
            return []
        key = self.pending.pop(out.request_id)
        logprobs = out.outputs[0].logprobs if out.outputs else None
        if not logprobs:
            return [(key, 0.5)]
        top = logprobs[0]
        p_yes = sum(math.exp(lp.logprob) for t, lp in top.items() if t in self.yes_ids)
        p_no = sum(math.exp(lp.logprob) for t, lp in top.items() if t in self.no_ids)
        return [(key, p_yes / (p_yes + p_no) if p_yes + p_no > 0 else 0.5)]

    def cancel(self, engine: Engine, key: str) -> None:
        request_id = key + SUFFIX
        if self.pending.pop(request_id, None) is not None:
            engine.abort_request(request_id)
