"""POST /v1/completions: prompts (strings or token ids), n samples, echo + logprobs, streaming."""

from __future__ import annotations

import time
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

from mixserve.outputs import RequestOutput
from mixserve.server.errors import ApiError
from mixserve.server.formats import Choice, completion_logprobs, finish_fields
from mixserve.server.guards import offload
from mixserve.server.params import completion_params, completion_prompts
from mixserve.server.protocol import CompletionRequest
from mixserve.server.serving import (
    Run,
    RunStreamingResponse,
    ServerState,
    collect,
    scaled_response,
    stream_frames,
)


class _Shape:
    """How this request's choices are rendered (echo, logprobs, scoring-only)."""

    def __init__(self, state: ServerState, body: CompletionRequest, run: Run, score_only: bool) -> None:
        self.state, self.body, self.run, self.score_only = state, body, run, score_only
        self.created = int(time.time())
        self.echoed: set[int] = set()

    def head(self) -> dict[str, Any]:
        return {"id": self.run.request_id, "object": "text_completion", "created": self.created,
                "model": self.state.model_name}

    def prompt_part(self, prompt_index: int) -> tuple[str, list[int], list[Any]]:
        prompt = self.run.prompts[prompt_index]
        text = prompt.text if prompt.text is not None else self.state.tokenizer.decode(prompt.token_ids)
        entries = self.run.prompt_logprobs.get(prompt_index) or [None] * len(prompt.token_ids)
        return text, prompt.token_ids, entries

    def render(self, choice: Choice, text: str, token_ids: list[int], entries: list[Any],
               offset: int) -> dict[str, Any]:
        k = self.body.logprobs
        logprobs = None if k is None else completion_logprobs(token_ids, entries, k, self.state.token_text, offset)
        return {"index": choice.index, "text": text, "logprobs": logprobs, **finish_fields(choice)}

    def full(self, choice: Choice) -> dict[str, Any]:
        prompt_index = choice.index // self.body.n
        text, ids, entries = choice.text, choice.token_ids, list(choice.logprobs)
        if self.score_only:
            text, ids, entries = "", [], []
        offset = len(self.run.prompts[prompt_index].text or "")
        if self.body.echo:
            p_text, p_ids, p_entries = self.prompt_part(prompt_index)
            text, ids, entries, offset = p_text + text, p_ids + ids, p_entries + entries, 0
        return self.render(choice, text, ids, entries, offset)

    def chunks(self, prompt_index: int, delta: RequestOutput) -> list[dict[str, Any]]:
        out = []
        for part in delta.outputs:
            choice = self.run.choice(prompt_index, part.index)
            text, ids, entries = part.text, list(part.token_ids), list(part.logprobs or [])
            if self.score_only:
                text, ids, entries = "", [], []
            if self.body.echo and choice.index not in self.echoed:
                self.echoed.add(choice.index)
                p_text, p_ids, p_entries = self.prompt_part(prompt_index)
                text, ids, entries = p_text + text, p_ids + ids, p_entries + entries
            if not text and not ids and part.finish_reason is None:
                continue
            rendered = self.render(choice, text, ids, entries, 0)
            if part.finish_reason is None:
                rendered.update(finish_reason=None, stop_reason=None)
            out.append({**self.head(), "choices": [rendered]})
        return out


async def create_completion(state: ServerState, body: CompletionRequest, request: Request) -> Any:
    engine_limits = state.limits
    state.ready()
    assert engine_limits is not None
    prompts = await offload(completion_prompts, body, state.tokenizer, engine_limits)
    params, score_only = completion_params(body, prompts, engine_limits)
    if body.strategy is not None:
        return await scaled_response(state, body, prompts, params, "text_completion")
    run = Run(state, "cmpl", prompts, params)
    shape = _Shape(state, body, run, score_only)
    if body.stream:
        async def last() -> list[dict[str, Any]]:
            if body.stream_options is None or not body.stream_options.include_usage:
                return []
            return [{**shape.head(), "choices": [], "usage": run.usage(score_only).as_dict()}]

        await run.start()  # what the engine rejects is a 4xx, not an error frame after a 200
        return RunStreamingResponse(run, stream_frames(run, shape.chunks, lambda: [], last))
    await collect(run, request)
    if (message := run.failed()) is not None:
        raise ApiError(500, f"generation failed: {message}")
    choices = [shape.full(run.choices[i]) for i in sorted(run.choices)]
    return JSONResponse({**shape.head(), "choices": choices, "usage": run.usage(score_only).as_dict()})
