"""POST /v1/chat/completions: messages through the model's chat template, n samples, logprobs, streaming."""

from __future__ import annotations

import time
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

from mixserve.outputs import RequestOutput
from mixserve.server.errors import ApiError
from mixserve.server.formats import Choice, chat_logprobs, finish_fields
from mixserve.server.guards import offload
from mixserve.server.params import chat_params, chat_prompt
from mixserve.server.protocol import ChatCompletionRequest
from mixserve.server.serving import (
    Run,
    RunStreamingResponse,
    ServerState,
    collect,
    scaled_response,
    stream_frames,
)


class _Shape:
    def __init__(self, state: ServerState, body: ChatCompletionRequest, run: Run) -> None:
        self.state, self.body, self.run = state, body, run
        self.created = int(time.time())
        self.k = (body.top_logprobs or 0) if body.logprobs else None

    def head(self, obj: str) -> dict[str, Any]:
        return {"id": self.run.request_id, "object": obj, "created": self.created,
                "model": self.state.model_name, "system_fingerprint": None}

    def logprobs(self, token_ids: list[int], entries: list[Any]) -> dict[str, Any] | None:
        return None if self.k is None else chat_logprobs(token_ids, entries, self.k, self.state.token_text)

    def full(self, choice: Choice) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": choice.text, "tool_calls": [],
                   "reasoning_content": None}
        return {"index": choice.index, "message": message,
                "logprobs": self.logprobs(choice.token_ids, choice.logprobs), **finish_fields(choice)}

    def first(self) -> list[dict[str, Any]]:
        """The role delta, once per choice, before any content."""
        return [{**self.head("chat.completion.chunk"),
                 "choices": [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None}]}
                for i in range(self.body.n)]

    def chunks(self, _: int, delta: RequestOutput) -> list[dict[str, Any]]:
        out = []
        for part in delta.outputs:
            if not part.text and not part.token_ids and part.finish_reason is None:
                continue
            choice = self.run.choice(0, part.index)
            body: dict[str, Any] = {"index": part.index, "delta": {"content": part.text} if part.text else {},
                                    "logprobs": self.logprobs(list(part.token_ids), list(part.logprobs or []))}
            if part.finish_reason is not None:
                body.update(finish_fields(choice))
            else:
                body["finish_reason"] = None
            out.append({**self.head("chat.completion.chunk"), "choices": [body]})
        return out


async def create_chat_completion(state: ServerState, body: ChatCompletionRequest, request: Request) -> Any:
    state.ready()
    assert state.limits is not None
    prompt = await offload(chat_prompt, body, state.tokenizer)
    params = chat_params(body, prompt, state.limits)
    if body.strategy is not None:
        return await scaled_response(state, body, [prompt], params, "chat.completion")
    run = Run(state, "chatcmpl", [prompt], params)
    shape = _Shape(state, body, run)
    if body.stream:
        async def last() -> list[dict[str, Any]]:
            if body.stream_options is None or not body.stream_options.include_usage:
                return []
            return [{**shape.head("chat.completion.chunk"), "choices": [], "usage": run.usage().as_dict()}]

        await run.start()  # what the engine rejects is a 4xx, not an error frame after a 200
        return RunStreamingResponse(run, stream_frames(run, shape.chunks, shape.first, last))
    await collect(run, request)
    if (message := run.failed()) is not None:
        raise ApiError(500, f"generation failed: {message}")
    choices = [shape.full(run.choices[i]) for i in sorted(run.choices)]
    return JSONResponse({**shape.head("chat.completion"), "choices": choices, "usage": run.usage().as_dict()})
