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
from mixserve.server.structured import ToolPlan, tool_plan
from mixserve.structured.tools import ToolCall, ToolCallStream, parse_tool_calls


class _Shape:
    def __init__(self, state: ServerState, body: ChatCompletionRequest, run: Run, plan: ToolPlan) -> None:
        self.state, self.body, self.run, self.plan = state, body, run, plan
        self.created = int(time.time())
        self.k = (body.top_logprobs or 0) if body.logprobs else None
        self.streams: dict[int, ToolCallStream] = {}

    def head(self, obj: str) -> dict[str, Any]:
        return {"id": self.run.request_id, "object": obj, "created": self.created,
                "model": self.state.model_name, "system_fingerprint": None}

    def logprobs(self, token_ids: list[int], entries: list[Any]) -> dict[str, Any] | None:
        return None if self.k is None else chat_logprobs(token_ids, entries, self.k, self.state.token_text)

    def full(self, choice: Choice) -> dict[str, Any]:
        content: str | None = choice.text
        calls: list[ToolCall] = []
        if self.plan.active:
            content, calls = parse_tool_calls(choice.text, self.plan.tools)
        message: dict[str, Any] = {"role": "assistant", "content": content,
                                   "tool_calls": [c.as_dict() for c in calls], "reasoning_content": None}
        return {"index": choice.index, "message": message,
                "logprobs": self.logprobs(choice.token_ids, choice.logprobs),
                **self._finish(choice, bool(calls))}

    @staticmethod
    def _finish(choice: Choice, called: bool) -> dict[str, Any]:
        """OpenAI's finish reason: `tool_calls` when a sample that stopped normally made calls."""
        fields = finish_fields(choice)
        if called and fields["finish_reason"] == "stop":
            fields["finish_reason"] = "tool_calls"
        return fields

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
            change: dict[str, Any] = {"content": part.text} if part.text else {}
            called = False
            if self.plan.active:
                stream = self.streams.setdefault(part.index, ToolCallStream(self.plan.tools))
                content, calls = stream.push(part.text, final=part.finish_reason is not None)
                change = {"content": content} if content else {}
                if calls:
                    change["tool_calls"] = calls
                called = bool(stream.calls)
            body: dict[str, Any] = {"index": part.index, "delta": change,
                                    "logprobs": self.logprobs(list(part.token_ids), list(part.logprobs or []))}
            if part.finish_reason is not None:
                body.update(self._finish(choice, called))
            else:
                body["finish_reason"] = None
            out.append({**self.head("chat.completion.chunk"), "choices": [body]})
        return out


async def create_chat_completion(state: ServerState, body: ChatCompletionRequest, request: Request) -> Any:
    state.ready()
    assert state.limits is not None
    plan = tool_plan(body)
    if body.strategy is not None and plan.active:
        raise ApiError(400, "invalid field strategy: cannot be combined with tools (send tool_choice='none')",
                       param="strategy")
    prompt = await offload(chat_prompt, body, state.tokenizer, plan)
    params = chat_params(body, prompt, state.limits, plan)
    if body.strategy is not None:
        return await scaled_response(state, body, [prompt], params, "chat.completion")
    run = Run(state, "chatcmpl", [prompt], params)
    shape = _Shape(state, body, run, plan)
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
