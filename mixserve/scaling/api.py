"""What `LLM.scale` does: turn a prompt, chat messages or a batch of problems into strategies on one
engine and run them concurrently (the engine batches every problem's samples together).

Accepted problem forms (one, or a list of them for a batch):
- a prompt string, or token ids (`list[int]`);
- chat `messages` (`list[dict]` with "role"/"content"; the chat template is applied like `LLM.chat`);
- a `ScaleProblem(prompt, data)`: one of the above plus user data for problem-aware verifiers;
- a dict `{"prompt": ...}` or `{"messages": [...]}` with an optional "data".
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from mixserve.scaling.base import ScaleResult, ScalingError
from mixserve.scaling.driver import run_strategies
from mixserve.scaling.verifiers import ScaleProblem


def _is_messages(value: object) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(m, dict) and "role" in m for m in value)


def _is_tokens(value: object) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(t, int) and not isinstance(t, bool)
                                                           for t in value)


def as_problem(value: Any) -> ScaleProblem:
    """One problem in any accepted form (see the module doc); a clear error otherwise."""
    if isinstance(value, ScaleProblem):
        return value
    if isinstance(value, dict) and "role" not in value:
        unknown = set(value) - {"prompt", "messages", "data"}
        if unknown or ("prompt" in value) == ("messages" in value):
            raise ScalingError(f"invalid problem {sorted(value)!r}: needs exactly one of 'prompt' or 'messages' "
                               f"(and optionally 'data')", field="prompt")
        return ScaleProblem(value.get("prompt", value.get("messages")), value.get("data"))
    if isinstance(value, str) or _is_tokens(value) or _is_messages(value):
        return ScaleProblem(value)
    raise ScalingError(f"invalid prompt {value!r:.80}: a string, token ids, chat messages, a ScaleProblem or "
                       f"a dict with 'prompt'/'messages'", field="prompt")


def as_problems(value: Any) -> tuple[list[ScaleProblem], bool]:
    """(problems, is_batch): a single problem, or a list of problems in any accepted forms."""
    single = (isinstance(value, (str, ScaleProblem, dict)) or _is_tokens(value) or _is_messages(value))
    if single:
        return [as_problem(value)], False
    if isinstance(value, (list, tuple)) and value:
        return [as_problem(v) for v in value], True
    raise ScalingError(f"invalid prompt {value!r:.80}: empty or of an unknown form", field="prompt")


def problem_ids(problem: ScaleProblem, encode: Callable[[Any], list[int]],
                chat_prompt: Callable[[list[dict[str, Any]]], str]) -> list[int]:
    """Token ids of a problem's prompt: messages through the chat template, then `encode`."""
    prompt = problem.prompt
    if _is_messages(prompt):
        prompt = chat_prompt(prompt)
    ids = encode(prompt)
    if not ids:
        raise ScalingError("invalid prompt: it is empty", field="prompt")
    return ids


def scale(target: Any, problems: Any, strategy: str, *, encode: Callable[[Any], list[int]],
          chat_prompt: Callable[[list[dict[str, Any]]], str], strategy_id: str,
          on_done: Callable[[int, ScaleResult], None] | None = None,
          **options: Any) -> ScaleResult | list[ScaleResult]:
    """Run `strategy` on one problem (returns its result) or a batch (a list of results, in order),
    concurrently on `target` (an Engine or Dispatcher). `options` go to `make_strategies`."""
    from mixserve.scaling.registry import make_strategies

    batch, is_batch = as_problems(problems)
    ids = [problem_ids(p, encode, chat_prompt) for p in batch]
    made = make_strategies(strategy, ids, strategy_id=strategy_id, problems=batch, **options)
    def done(i: int, result: Any) -> None:
        if on_done is not None:
            for j, r in enumerate(result) if isinstance(result, list) else [(i, result)]:
                on_done(j, r)

    results = run_strategies(target, made, done)
    flat: list[ScaleResult] = []
    for r in results:
        flat.extend(r if isinstance(r, list) else [r])
    return flat if is_batch else flat[0]

