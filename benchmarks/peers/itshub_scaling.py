"""its_hub (the inference-time scaling library users pick today) driving a mixserve server: self-consistency
or best-of-N over a batch of task problems, all problems at once. Runs in its own venv
(`bash benchmarks/setup_peers.sh itshub`), with the repository on PYTHONPATH only for the task suite's
answer extractor (pure Python, no torch):

    PYTHONPATH=. .peers/itshub/bin/python benchmarks/peers/itshub_scaling.py --port 8765 --model smollm2-135m \
        --strategy majority --budget 16 --problems problems.json

`--problems` is a JSON list of {"question": ...}; prints one JSON object: wall seconds and the selected text
per problem (the caller checks them against the task).

Votes use the task's extractor (its_hub's `consistency_space_projection_func`), so both paths vote on the
same answers. Best-of-N's outcome reward model is the judge mixserve's native `bon` uses: P("yes") for the
same question after the candidate, asked through the same endpoint with `max_tokens=1` and top-20 logprobs
(its_hub's own `LLMJudge` wants a JSON verdict a 135M model cannot write). The orchestrator's concurrency
is raised to N x problems so its_hub is never throttled below what the native path runs at once.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
from its_hub import BestOfN, SelfConsistency
from its_hub.api.reward_models.orm import AbstractOutcomeRewardModel
from its_hub.core.lms.openai_lm import OpenAICompatibleLanguageModel
from its_hub.core.orchestrator import LMOrchestrator

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from mixserve.scaling.judge import QUESTION  # noqa: E402
from mixserve.scaling.tasks import get_task  # noqa: E402


class YesProbabilityJudge(AbstractOutcomeRewardModel):
    """P("yes") / (P("yes") + P("no")) for the judge question after each conversation."""

    def __init__(self, base_url: str, model: str) -> None:
        self.url = base_url + "/chat/completions"
        self.model = model

    def score(self, messages: Any, **kwargs: Any) -> Any:
        return asyncio.run(self.ascore(messages, **kwargs))

    async def ascore(self, messages: Any, orchestrator: Any = None, **kwargs: Any) -> Any:
        batch = messages and isinstance(messages[0], list)
        convs = messages if batch else [messages]
        async with aiohttp.ClientSession() as session:
            scores = await asyncio.gather(*(self._one(session, c) for c in convs))
        return list(scores) if batch else scores[0]

    async def _one(self, session: aiohttp.ClientSession, conv: list[Any]) -> float:
        msgs = [m if isinstance(m, dict) else {"role": m.role, "content": m.content} for m in conv]
        msgs = [{"role": m["role"], "content": m["content"]} for m in msgs] + [{"role": "user", "content": QUESTION}]
        body = {"model": self.model, "messages": msgs, "max_tokens": 1, "temperature": 0, "logprobs": True,
                "top_logprobs": 20}
        async with session.post(self.url, json=body, timeout=aiohttp.ClientTimeout(total=3600)) as r:
            data = await r.json()
        top = (data["choices"][0].get("logprobs") or {}).get("content") or [{"top_logprobs": []}]
        p: dict[str, float] = {}
        for t in top[0]["top_logprobs"]:
            key = t["token"].strip().lower()
            p[key] = p.get(key, 0.0) + math.exp(t["logprob"])
        yes, no = p.get("yes", 0.0), p.get("no", 0.0)
        return yes / (yes + no) if yes + no else 0.5


async def run(args: argparse.Namespace) -> dict[str, Any]:
    problems = json.loads(Path(args.problems).read_text())
    task = get_task(args.task)
    fresh = itertools.count()

    def project(text: str) -> str:  # unanswered samples never form a voting bloc
        answer = task.extract(text)
        return answer if answer is not None else f"<no answer {next(fresh)}>"

    base = f"http://127.0.0.1:{args.port}/v1"
    lm = OpenAICompatibleLanguageModel(endpoint=base, api_key="x", model_name=args.model,
                                       max_tokens=args.max_tokens, temperature=args.temperature)
    orchestrator = LMOrchestrator(max_concurrency=args.budget * len(problems))
    algo: Any = (SelfConsistency(consistency_space_projection_func=project, orchestrator=orchestrator)
                 if args.strategy == "majority" else
                 BestOfN(YesProbabilityJudge(base, args.model), orchestrator=orchestrator))
    start = time.perf_counter()
    outs = await asyncio.gather(*(algo.ainfer(lm, [{"role": "user", "content": p["question"]}], args.budget)
                                  for p in problems))
    wall = time.perf_counter() - start
    await lm.close()
    texts = [o.get("content") or "" if isinstance(o, dict) else str(o) for o in outs]
    return {"wall_s": wall, "texts": texts}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--task", default="arithmetic")
    p.add_argument("--strategy", choices=("majority", "bon"), required=True)
    p.add_argument("--budget", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--problems", required=True)
    print(json.dumps(asyncio.run(run(p.parse_args()))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
