"""Strategy requests: `strategy`, `budget`, `verifier` on completions/chat run a scaling strategy inside
the engine (samples share the prompt's KV through fork) and answer with the selected text; `usage`
carries the full compute accounting under `usage.scaling`."""

from __future__ import annotations

import time
from typing import Any

from mixserve.sampling_params import SamplingParams
from mixserve.scaling import ModelCost, ScalingError, make_strategy
from mixserve.server.errors import ApiError
from mixserve.server.params import Prompt
from mixserve.server.serving import ServerState


def make_scaling_hook(cost: ModelCost | None) -> Any:
    """The `ServerState.scaling` callable for a model of this cost."""

    async def run(state: ServerState, body: Any, prompt: Prompt, params: SamplingParams, obj: str) -> dict:
        engine = state.ready()
        try:
            strategy = make_strategy(body.strategy, prompt.token_ids, body.budget, params, body.verifier,
                                     state.tokenizer, cost=cost,
                                     strategy_id=engine.new_id("scale"))
        except ScalingError as exc:
            field = exc.field if exc.field in ("strategy", "budget", "verifier") else "strategy"
            raise ApiError(400, str(exc), param=field) from exc
        result = await engine.run_controller(strategy)
        finish = result.candidates[result.selected[0]].finish_reason if result.selected else "stop"
        if obj == "chat.completion":
            choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": result.text},
                                      "logprobs": None, "finish_reason": finish or "stop"}
            prefix = "chatcmpl"
        else:
            choice = {"index": 0, "text": result.text, "logprobs": None, "finish_reason": finish or "stop"}
            prefix = "cmpl"
        return {"id": engine.new_id(prefix), "object": obj, "created": int(time.time()), "model": state.model_name,
                "choices": [choice], "usage": result.usage.openai_usage(),
                "scaling": {"strategy": result.strategy, "answer": result.answer, "selected": list(result.selected),
                            "candidates": [{"index": c.index, "answer": c.answer, "score": c.score,
                                            "num_tokens": c.num_tokens, "finish_reason": c.finish_reason}
                                           for c in result.candidates],
                            "info": dict(result.info)}}

    return run
