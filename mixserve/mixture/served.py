"""A mixture served as a model of its own (`mixture/<name>`): each request's question is answered by
Symbolic-MoE recruitment + aggregation over the server's model pool. Concurrent mixture requests that
arrive within `window_s` run as one batch, so their expert work is grouped by model (each model acquired
once per batch). The response carries the recruited models, their answers and per-model compute in
`usage.mixture`."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

from fastapi.responses import JSONResponse, StreamingResponse

from mixserve.mixture.experts import ExpertAnswer, ExpertRequest, Question, chat_messages, raw_prompt, request_params
from mixserve.mixture.grading import TaskGrader
from mixserve.mixture.pipeline import Mixture, MixtureConfig, MixtureRun
from mixserve.mixture.pool import ModelPool
from mixserve.mixture.profiles import Profiles
from mixserve.mixture.skills import KeywordMapper, MiniLMEmbedder, SkillConfig
from mixserve.sampling_params import SamplingParams
from mixserve.server.errors import ApiError

PREFIX = "mixture/"


class EngineExpert:
    """An Expert over a served model's AsyncEngine; called from a worker thread, runs on the server loop."""

    def __init__(self, state: Any, params: SamplingParams, loop: asyncio.AbstractEventLoop) -> None:
        self.state, self.params, self.loop = state, params, loop

    def _ids(self, request: ExpertRequest) -> list[int]:
        tok = self.state.tokenizer
        try:
            prompt = tok.apply_chat_template(chat_messages(request), add_generation_prompt=True)
            return list(tok.encode(prompt, add_special_tokens=False))
        except Exception:  # noqa: BLE001 - a base model without a chat template gets the raw text
            return list(tok.encode(raw_prompt(request)))

    async def _one(self, request: ExpertRequest) -> ExpertAnswer:
        ids = self._ids(request)
        params = request_params(self.params, request)
        text, n = "", 0
        async for delta in self.state.engine.stream(f"mix-{uuid.uuid4().hex}", ids, params):
            for out in delta.outputs:
                text += out.text
                n += len(out.token_ids)
        return ExpertAnswer(text, len(ids), n)

    def generate(self, requests: list[ExpertRequest]) -> list[ExpertAnswer]:
        async def run_all() -> list[ExpertAnswer]:
            return list(await asyncio.gather(*(self._one(r) for r in requests)))
        return asyncio.run_coroutine_threadsafe(run_all(), self.loop).result()


@dataclass
class _Pending:
    question: Question
    future: asyncio.Future[tuple[MixtureRun, int]]


class ServedMixture:
    """One `mixture/<name>` model: batches concurrent questions and runs the mixture on the pool."""

    def __init__(self, name: str, profiles: Profiles, pool: ModelPool[Any], params: SamplingParams,
                 window_s: float = 0.05, expert_of: Any = None, executor: Any = None,
                 config: MixtureConfig | None = None, skills: SkillConfig | None = None) -> None:
        self.name = PREFIX + name
        self.profiles, self.pool, self.params, self.window_s = profiles, pool, params, window_s
        self.expert_of = expert_of
        """None: engines of this process (`EngineExpert`); the cluster passes its pool's remote experts."""
        self.executor = executor
        """The `Mixture` executor (None: `run_grouped` in this process)."""
        self.config = config or MixtureConfig()
        self.skills = skills
        self.mapper: KeywordMapper | None = None
        self.pending: list[_Pending] = []
        self.lock = asyncio.Lock()

    def _mixture(self, loop: asyncio.AbstractEventLoop) -> Mixture:
        if self.mapper is None:
            self.mapper = KeywordMapper(self.profiles.vocabulary(), MiniLMEmbedder())
        expert_of = self.expert_of or (lambda _n, state: EngineExpert(state, self.params, loop))
        return Mixture(self.pool, expert_of, self.profiles, TaskGrader(), self.config, self.skills,
                       mapper=self.mapper,
                       executor=self.executor)

    async def answer(self, text: str) -> tuple[MixtureRun, int]:
        """Queue one question; the first waiter of a window runs the whole batch."""
        loop = asyncio.get_running_loop()
        item = _Pending(Question(f"q{uuid.uuid4().hex[:8]}", text), loop.create_future())
        self.pending.append(item)
        if len(self.pending) == 1:
            await asyncio.sleep(self.window_s)
            async with self.lock:
                batch, self.pending = self.pending, []
                try:
                    run = await asyncio.to_thread(self._mixture(loop).run, [p.question for p in batch], "symbolic")
                    for i, p in enumerate(batch):
                        p.future.set_result((run, i))
                except Exception as exc:  # noqa: BLE001 - every waiter gets the error
                    for p in batch:
                        if not p.future.done():
                            p.future.set_exception(exc)
        return await item.future

    async def respond(self, body: Any) -> Any:
        text = _question_text(body)
        run, i = await self.answer(text)
        r = run.results[i]
        compute = {m: vars(c) for m, c in run.report.compute.items()}
        usage = {"prompt_tokens": sum(c["prompt_tokens"] for c in compute.values()),
                 "completion_tokens": sum(c["completion_tokens"] for c in compute.values()),
                 "mixture": {"keywords": r.keywords, "recruited": r.recruited, "answers": r.answers,
                             "aggregator": run.stages.get("aggregate") and next(iter(
                                 run.stages["aggregate"].compute), None),
                             "batch_questions": len(run.results), "batch_loads": run.report.loads,
                             "batch_compute": compute}}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": self.name}
        if not getattr(body, "stream", False):
            return JSONResponse({**head, "object": "chat.completion", "choices": [
                {"index": 0, "message": {"role": "assistant", "content": r.final}, "finish_reason": "stop",
                 "logprobs": None}], "usage": usage})

        def frame(delta: dict[str, Any], finish: str | None, extra: dict[str, Any] | None = None) -> str:
            payload = {**head, "object": "chat.completion.chunk",
                       "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
                       **(extra or {})}
            return f"data: {json.dumps(payload)}\n\n"

        async def frames() -> Any:
            yield frame({"role": "assistant", "content": ""}, None)
            yield frame({"content": r.final}, None)
            yield frame({}, "stop", {"usage": usage})
            yield "data: [DONE]\n\n"
        return StreamingResponse(frames(), media_type="text/event-stream")


def _question_text(body: Any) -> str:
    messages = getattr(body, "messages", None)
    if messages:
        for m in reversed(messages):
            m = m if isinstance(m, dict) else m.model_dump()
            if m.get("role") == "user" and isinstance(m.get("content"), str):
                return str(m["content"])
        raise ApiError(400, "invalid field messages: a mixture needs a user message with text content",
                       param="messages")
    prompt = getattr(body, "prompt", None)
    if isinstance(prompt, str):
        return prompt
    raise ApiError(400, "invalid field prompt: a mixture takes one text prompt", param="prompt")
