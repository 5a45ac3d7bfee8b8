"""`mixserve serve --expert-memory-budget`: an MoE served with experts streamed from a pack gives the
all-in-memory output, and /metrics publishes the expert-cache counters."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from mixserve.llm import LLM
from mixserve.sampling_params import SamplingParams
from tests.experts.conftest import save_tiny
from tests.server.conftest import MODEL_NAME, Server, start_server

PROMPT = [3, 4, 5, 6, 7, 8, 9]


@pytest.fixture(scope="module")
def olmoe_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny("olmoe", tmp_path_factory.mktemp("olmoe_served")).path


@pytest.fixture(scope="module")
def moe_server(olmoe_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    work = tmp_path_factory.mktemp("moe_server")
    srv = start_server(str(olmoe_dir), work, "--expert-memory-budget", "30%", "--cache-dir", str(work),
                       "--kv-cache-gib", "0.01")
    try:
        yield srv
    finally:
        srv.stop()


def test_budgeted_moe_matches_all_in_memory_and_reports_expert_metrics(moe_server: Server, olmoe_dir: Path,
                                                                         tmp_path: Path) -> None:
    body = {"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    served = httpx.post(f"{moe_server.url}/v1/completions", json=body, timeout=120).json()
    reference = LLM(str(olmoe_dir), cache_dir=tmp_path, kv_cache_bytes=1 << 22, max_model_len=2048)
    ref = reference.generate([PROMPT], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))[0]
    assert served["choices"][0]["text"] == ref.outputs[0].text
    m = moe_server.metrics()
    assert m["mixserve:expert_tokens"] >= len(PROMPT) + 7
    assert 0 < m["mixserve:expert_hit_rate"] <= 1
    assert m["mixserve:expert_resident_bytes"] <= m["mixserve:expert_budget_bytes"]
