"""The W-worker step loop: every pass decodes one token per worker, in one batch, over one cache.

State: the common history (the prompt segment, then every finished step, in finishing order), the
constant header segments of `format.py`, and one in-progress segment per worker. Worker `w`'s view is
`[history..., step_header, (other, pivot) for each other worker, own_header, own]`; each other
worker's segment is seen at its length before this pass.

A worker whose last sampled token ends a step writes that token into its old segment; in the same
pass the old segment joins the history (the same blocks: no key is recomputed or copied) and the
worker's next step header is written into a fresh segment over the new view, so no pass is lost at
step boundaries. The loop stops when a finished step holds a `\\boxed{}` answer or after
`max_tokens` passes; then, with no answer, the finisher view is decoded greedily.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from mixserve.hogwild.format import HogwildFormat
from mixserve.hogwild.forward import ViewModel, forward_runs
from mixserve.hogwild.segments import Segment, SegmentPool
from mixserve.hogwild.views import Run, ViewPart
from mixserve.sample import Sampler, SamplingRow
from mixserve.sampling_params import SamplingParams


class TextCodec(Protocol):
    bos_token_id: int | None
    eos_token_ids: list[int]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...


@dataclass(frozen=True)
class HogwildConfig:
    """One hogwild run (validated on construction)."""

    workers: int = 2
    """Parallel workers sharing the cache."""
    max_tokens: int = 256
    """Passes (tokens per worker): W workers generate up to W * max_tokens tokens in the time one
    worker takes for max_tokens (decode is memory-bound)."""
    finisher_max_tokens: int = 16
    """Greedy tokens after the finisher suffix when the budget ends without an answer."""
    collab_every: int | None = 256
    """A new step starts with the redundancy check once this many tokens were generated (all workers)
    since the last one; None: never."""
    stop_on_answer: bool = True
    """Stop as soon as a finished step holds a \\boxed{} answer."""
    params: SamplingParams = field(default_factory=lambda: SamplingParams(temperature=0.7))
    """Sampling of every worker (temperature, top_p, top_k, min_p, penalties, seed); max_tokens/n unused."""
    format: HogwildFormat = field(default_factory=HogwildFormat)
    reference_attention: bool = False
    """Attend every run through the torch reference (per segment + log-sum-exp merge), for checks."""

    def __post_init__(self) -> None:
        self.format.worker_names(self.workers)  # raises for a bad count
        if self.max_tokens < 1:
            raise ValueError(f"invalid max_tokens={self.max_tokens}: must be >= 1")
        if self.finisher_max_tokens < 0:
            raise ValueError(f"invalid finisher_max_tokens={self.finisher_max_tokens}: must be >= 0")
        if self.collab_every is not None and self.collab_every < 1:
            raise ValueError(f"invalid collab_every={self.collab_every}: must be None or >= 1")


@dataclass(frozen=True)
class HogwildStep:
    worker: str
    index: int
    text: str
    finished: bool
    """False for a step still in progress when the run ended."""


@dataclass(frozen=True)
class HogwildResult:
    """What a run produced and what it cost."""

    answer: str | None
    """The `\\boxed{}` body of the answering step or of the finisher (None: none given)."""
    answer_text: str
    """The text the answer was read from (the answering step, or `\\boxed{` + finisher output)."""
    transcript: str
    """Past steps in finishing order, then every worker's unfinished step."""
    steps: tuple[HogwildStep, ...]
    workers: int
    num_passes: int
    """Forward passes of the step loop (each decodes one token per worker)."""
    num_prompt_tokens: int
    num_prefill_tokens: int
    """Tokens written that were not sampled: prompt, format headers, step headers, finisher suffix."""
    num_generated_tokens: int
    """Sampled tokens (every worker, and the finisher)."""
    num_computed_tokens: int
    """Tokens whose K/V were computed: prefill + generated, each exactly once."""
    seconds: float
    pass_seconds: tuple[float, ...]
    """Wall time of each step-loop pass (model + sampling)."""
    finished_by: str
    """"answer" (a step gave one), "budget" (max_tokens passes) ."""


@dataclass(eq=False)
class _Worker:
    index: int
    name: str
    segment: Segment
    step: int = 1
    pending: list[int] = field(default_factory=list)
    """Tokens the next pass writes into `segment` (the last sampled one, or a new step's header)."""
    step_ids: list[int] = field(default_factory=list)
    """The current step: written and pending tokens."""
    generated: list[int] = field(default_factory=list)
    ends_step: bool = False


class HogwildSession:
    """Runs one problem with `config.workers` workers over `vm`'s cache and `segments`' blocks."""

    def __init__(self, vm: ViewModel, segments: SegmentPool, tokenizer: TextCodec, config: HogwildConfig) -> None:
        self.vm, self.segments, self.tok, self.config = vm, segments, tokenizer, config
        self.fmt = config.format
        self.sampler = Sampler(torch.Generator().manual_seed(config.params.seed or 0))
        self.forbidden = self._forbidden_ids()
        self.history: list[ViewPart] = []
        self.finished_steps: list[HogwildStep] = []
        self.workers: list[_Worker] = []
        self.since_check = 0
        self.num_generated = 0
        self.num_prefill = 0
        """Tokens written that were not sampled (prompt, headers, finisher suffix)."""

    def _forbidden_ids(self) -> tuple[int, ...]:
        ids = {i for i in (self.tok.bos_token_id, *self.tok.eos_token_ids) if i is not None}
        for text in self.fmt.forbidden:
            encoded = self.tok.encode(text, add_special_tokens=False)
            if len(encoded) == 1:
                ids.add(encoded[0])
        return tuple(sorted(ids))

    def _encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)

    def run(self, prompt_ids: Sequence[int]) -> HogwildResult:
        """The whole loop; every block taken is given back, also when it raises."""
        start = time.perf_counter()
        try:
            return self._run(list(prompt_ids), start)
        finally:
            self.segments.release_all()

    def _run(self, prompt_ids: list[int], start: float) -> HogwildResult:
        if not prompt_ids:
            raise ValueError("hogwild: the prompt is empty")
        c, fmt = self.config, self.fmt
        written_before = self.segments.num_written_tokens
        self._prefill(prompt_ids)
        passes: list[float] = []
        finished_by, answer, answer_text = "budget", None, ""
        while len(passes) < c.max_tokens:
            t0 = time.perf_counter()
            tokens = self._pass()
            passes.append(time.perf_counter() - t0)
            found = self._advance(tokens)
            if found is not None and c.stop_on_answer:
                finished_by, (answer, answer_text) = "answer", found
                break
        if answer is None and c.finisher_max_tokens > 0:
            answer_text = fmt.finisher_suffix[fmt.finisher_suffix.rindex("\\boxed{"):] + self._finish()
            answer = fmt.answer(answer_text)
        computed = self.segments.num_written_tokens - written_before
        open_steps = tuple(HogwildStep(w.name, w.step, self.tok.decode(w.segment.token_ids), False)
                           for w in self.workers if w.segment.length)
        transcript = "".join(s.text for s in self.finished_steps) + fmt.step_header() + "".join(
            s.text + fmt.pivot_text() for s in open_steps)
        return HogwildResult(
            answer=answer, answer_text=answer_text, transcript=transcript, steps=(*self.finished_steps, *open_steps),
            workers=c.workers, num_passes=len(passes), num_prompt_tokens=len(prompt_ids),
            num_prefill_tokens=self.num_prefill,
            num_generated_tokens=self.num_generated, num_computed_tokens=computed,
            seconds=time.perf_counter() - start, pass_seconds=tuple(passes), finished_by=finished_by)

    # -- set-up -----------------------------------------------------------------------------------
    def _prefill(self, prompt_ids: list[int]) -> None:
        """One pass: the prompt + rules, the header segments (each in the context before it), and
        every worker's first step header over its view."""
        fmt, new = self.fmt, self.segments.new
        names = fmt.worker_names(self.config.workers)
        prompt = new("prompt")
        self.step_header, self.pivot, self.own_header = new("step_header"), new("pivot"), new("own_header")
        common = prompt_ids + self._encode(fmt.common(self.config.workers))
        header_ids, pivot_ids, own_ids = (self._encode(t) for t in (fmt.step_header(), fmt.pivot_text(),
                                                                      fmt.own_header_text()))
        self.history = [ViewPart(prompt, len(common))]
        p, h, v = (ViewPart(prompt, len(common)), ViewPart(self.step_header, len(header_ids)),
                   ViewPart(self.pivot, len(pivot_ids)))
        runs = [Run((), prompt, tuple(common)), Run((p,), self.step_header, tuple(header_ids)),
                Run((p, h), self.pivot, tuple(pivot_ids)), Run((p, h, v), self.own_header, tuple(own_ids))]
        self._constants = {self.step_header: len(header_ids), self.pivot: len(pivot_ids),
                           self.own_header: len(own_ids)}
        for i, name in enumerate(names):
            worker = _Worker(i, name, new(f"{name}/1"))
            worker.pending = self._encode(fmt.first_prefix(i, name))
            worker.step_ids = list(worker.pending)
            self.workers.append(worker)
        for w in self.workers:
            runs.append(Run(self._context(w), w.segment, tuple(w.pending)))
        logits = forward_runs(self.vm, self.segments, runs, reference=self.config.reference_attention)
        self.num_prefill += sum(len(r.token_ids) for r in runs)
        self._first_logits: torch.Tensor | None = logits[4:]
        for w in self.workers:
            w.pending = []

    def _constant(self, segment: Segment) -> ViewPart:
        return ViewPart(segment, self._constants[segment])

    def _context(self, worker: _Worker) -> tuple[ViewPart, ...]:
        """Worker's view before its own segment (others at their lengths before this pass)."""
        parts = [*self.history, self._constant(self.step_header)]
        for other in self.workers:
            if other is not worker and other.segment.length:
                parts += [ViewPart(other.segment, other.segment.length), self._constant(self.pivot)]
        return (*parts, self._constant(self.own_header))

    # -- the loop -----------------------------------------------------------------------------------
    def _pass(self) -> list[int]:
        """One forward over every worker's pending tokens (plus the header of a worker starting a
        step); returns one sampled token per worker."""
        if not self.workers[0].pending and self._first_logits is not None:
            logits, self._first_logits = self._first_logits, None  # the prefill pass sampled already
            return self._sample(logits)
        runs = [Run(self._context(w), w.segment, tuple(w.pending)) for w in self.workers]
        sample_rows = list(range(len(runs)))
        for w in self.workers:
            if w.ends_step:
                runs.append(self._start_step(w))
                sample_rows[w.index] = len(runs) - 1
        logits = forward_runs(self.vm, self.segments, runs, reference=self.config.reference_attention)
        return self._sample(logits[torch.tensor(sample_rows)])

    def _start_step(self, w: _Worker) -> Run:
        """Move `w`'s finished step (its closing token is written in this pass) into the history and
        open its next step: the returned run writes the new header over the updated view."""
        old = w.segment
        length = old.length + len(w.pending)
        self.history.append(ViewPart(old, length))
        self.finished_steps.append(HogwildStep(w.name, w.step, self.tok.decode(w.step_ids), True))
        w.step += 1
        w.segment = self.segments.new(f"{w.name}/{w.step}")
        collab = self.config.collab_every is not None and self.since_check >= self.config.collab_every
        if collab:
            self.since_check = 0
        header = self._encode(self.fmt.step_prefix(w.name, w.step, collab))
        w.step_ids, w.ends_step = list(header), False
        self.num_prefill += len(header)
        return Run(self._context(w), w.segment, tuple(header))

    def _sample(self, logits: torch.Tensor) -> list[int]:
        params = self.config.params
        rows = [SamplingRow(params=params, prompt_token_ids=(), output_token_ids=w.generated, generator=None,
                            suppress_token_ids=self.forbidden) for w in self.workers]
        return self.sampler(logits, rows).token_ids

    def _advance(self, tokens: list[int]) -> tuple[str, str] | None:
        """Record each worker's new token; (answer, step text) when a finished step answers."""
        found = None
        for w, token in zip(self.workers, tokens):
            self.num_generated += 1
            self.since_check += 1
            w.generated.append(token)
            w.step_ids.append(token)
            w.pending = [token]
            text = self.tok.decode(w.step_ids)
            if self.fmt.ends_step(text, self.tok.decode([token])):
                w.ends_step = True
                answer = self.fmt.answer(text)
                if answer is not None and found is None:
                    found = (answer, text)
        return found

    def _finish(self) -> str:
        """Greedy s1-style finisher over every worker's work: history, then each unfinished step."""
        parts = [*self.history, self._constant(self.step_header)]
        for w in self.workers:
            if w.segment.length:
                parts += [ViewPart(w.segment, w.segment.length), self._constant(self.pivot)]
        segment = self.segments.new("finisher")
        ids = self._encode(self.fmt.finisher_suffix)
        self.num_prefill += len(ids)
        out: list[int] = []
        context = tuple(parts)
        eos = set(self.tok.eos_token_ids)
        while len(out) < self.config.finisher_max_tokens:
            logits = forward_runs(self.vm, self.segments, [Run(context, segment, tuple(ids))],
                                  reference=self.config.reference_attention)
            token = int(logits[0].argmax())
            self.num_generated += 1
            if token in eos:
                break
            out.append(token)
            ids = [token]
            if "}" in self.tok.decode(out):
                break
        return self.tok.decode(out)
