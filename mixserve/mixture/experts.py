"""Experts: whole models that answer batches of requests. Real ones wrap an `LLM`; synthetic ones have a
known per-skill accuracy (for exact tests of recruitment, aggregation and scheduling)."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

from mixserve.sampling_params import SamplingParams

if TYPE_CHECKING:
    from mixserve.llm import LLM

Role = Literal["solve", "aggregate", "keywords"]


@dataclass(frozen=True)
class Question:
    """One question of a mixture run."""

    qid: str
    text: str
    """The prompt text, with its answer-format instruction."""
    reference: str | None = None
    """The canonical correct answer, when known (validation sets, benchmarks)."""
    task: str | None = None
    """Task family (the scaling task that extracts and checks answers); skill ground truth for reports."""
    problem: Any = None
    """The task's `Problem`, when the question came from one (its checker may need the data)."""


@dataclass(frozen=True)
class ExpertRequest:
    """One generation an expert is asked for; `prompt` is what a real model sees."""

    question: Question
    prompt: str
    role: Role = "solve"
    seed: int = 0
    candidates: tuple[str, ...] = ()
    """Answers being aggregated (role "aggregate")."""
    shots: tuple[tuple[str, str], ...] = ()
    """Few-shot examples, (user, assistant) turns a chat model sees before `prompt` (role "keywords")."""
    temperature: float | None = None
    """Overrides the expert's sampling temperature for this request (None: the expert's own): keyword
    samples stay sampled for the self-consistency filter when the experts answer greedily."""


def request_params(params: SamplingParams, request: ExpertRequest) -> SamplingParams:
    """`params` for one request: its temperature override, and its seed when it samples."""
    from dataclasses import replace

    if request.temperature is not None:
        params = replace(params, temperature=request.temperature)
    return replace(params, seed=request.seed if params.temperature > 0 else None)


def chat_messages(request: ExpertRequest) -> list[dict[str, str]]:
    """The request as a conversation: its few-shot turns, then `prompt` as the user turn."""
    messages = []
    for user, assistant in request.shots:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return [*messages, {"role": "user", "content": request.prompt}]


def raw_prompt(request: ExpertRequest) -> str:
    """The request as plain text, for a model without a chat template."""
    return "".join(f"{user}\n{assistant}\n\n" for user, assistant in request.shots) + request.prompt + "\n"


@dataclass(frozen=True)
class ExpertAnswer:
    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0


class Expert(Protocol):
    """Answers a batch of requests in one go (a model runs all of its work together)."""

    def generate(self, requests: list[ExpertRequest]) -> list[ExpertAnswer]: ...


class LLMExpert:
    """A real model: each prompt through the chat template (raw text when the model has none), one
    batched `generate`; the request's seed makes samples reproducible."""

    def __init__(self, llm: LLM, params: SamplingParams) -> None:
        self.llm = llm
        self.params = params

    def _prompt(self, request: ExpertRequest) -> str:
        try:
            return self.llm.chat_prompt(chat_messages(request))  # type: ignore[arg-type]
        except Exception:  # noqa: BLE001 - a base model without a chat template gets the raw text
            return raw_prompt(request)

    def generate(self, requests: list[ExpertRequest]) -> list[ExpertAnswer]:
        prompts = [self._prompt(r) for r in requests]
        # One engine batch: requests with different seeds still run together (seed is per request).
        finals = self.llm.generate(prompts, [request_params(self.params, r) for r in requests])
        return [ExpertAnswer(out.outputs[0].text, len(out.prompt_token_ids or []), len(out.outputs[0].token_ids))
                for out in finals]


@dataclass
class SyntheticExpert:
    """Answers a question of task t correctly with probability `accuracy[t]` (independently per request,
    from a seeded RNG); wrong answers are distinct per (expert, seed) so they never agree by chance.

    As an aggregator: majority of the candidates' answers (ties: the earliest candidate), or, with
    `aggregate_accuracy` set, the right answer with that probability when some candidate has it.
    As a keyword annotator: `keywords[task]` (what a perfectly consistent annotator would say).
    """

    name: str
    accuracy: Mapping[str, float]
    index: int = 0
    aggregate_accuracy: float | None = None
    keywords: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    extract: Callable[[str], str | None] = lambda text: text.rsplit("Answer:", 1)[-1].strip() or None

    def _rng(self, request: ExpertRequest) -> random.Random:
        return random.Random(f"{self.name}:{request.role}:{request.question.qid}:{request.seed}")

    def _solve(self, r: ExpertRequest) -> str:
        q = r.question
        right = self._rng(r).random() < self.accuracy.get(q.task or "", 0.0)
        return f"Answer: {q.reference if right else self._wrong(q.reference or '0', r.seed)}"

    def _wrong(self, reference: str, seed: int) -> str:
        """A wrong answer in the task's format, distinct per (expert, seed): references that are integers
        are shifted, lists get one more element."""
        tag = 1_000_000 * (self.index + 1) + seed + 1
        return str(int(reference) + tag) if reference.lstrip("-").isdigit() else f"{reference},{tag}"

    def _aggregate(self, r: ExpertRequest) -> str:
        answers = [self.extract(c) for c in r.candidates]
        if self.aggregate_accuracy is not None:
            has_right = r.question.reference in answers
            if has_right and self._rng(r).random() < self.aggregate_accuracy:
                return f"Answer: {r.question.reference}"
            wrong = [a for a in answers if a != r.question.reference]
            return f"Answer: {wrong[0] if wrong else self._wrong(r.question.reference or '0', -1)}"
        return f"Answer: {majority(answers)}"

    def generate(self, requests: list[ExpertRequest]) -> list[ExpertAnswer]:
        out = []
        for r in requests:
            if r.role == "solve":
                text = self._solve(r)
            elif r.role == "aggregate":
                text = self._aggregate(r)
            else:
                text = "Keywords: " + ", ".join(self.keywords.get(r.question.task or "", ()))
            out.append(ExpertAnswer(text, len(r.prompt.split()), len(text.split())))
        return out


def majority(answers: list[str | None]) -> str | None:
    """The most frequent non-empty answer; ties go to the one seen first; None when there is none."""
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return None
    best = max(counts.values())
    return next(a for a in answers if a is not None and counts[a] == best)
