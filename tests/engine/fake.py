"""A torch-free stand-in for the model runner that checks the KV bookkeeping it is given.

It keeps a simulated cache `slot -> (token, position)`. Each step it writes the new tokens at their
slots, then reads every sequence's context back through its block table and checks that each slot
holds the right token at the right position (so a wrong block table, a missed copy-on-write or a bad
prefix hit fails loudly). The "model" is a hash of the context read from the cache.
"""

from __future__ import annotations

import random

from mixserve.config import CacheConfig, EngineConfig, SchedulerConfig
from mixserve.engine.engine import Engine, ModelInfo, RunnerOutput
from mixserve.engine.scheduler import SchedulerOutput

VOCAB = 50
EOS = 0


class FakeTokenizer:
    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(f"<{t}>" if t < 10 else chr(ord("a") + t % 26) for t in token_ids
                       if not (skip_special_tokens and t == EOS))


class FakeRunner:
    def __init__(self, block_size: int, fail_on_token: int | None = None) -> None:
        self.block_size = block_size
        self.cache: dict[int, tuple[int, int]] = {}
        self.fail_on_token = fail_on_token
        self.num_computed = 0

    def execute(self, out: SchedulerOutput) -> RunnerOutput:
        bs = self.block_size
        for copy in out.copies:
            for i in range(bs):
                if copy.src * bs + i in self.cache:
                    self.cache[copy.dst * bs + i] = self.cache[copy.src * bs + i]
        result = RunnerOutput()
        for seq in out.seqs:
            if self.fail_on_token is not None and self.fail_on_token in seq.token_ids:
                raise RuntimeError("poisoned token")
            for i, token in enumerate(seq.token_ids):
                p = seq.start_pos + i
                self.cache[seq.block_ids[p // bs] * bs + p % bs] = (token, p)
            self.num_computed += seq.num_tokens
        for seq in out.seqs:
            end = seq.start_pos + seq.num_tokens
            context = []
            for p in range(end):
                token, pos = self.cache[seq.block_ids[p // bs] * bs + p % bs]
                assert pos == p and token == seq.context[p], \
                    f"{seq.request_id}: slot for position {p} holds {(token, pos)}"
                context.append(token)
            if seq.sample:
                params = seq.spec.params
                if params.temperature == 0:
                    result.sampled[seq.request_id] = next_token(context)
                else:
                    rng = random.Random(hash((tuple(context), seq.spec.seed)))
                    result.sampled[seq.request_id] = rng.randrange(1, VOCAB)
        return result


def next_token(context: list[int]) -> int:
    h = 0
    for t in context:
        h = (h * 31 + t) % 1_000_003
    return 1 + h % (VOCAB - 1)


def make_engine(num_blocks: int = 64, block_size: int = 4, budget: int = 32, max_num_seqs: int = 16,
                prefix: bool = True, chunked: bool = True, max_model_len: int = 128,
                runner: FakeRunner | None = None) -> Engine:
    config = EngineConfig(cache=CacheConfig(block_size=block_size, num_blocks=num_blocks,
                                            enable_prefix_caching=prefix),
                          scheduler=SchedulerConfig(max_num_batched_tokens=budget,
                                                    max_num_seqs=max_num_seqs,
                                                    enable_chunked_prefill=chunked))
    info = ModelInfo(max_model_len=max_model_len, vocab_size=VOCAB, eos_token_ids=(EOS,),
                     num_blocks=num_blocks)
    return Engine(config, runner or FakeRunner(block_size), FakeTokenizer(), info)


def run_all(engine: Engine) -> dict[str, dict[int, list[int]]]:
    """Step until idle; request id -> sample index -> generated token ids."""
    out: dict[str, dict[int, list[int]]] = {}
    for _ in range(10_000):
        if not engine.has_unfinished():
            break
        for delta in engine.step():
            for o in delta.outputs:
                out.setdefault(delta.request_id, {}).setdefault(o.index, []).extend(o.token_ids)
    assert not engine.has_unfinished()
    return out
