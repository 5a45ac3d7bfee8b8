"""transformers peer driver: run with `.peers/hf/bin/python benchmarks/peers/hf.py --model HF_DIR ...`.

Single stream: `generate` with a streamer that timestamps every new token (the first `put` is the prompt).
Aggregate: one `generate(num_return_sequences=n)` call, i.e. the prompt repeated n times in one batch.
Every sample is exactly max_tokens long (`min_new_tokens` = `max_new_tokens` suppresses EOS).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c  # noqa: E402


def main() -> int:
    args = c.parse_args(__doc__ or "transformers driver")
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.generation.streamers import BaseStreamer

    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    dtype = getattr(torch, args.dtype or "float32")
    budget = c.Budget(args.max_run_s, args.max_config_s)
    result = c.base_result("transformers", transformers.__version__, args)
    result["dtype"] = str(dtype).removeprefix("torch.")
    result["torch"] = torch.__version__

    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).eval()
    result["startup_s"] = time.perf_counter() - t0
    result["prompt_tokens"] = len(tok(args.prompt)["input_ids"])
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    class TokenTimes(BaseStreamer):
        def __init__(self) -> None:
            self.times: list[float] = []

        def put(self, value) -> None:  # noqa: ANN001 (transformers' interface)
            self.times.append(time.perf_counter())

        def end(self) -> None:
            pass

    def generate(max_tokens: int, n: int = 1, streamer=None):  # noqa: ANN001, ANN202
        ids = tok(args.prompt, return_tensors="pt")
        with torch.inference_mode():
            return model.generate(
                **ids, do_sample=args.temperature > 0, temperature=args.temperature or None, top_k=0, top_p=1.0,
                max_new_tokens=max_tokens, min_new_tokens=max_tokens, num_return_sequences=n,
                pad_token_id=pad_id, streamer=streamer,
            ), ids["input_ids"].shape[1]

    torch.manual_seed(args.seed)
    generate(args.warmup_tokens, n=1)
    generate(args.warmup_tokens, n=2)

    def single() -> dict:
        streamer = TokenTimes()
        start = time.perf_counter()
        generate(args.max_tokens, streamer=streamer)
        return c.single_run(start, streamer.times[1:])  # times[0]: the prompt being handed in

    result["single"] = c.summarize_single(budget.repeat(single, args.repeats), args.repeats)
    c.log(f"single: {result['single']['decode_tok_s']:.1f} tok/s, ttft {result['single']['ttft_s'] * 1e3:.0f} ms")

    def run_n(n: int) -> dict:
        start = time.perf_counter()
        out, prompt_len = generate(args.max_tokens, n=n)
        wall = time.perf_counter() - start
        return c.aggregate_run(n, (out.shape[1] - prompt_len) * out.shape[0], wall)

    result["aggregate"] = c.sweep(args.n_list, run_n, args, budget, rate_hint=result["single"]["decode_tok_s"])
    result["aggregate_mode"] = "num_return_sequences=n (one batched generate)"
    c.emit(result, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
