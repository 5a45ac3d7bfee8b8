"""LLM: the offline Python API (generate, chat, stream) over one Engine."""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from mixserve.builder import LoadedModel, load_model, wire_engine
from mixserve.config import (
    CacheConfig,
    Dtype,
    EngineConfig,
    ExpertConfig,
    ModelConfig,
    SchedulerConfig,
    WeightFormat,
)
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

    def __init__(self, model: str = "smollm2-135m", *, dtype: Dtype = "float32",
                 weight_format: WeightFormat = "auto", max_model_len: int | None = None,
                 num_threads: int | None = None, block_size: int = 16, num_blocks: int | None = None,
                 kv_cache_bytes: int = 1 << 30, enable_prefix_caching: bool = True,
                 max_num_batched_tokens: int = 512, max_num_seqs: int = 128,
                 enable_chunked_prefill: bool = True, expert_memory_budget: str | None = None,
                 seed: int = 0, cache_dir: str | Path | None = None,
                 config: EngineConfig | None = None) -> None:
        if config is None:
            config = EngineConfig(
                model=ModelConfig(model=model, dtype=dtype, weight_format=weight_format,
                                  max_model_len=max_model_len, num_threads=num_threads),
                cache=CacheConfig(block_size=block_size, num_blocks=num_blocks,
                                  kv_cache_bytes=kv_cache_bytes,
                                  enable_prefix_caching=enable_prefix_caching),
                scheduler=SchedulerConfig(max_num_batched_tokens=max_num_batched_tokens,
                                          max_num_seqs=max_num_seqs,
                                          enable_chunked_prefill=enable_chunked_prefill),
                experts=ExpertConfig(memory_budget=expert_memory_budget))
        self._setup(config, load_model(config, cache_dir=cache_dir), seed)

    def _setup(self, config: EngineConfig, loaded: LoadedModel, seed: int) -> None:
        built = wire_engine(loaded, config, seed=seed)
        self.loaded = loaded
        self.config = config
        self.engine = built.engine
        self.tokenizer = built.tokenizer
        self.checkpoint = built.checkpoint
        self.model = built.model
        self._ids = itertools.count()

    def with_config(self, *, cache: CacheConfig | None = None, scheduler: SchedulerConfig | None = None,
                    max_model_len: int | None = None, seed: int = 0) -> LLM:
        """A new LLM with its own engine and KV cache over the same loaded weights."""
        model = self.config.model
        if max_model_len is not None:
            model = ModelConfig(model=model.model, dtype=model.dtype, weight_format=model.weight_format,
                                max_model_len=max_model_len, num_threads=model.num_threads)
        config = EngineConfig(model=model, cache=cache or self.config.cache,
                              scheduler=scheduler or self.config.scheduler, experts=self.config.experts)
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

    def _add(self, prompt: Prompt, params: SamplingParams) -> str:
        request_id = f"llm-{next(self._ids)}"
        text = prompt if isinstance(prompt, str) else None
        self.engine.add_request(request_id, self.encode(prompt), params, prompt=text)
        return request_id

    # -- generation ---------------------------------------------------------------------------
    def generate(self, prompts: Prompt | Sequence[Prompt], params: SamplingParams | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """Run every prompt to completion, batched; outputs in prompt order."""
        params = params or SamplingParams()
        batch = [prompts] if isinstance(prompts, str) or _is_token_list(prompts) else list(prompts)
        ids = [self._add(p, params) for p in batch]  # type: ignore[arg-type]
        pending = set(ids)
        finals: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(ids), desc="generate", disable=not use_tqdm)
        while pending:
            for delta in self.engine.step():
                if delta.request_id not in finals and delta.request_id not in pending:
                    continue
                finals[delta.request_id] = _merge(finals.get(delta.request_id) or _accumulator(delta),
                                                  delta)
                if delta.finished:
                    pending.discard(delta.request_id)
                    bar.update(1)
            if pending and not self.engine.has_unfinished():
                raise RuntimeError(f"engine went idle with requests unfinished: {sorted(pending)}")
        bar.close()
        return [finals[rid] for rid in ids]

    def chat(self, messages: list[Message] | list[list[Message]], params: SamplingParams | None = None,
             use_tqdm: bool = False) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation or a list of them, then generate."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.chat_prompt(c) for c in conversations]  # type: ignore[arg-type]
        return self.generate(prompts, params, use_tqdm=use_tqdm)

    def scale(self, prompt: Prompt, strategy: str = "majority", budget: int = 8, verifier: Any = None,
              params: SamplingParams | None = None, **options: Any) -> Any:
        """Inference-time scaling inside this engine; returns a `mixserve.scaling.ScaleResult`
        (selected answer, every candidate, compute accounting). `strategy`/`verifier` names are in
        `mixserve.scaling.STRATEGIES`/`VERIFIERS`; a verifier may also be a function `f(text) -> float`.
        `options` go to `make_strategy` (config=ScaleConfig(...), extract=...).

        >>> llm.scale("What is 17 * 23?", strategy="bom", budget=16, verifier="judge").answer
        """
        from mixserve.scaling import make_strategy, run_strategy

        made = make_strategy(strategy, self.encode(prompt), budget, params, verifier, self.tokenizer,
                             cost=self.cost(), **options)
        return run_strategy(self.engine, made)

    def stream(self, prompt: Prompt, params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        """Yield deltas (new tokens and text per sample) of one request as they are produced."""
        request_id = self._add(prompt, params or SamplingParams())
        try:
            while True:
                deltas = [d for d in self.engine.step() if d.request_id == request_id]
                for delta in deltas:
                    yield delta
                    if delta.finished:
                        return
        finally:
            self.engine.abort_request(request_id)


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
