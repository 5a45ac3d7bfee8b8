"""A synthetic policy behind the real engine: a torch-free `ModelRunner` whose samples are drawn
from known distributions, so strategy statistics can be checked against closed forms.

Text is split into word-level tokens (`\\n`, or optional spaces + non-space run), interned into a
fixed-size vocabulary. At each sampling point the runner asks a `SyntheticPolicy` for the next chunk
of text given the whole decoded context (prompt and everything generated, forks included), then
emits it token by token; `None` means EOS. Randomness is a per-request stream fixed by
(request id, seed, context length), so runs are reproducible and forks draw independently.
"""

from __future__ import annotations

import math
import random
import re
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from mixserve.config import CacheConfig, EngineConfig, SchedulerConfig
from mixserve.engine.engine import Engine, ModelInfo, RunnerOutput
from mixserve.engine.scheduler import SchedulerOutput
from mixserve.outputs import Logprob
from mixserve.scaling.tasks.base import Problem
from mixserve.scaling.tasks.countdown import combine, replay
from mixserve.scaling.tracker import derive_seed

EOS = 0
VOCAB = 1 << 16
_PIECE = re.compile(r"\n| *[^\s]+| +")


class WordTokenizer:
    """Interns word pieces; decode(encode(text)) == text for text without tabs or '\\r'."""

    chat_template_is_default = True
    eos_token_ids = [EOS]

    def __init__(self) -> None:
        self.pieces: list[str] = [""]
        self.ids: dict[str, int] = {}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        out = []
        for piece in _PIECE.findall(text):
            if piece not in self.ids:
                if len(self.pieces) >= VOCAB:
                    raise ValueError("synthetic vocabulary is full")
                self.ids[piece] = len(self.pieces)
                self.pieces.append(piece)
            out.append(self.ids[piece])
        return out

    def decode(self, token_ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return "".join(self.pieces[t] for t in token_ids)


@dataclass(frozen=True)
class Chunk:
    text: str
    logprob: float = -0.1
    """Log-probability reported for every token of the chunk (the runner adds one alternative)."""


class SyntheticPolicy(Protocol):
    def chunk(self, context: str, rng: random.Random) -> Chunk | None: ...


class SyntheticRunner:
    def __init__(self, policy: SyntheticPolicy, tokenizer: WordTokenizer) -> None:
        self.policy = policy
        self.tokenizer = tokenizer
        self.queues: dict[str, deque[int]] = {}
        self.logprob: dict[str, float] = {}
        self.num_computed = 0

    def execute(self, out: SchedulerOutput) -> RunnerOutput:
        result = RunnerOutput()
        for rid in out.finished_request_ids:
            self.queues.pop(rid, None)
            self.logprob.pop(rid, None)
        for seq in out.seqs:
            self.num_computed += seq.num_tokens
            if not seq.sample:
                continue
            rid, params = seq.request_id, seq.spec.params
            queue = self.queues.get(rid)
            if not queue:
                context = self.tokenizer.decode(list(seq.context))
                rng = random.Random(derive_seed(params.seed or 0, f"{rid}:{len(seq.context)}"))
                chunk = self.policy.chunk(context, rng)
                queue = deque(self.tokenizer.encode(chunk.text) if chunk else [EOS])
                self.queues[rid] = queue
                self.logprob[rid] = chunk.logprob if chunk else -0.01
            token = queue.popleft()
            result.sampled[rid] = token
            if params.logprobs is not None:
                lp = self.logprob[rid]
                rest = math.log(max(1 - math.exp(lp), 1e-9))
                result.logprobs[rid] = {token: Logprob(lp, 1), (token + 1) % VOCAB: Logprob(rest, 2)}
        return result


def make_synthetic_engine(policy: SyntheticPolicy, tokenizer: WordTokenizer | None = None,
                          num_blocks: int = 4096, block_size: int = 16, max_num_seqs: int = 1024,
                          max_num_batched_tokens: int = 8192) -> Engine:
    tokenizer = tokenizer or WordTokenizer()
    config = EngineConfig(cache=CacheConfig(block_size=block_size, num_blocks=num_blocks),
                          scheduler=SchedulerConfig(max_num_batched_tokens=max_num_batched_tokens,
                                                    max_num_seqs=max_num_seqs))
    info = ModelInfo(max_model_len=1024, vocab_size=VOCAB, eos_token_ids=(EOS,), num_blocks=num_blocks)
    return Engine(config, SyntheticRunner(policy, tokenizer), tokenizer, info)


@dataclass(frozen=True)
class AnswerSpec:
    """One problem: the correct answer with probability p, else a wrong one by `wrong` weights."""

    correct: str
    p: float
    wrong: tuple[tuple[str, float], ...] = (("wrong", 1.0),)
    filler: tuple[tuple[str, int], ...] = ()
    """Words of padding before an answer (answer -> count): controls which samples finish first."""
    logprob: tuple[tuple[str, float], ...] = ()
    """Reported token logprob per answer (confidence); default -0.1."""


class AnswerPolicy:
    """Prompts look like "Q<id>: ..."; the completion is "[filler] Answer: <x>" then EOS."""

    def __init__(self, specs: dict[str, AnswerSpec]) -> None:
        self.specs = specs

    def chunk(self, context: str, rng: random.Random) -> Chunk | None:
        head, _, generated = context.partition("\n")
        if "Answer:" in generated:
            return None
        spec = self.specs[head.split(":", 1)[0][1:]]
        if rng.random() < spec.p:
            answer = spec.correct
        else:
            answers, weights = zip(*spec.wrong, strict=True)
            answer = rng.choices(answers, weights=weights)[0]
        pad = " ." * dict(spec.filler).get(answer, 0)
        return Chunk(f"{pad} Answer: {answer}", dict(spec.logprob).get(answer, -0.1))


class CountdownStepsPolicy:
    """Plays uniformly random legal countdown steps ("a op b = c\\n") until the target appears or one
    number is left: sampling alone rarely solves hard instances, an exact PRM guides search."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = {p.question.split("\n", 1)[0]: p for p in problems}

    def chunk(self, context: str, rng: random.Random) -> Chunk | None:
        question, _, generated = context.partition("\n")
        problem = self.problems[question]
        pool, valid, reached = replay(problem, generated)
        if reached or not valid or len(pool) < 2:
            return None
        a, b = sorted(rng.sample(list(pool), 2), reverse=True)
        op, c = rng.choice(combine(a, b))
        return Chunk(f"{a} {op} {b} = {c}\n")
