"""Constraint state per request and the token masks of one step, with llguidance.

Invariant: a request's `ConstraintState` has consumed exactly the request's generated tokens. The runner
never hears about forks, preemption or retries, so the state is *synced* from the `output_token_ids`
each scheduled row carries: missing tokens are consumed, extra ones rolled back. That makes it correct
under chunked prefill (no row samples before the last chunk), preemption (the request keeps its id and
output), prefix caching (KV reuse never changes the output) and `fork` (a sample of `n > 1` or a strategy
branch is a new id: its state is a deep copy of the compiled grammar's start state, replayed over its
own output, so every sample owns an independent state). `free` drops states of finished requests.

Why llguidance (measured in `benchmarks/bench_structured.py`, see BENCHMARKS.md): masks cost well under a
millisecond on both our vocabularies (49k, 262k) like xgrammar's, but it needs no schema compile up front
(xgrammar compiles per schema before the first token), reads the tokenizer's own `tokenizer.json` (GGUF-
derived and HF alike, no `transformers` wrapper), takes Lark and GBNF natively, and is a single small
wheel (xgrammar pulls triton and transformers).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import llguidance
import numpy as np
import torch

from mixserve.structured.spec import StructuredOutput

MAX_CACHED_GRAMMARS = 64
"""Compiled start states kept (LRU) for reuse by later requests with the same constraint."""


class ConstraintState:
    """One request's position in its grammar: an llguidance matcher plus the tokens it consumed."""

    def __init__(self, matcher: llguidance.LLMatcher) -> None:
        self.matcher = matcher
        self.num_consumed = 0

    def sync(self, output_token_ids: Sequence[int]) -> str | None:
        """Make the state match `output_token_ids` (rollback or consume); an error message if it can't."""
        if self.num_consumed > len(output_token_ids):
            self.matcher.rollback(self.num_consumed - len(output_token_ids))
            self.num_consumed = len(output_token_ids)
        missing = list(output_token_ids[self.num_consumed:])
        if missing and not self.matcher.consume_tokens(missing):
            return f"generated tokens do not match the constraint: {self.matcher.get_error()}"
        self.num_consumed = len(output_token_ids)
        return self.error()

    def consume(self, token_id: int) -> str | None:
        """Advance by one sampled token; an error message when the grammar rejects it."""
        if not self.matcher.consume_token(token_id):
            return f"token {token_id} violates the constraint: {self.matcher.get_error()}"
        self.num_consumed += 1
        return None

    def error(self) -> str | None:
        return f"constraint failed: {self.matcher.get_error()}" if self.matcher.is_error() else None

    @property
    def is_accepting(self) -> bool:
        """The output so far is a complete match (EOS is allowed)."""
        return bool(self.matcher.is_accepting())

    def fork(self) -> ConstraintState:
        """An independent copy at the same position."""
        child = ConstraintState(self.matcher.deep_copy())
        child.num_consumed = self.num_consumed
        return child


@dataclass
class StepMasks:
    """Allowed tokens of the constrained rows of one step."""

    allowed: dict[str, torch.Tensor] = field(default_factory=dict)
    """request id -> bool `[vocab_size]` (True: may be sampled)."""
    errors: dict[str, str] = field(default_factory=dict)
    """request id -> why its constraint cannot go on (the row must not be sampled)."""


class Constraints:
    """Every live request's `ConstraintState` in one runner, and the step's masks.

    `tokenizer_json` gives the model's `tokenizers` JSON (HF folder or GGUF-derived; called on first
    use, so a server that never sees a constraint never builds the grammar tokenizer), `vocab_size` the
    width of the logits, `eos_token_ids` the ids allowed once the grammar is complete.
    """

    def __init__(self, tokenizer_json: Callable[[], str], vocab_size: int, eos_token_ids: Sequence[int]) -> None:
        self._tokenizer_json = tokenizer_json
        self.vocab_size = vocab_size
        self.eos_token_ids = list(eos_token_ids)
        self._tokenizer: llguidance.LLTokenizer | None = None
        self._starts: OrderedDict[str, llguidance.LLMatcher] = OrderedDict()
        self.states: dict[str, ConstraintState] = {}
        self._bitmask = torch.empty(0, dtype=torch.int32)

    @property
    def tokenizer(self) -> llguidance.LLTokenizer:
        """Built on first use (about 0.3 s for 49k tokens, 5 s for 262k) and kept."""
        if self._tokenizer is None:
            self._tokenizer = llguidance.LLTokenizer(self._tokenizer_json(), n_vocab=self.vocab_size,
                                                     eos_token=self.eos_token_ids)
        return self._tokenizer

    def new_state(self, spec: StructuredOutput) -> ConstraintState:
        """A state at the start of `spec`'s grammar (compiled once per distinct grammar)."""
        start = self._starts.get(spec.compiled)
        if start is None:
            start = llguidance.LLMatcher(self.tokenizer, spec.compiled, log_level=0)
            self._starts[spec.compiled] = start
            while len(self._starts) > MAX_CACHED_GRAMMARS:
                self._starts.popitem(last=False)
        else:
            self._starts.move_to_end(spec.compiled)
        return ConstraintState(start.deep_copy())

    def masks(self, rows: Sequence[tuple[str, StructuredOutput, Sequence[int]]]) -> StepMasks:
        """Sync each (request id, constraint, output token ids) and compute its allowed tokens."""
        out = StepMasks()
        live: list[tuple[str, ConstraintState]] = []
        for request_id, spec, output_ids in rows:
            state = self.states.get(request_id)
            if state is None:
                state = self.states[request_id] = self.new_state(spec)
            error = state.error() if state.matcher.is_error() else state.sync(output_ids)
            if error is not None:
                out.errors[request_id] = error
            else:
                live.append((request_id, state))
        if not live:
            return out
        words = (self.vocab_size + 31) // 32
        if self._bitmask.numel() < len(live) * words:
            self._bitmask = torch.empty(len(live) * words, dtype=torch.int32)
        bitmask = self._bitmask[:len(live) * words].view(len(live), words)  # [num_rows, words]
        # on this thread, row by row: a mask takes microseconds, and handing rows to llguidance's
        # thread pool costs a context switch that, beside torch's threads on few cores, is milliseconds
        for i, (_, state) in enumerate(live):
            state.matcher.unsafe_compute_mask_ptr(bitmask[i].data_ptr(), words * 4)
        bits = np.unpackbits(bitmask.numpy().view(np.uint8), axis=1, bitorder="little")
        allowed = torch.from_numpy(bits[:, :self.vocab_size]).view(torch.bool)  # [num_rows, vocab_size]
        for i, (request_id, state) in enumerate(live):
            if state.matcher.is_error():
                out.errors[request_id] = state.error() or "constraint failed"
            elif not bool(allowed[i].any()):
                out.errors[request_id] = "the constraint allows no token here"
            else:
                out.allowed[request_id] = allowed[i]
        return out

    def accept(self, request_id: str, token_id: int) -> str | None:
        """Advance a request's state by its sampled token; an error message if the grammar rejects it."""
        return self.states[request_id].consume(token_id)

    def free(self, request_ids: Sequence[str]) -> None:
        """Drop the states of finished (or aborted, or released) requests."""
        for request_id in request_ids:
            self.states.pop(request_id, None)

    def __len__(self) -> int:
        return len(self.states)
