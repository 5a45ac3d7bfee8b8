"""LLM: the offline Python API (generate, chat, stream) over one Engine."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from tqdm import tqdm

from mixserve.builder import LoadedModel, load_model, wire_engine
from mixserve.config import CacheConfig, EngineConfig, SchedulerConfig
from mixserve.engine.dispatcher import Dispatcher, Sink, run_until
from mixserve.outputs import CompletionOutput, RequestOutput
from mixserve.sampling_params import SamplingParams

Prompt = str | list[int]
Message = dict[str, Any]


class LLM:
    """Load a model and generate.

    >>> llm = LLM("smollm2-135m")
    >>> out = llm.generate("The capital of France is", SamplingParams(max_tokens=8, temperature=0))
    >>> out[0].outputs[0].text
    """

    def __init__(self, model: str | None = None, *, seed: int = 0, cache_dir: str | Path | None = None,
                 config: EngineConfig | None = None, **options: Any) -> None:
        """`model`: a known name, an HF folder or a .gguf file (default: `ModelConfig.model`).
        `options`: any engine option by its flat name (`EngineConfig.flat_fields()`: dtype, weight_format,
        max_model_len, num_threads, block_size, num_blocks, kv_cache_bytes, enable_prefix_caching,
        max_num_batched_tokens, max_num_seqs, enable_chunked_prefill, expert_memory_budget, ...),
        applied over `config` (default: `EngineConfig()`); each is documented on its config field."""
        config = config or EngineConfig()
        if model is not None:
            options["model"] = model
        config = config.with_options(**options)
        self._setup(config, load_model(config, cache_dir=cache_dir), seed)

    def _setup(self, config: EngineConfig, loaded: LoadedModel, seed: int) -> None:
        built = wire_engine(loaded, config, seed=seed)
        self.loaded = loaded
        self.config = config
        self.engine = built.engine
        self.tokenizer = built.tokenizer
        self.checkpoint = built.checkpoint
        self.model = built.model
        self.dispatcher = Dispatcher(self.engine)
        """Routes every output of this LLM's engine to its caller (generate, stream, scale)."""

    def with_config(self, *, cache: CacheConfig | None = None, scheduler: SchedulerConfig | None = None,
                    max_model_len: int | None = None, seed: int = 0) -> LLM:
        """A new LLM with its own engine and KV cache over the same loaded weights."""
        model = self.config.model if max_model_len is None else replace(self.config.model,
                                                                         max_model_len=max_model_len)
        config = replace(self.config, model=model, cache=cache or self.config.cache,
                         scheduler=scheduler or self.config.scheduler)
        other = LLM.__new__(LLM)
        other._setup(config, self.loaded, seed)
        return other

    def cost(self) -> Any:
        """The model's `mixserve.scaling.ModelCost` (FLOPs estimates for compute accounting)."""
        from mixserve.scaling import ModelCost

        return ModelCost.from_model(self.checkpoint.hf_config, self.model)

    def expert_stats(self) -> dict[str, float]:
        """MoE expert-cache counters of this model (shared by `with_config` copies): hit rate, bytes
        read per token, prefetch recall, stall seconds, ...; empty when experts are all resident."""
        return self.loaded.expert_stats()

    # -- prompts ------------------------------------------------------------------------------
    def encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        return list(prompt)

    def chat_prompt(self, messages: list[Message], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)

    def _add(self, prompt: Prompt, params: SamplingParams, sink: Sink) -> str:
        request_id = self.dispatcher.new_id("llm")
        text = prompt if isinstance(prompt, str) else None
        self.dispatcher.add(request_id, self.encode(prompt), params, sink, prompt=text)
        return request_id

    # -- generation ---------------------------------------------------------------------------
    def generate(self, prompts: Prompt | Sequence[Prompt],
                 params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """Run every prompt to completion, batched; outputs in prompt order. `params` is one
        `SamplingParams` for all prompts or one per prompt (as in vLLM)."""
        batch = [prompts] if isinstance(prompts, str) or _is_token_list(prompts) else list(prompts)
        per_prompt = list(params) if isinstance(params, Sequence) else [params or SamplingParams()] * len(batch)
        if len(per_prompt) != len(batch):
            raise ValueError(f"params: got {len(per_prompt)} SamplingParams for {len(batch)} prompts")
        bar = tqdm(total=len(batch), desc="generate", disable=not use_tqdm)
        collector = _Collector(bar)
        ids: list[str] = []
        try:
            for p, sp in zip(batch, per_prompt):
                ids.append(self._add(p, sp, collector))  # type: ignore[arg-type]
            run_until(self.dispatcher, lambda: collector.num_finished == len(ids), "generate")
        finally:
            for rid in ids:
                self.dispatcher.abort(rid)  # a no-op for finished requests; frees the rest on error
            bar.close()
        return [collector.finals[rid] for rid in ids]

    def chat(self, messages: list[Message] | list[list[Message]], params: SamplingParams | None = None,
             use_tqdm: bool = False) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation or a list of them, then generate."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.chat_prompt(c) for c in conversations]  # type: ignore[arg-type]
        return self.generate(prompts, params, use_tqdm=use_tqdm)

    def scale(self, prompt: Any = None, strategy: str = "majority", budget: int = 8, verifier: Any = None,
              params: SamplingParams | None = None, *, messages: list[Message] | None = None,
              extractor: Any = None, on_done: Any = None, **options: Any) -> Any:
        """Inference-time scaling inside this engine; returns a `mixserve.scaling.ScaleResult`
        (selected answer, every candidate, compute accounting), or a list of them for a batch.

        `prompt`: a string, token ids, chat `messages` (the chat template is applied, as in `chat`),
        a `ScaleProblem(prompt, data)` / `{"prompt"|"messages": ..., "data": ...}`, or a list of any of
        these: a batch, run concurrently in this engine, one result per problem in order. `messages=`
        is the same as passing the conversation as `prompt`.
        `strategy`/`verifier` names are in `mixserve.scaling.STRATEGIES`/`VERIFIERS`; a verifier may
        also be a function `f(text) -> float` or a problem-aware `ProblemVerifier` (e.g.
        `ScoreAnswerVerifier(score_answer)`, which sees each problem's `data`). `extractor`: a name in
        `mixserve.scaling.EXTRACTORS` or a function `text -> answer`. `on_done(i, result)` is called as
        each problem finishes. `options` go to `make_strategies` (config=ScaleConfig(...), strategy_id=...).

        >>> llm.scale("What is 17 * 23?", strategy="bom", budget=16, verifier="judge").answer
        >>> llm.scale([{"role": "user", "content": "What is 17 * 23?"}]).answer
        >>> [r.answer for r in llm.scale(["1 + 1 =", "2 + 2 ="], strategy="compute_optimal")]
        """
        from mixserve.scaling.api import scale

        if messages is not None:
            if prompt is not None:
                raise ValueError("LLM.scale takes a prompt or messages, not both")
            prompt = messages
        if prompt is None:
            raise ValueError("LLM.scale needs a prompt, messages or a list of problems")
        strategy_id = options.pop("strategy_id", None) or self.dispatcher.new_id("scale")
        options.setdefault("cost", self.cost())
        return scale(self.dispatcher, prompt, strategy, encode=self.encode, chat_prompt=self.chat_prompt,
                     strategy_id=strategy_id, on_done=on_done, budget=budget, params=params, verifier=verifier,
                     tokenizer=self.tokenizer, extract=extractor, **options)

    def hogwild(self, prompt: Prompt | list[Message], workers: int = 2, max_tokens: int = 256,
                params: SamplingParams | None = None, **options: Any) -> Any:
        """Hogwild! inference: `workers` workers of this model solve `prompt` together over one shared
        KV cache (mixserve/hogwild/); returns a `mixserve.hogwild.HogwildResult` (answer, transcript,
        tokens and timings). `max_tokens`: tokens per worker; `options`: other `HogwildConfig` fields.
        A string prompt is one user message (chat template applied).

        >>> llm.hogwild("What is 17 * 23?", workers=2, max_tokens=128).answer
        """
        from mixserve.hogwild.api import hogwild, prompt_ids_for

        if params is not None:
            options["params"] = params
        return hogwild(self.engine, self.tokenizer, prompt_ids_for(self.tokenizer, prompt),
                       workers=workers, max_tokens=max_tokens, **options)

    def stream(self, prompt: Prompt, params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        """Yield deltas (new tokens and text per sample) of one request as they are produced."""
        queue = _Queue()
        request_id = self._add(prompt, params or SamplingParams(), queue)
        try:
            while True:
                while queue.items:
                    delta = queue.items.popleft()
                    yield delta
                    if delta.finished:
                        return
                run_until(self.dispatcher, lambda: bool(queue.items), "stream")
        finally:
            self.dispatcher.abort(request_id)


class _Collector:
    """Sink of `generate`: folds each request's deltas into its final output."""

    def __init__(self, bar: Any) -> None:
        self.finals: dict[str, RequestOutput] = {}
        self.num_finished = 0
        self.bar = bar

    def put(self, out: RequestOutput) -> None:
        self.finals[out.request_id] = _merge(self.finals.get(out.request_id) or _accumulator(out), out)
        if out.finished:
            self.num_finished += 1
            self.bar.update(1)

    def fail(self, error: BaseException) -> None:
        raise error


class _Queue:
    """Sink of `stream`: deltas wait here until the generator hands them out."""

    def __init__(self) -> None:
        self.items: deque[RequestOutput] = deque()

    def put(self, out: RequestOutput) -> None:
        self.items.append(out)

    def fail(self, error: BaseException) -> None:
        raise error


def _is_token_list(value: object) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(t, int) for t in value)


def _accumulator(first: RequestOutput) -> RequestOutput:
    return RequestOutput(request_id=first.request_id, prompt=first.prompt,
                         prompt_token_ids=first.prompt_token_ids, outputs=[])


def _merge(acc: RequestOutput, delta: RequestOutput) -> RequestOutput:
    """Fold a delta into the accumulated output (samples kept sorted by index)."""
    by_index = {o.index: o for o in acc.outputs}
    for part in delta.outputs:
        cur = by_index.setdefault(part.index, CompletionOutput(index=part.index, text="", token_ids=[],
                                                               logprobs=[] if part.logprobs is not None
                                                               else None))
        cur.text += part.text
        cur.token_ids.extend(part.token_ids)
        if part.logprobs is not None and cur.logprobs is not None:
            cur.logprobs.extend(part.logprobs)
        cur.finish_reason = part.finish_reason
        cur.stop_reason = part.stop_reason
        cur.error = part.error
    acc.outputs = [by_index[i] for i in sorted(by_index)]
    acc.finished = delta.finished
    acc.prompt_logprobs = delta.prompt_logprobs or acc.prompt_logprobs
    acc.num_cached_tokens = max(acc.num_cached_tokens, delta.num_cached_tokens)
    acc.metrics = delta.metrics  # cumulative: the latest holds everything
    return acc
