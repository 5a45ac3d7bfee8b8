"""Run hogwild on an engine's model, KV caches and block pool (what `LLM.hogwild` and the strategy call)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from mixserve.hogwild.forward import ViewModel
from mixserve.hogwild.segments import HogwildError, SegmentPool
from mixserve.hogwild.session import HogwildConfig, HogwildResult, HogwildSession


def engine_view_model(engine: Any) -> tuple[ViewModel, SegmentPool]:
    """The engine's model and caches as a `ViewModel`, and a `SegmentPool` over its block pool.
    Hogwild needs the in-process runner that owns every layer (not a staged or remote one)."""
    from mixserve.runner.model_runner import TorchModelRunner

    runner = engine.runner
    if not isinstance(runner, TorchModelRunner) or runner.start != 0 or runner.end != runner.num_layers:
        raise HogwildError(f"hogwild needs an in-process runner owning every layer, not {type(runner).__name__}")
    vm = ViewModel.of(runner.model, runner.kv_caches)  # type: ignore[arg-type]
    return vm, SegmentPool(engine.scheduler.pool, runner.block_size)


def prompt_ids_for(tokenizer: Any, prompt: str | list[int] | list[dict[str, Any]]) -> list[int]:
    """Token ids of a problem: ids as given, chat messages through the template, a string as one user
    message (plain text plus a newline when the tokenizer has only the default template)."""
    if isinstance(prompt, str):
        if tokenizer.chat_template_is_default:
            return list(tokenizer.encode(prompt + "\n"))
        return list(tokenizer.encode_chat([{"role": "user", "content": prompt}]))
    if prompt and all(isinstance(m, dict) for m in prompt):
        return list(tokenizer.encode_chat(prompt))
    return [int(t) for t in prompt]  # type: ignore[arg-type]


def hogwild(engine: Any, tokenizer: Any, prompt_ids: list[int], config: HogwildConfig | None = None,
            **options: Any) -> HogwildResult:
    """Run one problem between engine steps (the engine's other requests keep their blocks);
    `options` override `HogwildConfig` fields (workers=, max_tokens=, params=, ...)."""
    config = replace(config or HogwildConfig(), **options)
    vm, segments = engine_view_model(engine)
    return HogwildSession(vm, segments, tokenizer, config).run(prompt_ids)
