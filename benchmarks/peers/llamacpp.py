"""llama.cpp peer driver (llama-cpp-python): `.peers/llamacpp/bin/python benchmarks/peers/llamacpp.py --model X.gguf`.

Single stream: `Llama.generate` (a token generator that never stops by itself, so EOS is ignored), state
reset before each run so TTFT includes the full prefill; temperature sampling with top-k/top-p/min-p off.
Aggregate, two ways:
- sequential: n samples one after another through `Llama.generate`, reseeded per sample; the prompt's KV
  is reused across samples where llama.cpp can (prefix match), as a llama.cpp user would get;
- batched: the low-level API, as llama.cpp's `batched` example does: the prompt is decoded once into
  sequence 0, copied to sequences 1..n-1 (`llama_memory_seq_cp`, unified KV), then every step decodes one
  token of each of the n sequences in one `llama_decode`, each sampled by a temp+dist sampler chain.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c  # noqa: E402


def main() -> int:
    args = c.parse_args(__doc__ or "llama.cpp driver")
    import llama_cpp
    from llama_cpp import Llama

    budget = c.Budget(args.max_run_s, args.max_config_s)
    result = c.base_result("llama.cpp", f"llama-cpp-python {llama_cpp.__version__}", args)
    t0 = time.perf_counter()
    llm = Llama(model_path=args.model, n_ctx=max(512, args.max_tokens + 512), n_threads=args.threads,
                n_threads_batch=args.threads, seed=args.seed, verbose=False)
    result["startup_s"] = time.perf_counter() - t0
    prompt = args.prompt.encode()
    result["prompt_tokens"] = len(llm.tokenize(prompt, add_bos=True))
    sampling = dict(temp=args.temperature, top_k=0, top_p=1.0, min_p=0.0, typical_p=1.0, repeat_penalty=1.0)
    seeds = iter(range(args.seed, args.seed + (1 << 30)))

    def stream(max_tokens: int, fresh: bool) -> tuple[float, list[float]]:
        """One sample; fresh=True drops all cached state first (cold prefill)."""
        if fresh:
            llm.reset()
        llm.set_seed(next(seeds))
        times: list[float] = []
        start = time.perf_counter()
        tokens = llm.tokenize(prompt, add_bos=True)
        for _ in llm.generate(tokens, **sampling):
            times.append(time.perf_counter())
            if len(times) == max_tokens:
                break
        return start, times

    stream(args.warmup_tokens, fresh=True)

    def single() -> dict:
        return c.single_run(*stream(args.max_tokens, fresh=True))

    result["single"] = c.summarize_single(budget.repeat(single, args.repeats), args.repeats)
    c.log(f"single: {result['single']['decode_tok_s']:.1f} tok/s, ttft {result['single']['ttft_s'] * 1e3:.0f} ms")

    def sequential(n: int) -> dict:
        llm.reset()
        start = time.perf_counter()
        num = sum(len(stream(args.max_tokens, fresh=False)[1]) for _ in range(n))
        return c.aggregate_run(n, num, time.perf_counter() - start)

    result["aggregate"] = c.sweep(args.n_list, sequential, args, budget, rate_hint=result["single"]["decode_tok_s"])
    result["aggregate_mode"] = "sequential samples through Llama.generate"

    batched = Batched(llama_cpp, llm, args, result["prompt_tokens"])
    try:
        batched.run(1, args.warmup_tokens)
        result["aggregate_batched"] = c.sweep(args.n_list, lambda n: batched.run(n, args.max_tokens), args, budget,
                                              rate_hint=result["single"]["decode_tok_s"])
        result["aggregate_batched_mode"] = "low-level llama_decode of n sequences per step, prompt KV shared"
    except Exception as exc:
        result["notes"].append(f"batched API failed: {type(exc).__name__}: {exc}")
        c.log(f"batched API failed: {exc}")
    c.emit(result, args)
    return 0


class Batched:
    """n samples of one prompt decoded together through llama.cpp's low-level batch API."""

    def __init__(self, lib, llm, args, num_prompt_tokens: int) -> None:  # noqa: ANN001
        self.lib, self.llm, self.args = lib, llm, args
        self.prompt_ids = llm.tokenize(args.prompt.encode(), add_bos=True)
        self.seed = args.seed

    def run(self, n: int, max_tokens: int) -> dict:
        lib = self.lib
        prompt_len = len(self.prompt_ids)
        params = lib.llama_context_default_params()
        params.n_ctx = prompt_len + n * max_tokens + 64
        params.n_batch = params.n_ubatch = max(prompt_len, n, 32)
        params.n_seq_max = n
        params.n_threads = params.n_threads_batch = self.args.threads
        params.kv_unified = True  # one KV store: seq_cp shares the prompt's cells, no copy
        ctx = lib.llama_init_from_model(self.llm._model.model, params)
        if not ctx:
            raise RuntimeError("llama_init_from_model failed")
        batch = lib.llama_batch_init(params.n_batch, 0, n)
        # The chain Llama.generate builds for these settings (less its no-op penalties): top_k(0) looks
        # redundant but bucket-sorts the candidates, without it dist's softmax std::sorts the whole vocab
        # on every sample (slow at gemma's 262k vocab).
        chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
        self.seed += 1
        for smpl in (lib.llama_sampler_init_top_k(0), lib.llama_sampler_init_typical(1.0, 1),
                     lib.llama_sampler_init_top_p(1.0, 1), lib.llama_sampler_init_min_p(0.0, 1),
                     lib.llama_sampler_init_temp(self.args.temperature), lib.llama_sampler_init_dist(self.seed)):
            lib.llama_sampler_chain_add(chain, smpl)
        try:
            start = time.perf_counter()
            num = self._generate(ctx, batch, chain, n, max_tokens)
            return c.aggregate_run(n, num, time.perf_counter() - start)
        finally:
            lib.llama_sampler_free(chain)
            lib.llama_batch_free(batch)
            lib.llama_free(ctx)

    def _generate(self, ctx, batch, chain, n: int, max_tokens: int) -> int:  # noqa: ANN001
        lib = self.lib
        prompt_len = len(self.prompt_ids)
        self._fill(batch, [(t, i, 0, i == prompt_len - 1) for i, t in enumerate(self.prompt_ids)])
        if lib.llama_decode(ctx, batch) != 0:
            raise RuntimeError("llama_decode failed on the prompt")
        mem = lib.llama_get_memory(ctx)
        for s in range(1, n):
            lib.llama_memory_seq_cp(mem, 0, s, -1, -1)
        # All n first tokens come from the prompt's last logits (batch index prompt_len - 1).
        tokens = [lib.llama_sampler_sample(chain, ctx, prompt_len - 1) for _ in range(n)]
        num = n
        for step in range(1, max_tokens):
            self._fill(batch, [(tokens[s], prompt_len + step - 1, s, True) for s in range(n)])
            if lib.llama_decode(ctx, batch) != 0:
                raise RuntimeError(f"llama_decode failed at step {step} (n={n})")
            tokens = [lib.llama_sampler_sample(chain, ctx, s) for s in range(n)]
            num += n
        return num

    @staticmethod
    def _fill(batch, entries: list[tuple[int, int, int, bool]]) -> None:  # noqa: ANN001
        """entries: (token, pos, seq_id, wants_logits)."""
        for i, (tok, pos, seq, logits) in enumerate(entries):
            batch.token[i] = tok
            batch.pos[i] = pos
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = seq
            batch.logits[i] = logits
        batch.n_tokens = len(entries)


if __name__ == "__main__":
    sys.exit(main())
