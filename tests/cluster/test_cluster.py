"""`mixserve serve --ray` on a real two-node Ray cluster, driven by the official `openai` client:
same outputs as the single-process server, prefix routing, live migration, drain/add, failover."""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import openai
import pytest

from tests.cluster.raycluster import Server
from tests.cluster.tiny import PROMPTS

SHARED = " ".join(f"t{i}" for i in range(10, 50))  # 40 tokens: 10 full blocks of 4


def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", timeout=120, max_retries=0)


def complete(server: Server, prompt: str, **kw: Any) -> str:
    out = client(server).completions.create(model="tiny", prompt=prompt, **kw)
    return out.choices[0].text


def stream_text(chunks: Any) -> str:
    return "".join(c.choices[0].text for c in chunks if c.choices)


def live(server: Server) -> list[dict[str, Any]]:
    return [r for r in server.get("/v1/cluster/replicas")["replicas"] if r["state"] == "ready"]


def wait_for(predicate: Any, timeout_s: float = 120) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return bool(predicate())


KINDS = {"greedy": {"temperature": 0.0}, "seeded": {"temperature": 1.0, "top_p": 0.9, "seed": 11}}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_outputs_equal_the_single_process_server(ingress: Server, single: Server, kind: str) -> None:
    kw = {**KINDS[kind], "max_tokens": 24}
    for prompt in PROMPTS:
        want = complete(single, prompt, **kw)
        assert complete(ingress, prompt, **kw) == want
        streamed = client(ingress).completions.create(model="tiny", prompt=prompt, stream=True, **kw)
        assert stream_text(streamed) == want
    chat = client(ingress).chat.completions.create(model="tiny", messages=[{"role": "user", "content": PROMPTS[0]}],
                                                   max_tokens=16, **KINDS[kind])
    ref = client(single).chat.completions.create(model="tiny", messages=[{"role": "user", "content": PROMPTS[0]}],
                                                 max_tokens=16, **KINDS[kind])
    assert chat.choices[0].message.content == ref.choices[0].message.content


def test_errors_and_n_samples_match(ingress: Server, single: Server) -> None:
    for server in (ingress, single):
        with pytest.raises(openai.BadRequestError, match="context length"):
            complete(server, " ".join(["t5"] * 600), max_tokens=4)
    kw = {"n": 3, "temperature": 1.0, "seed": 5, "max_tokens": 12}
    got = client(ingress).completions.create(model="tiny", prompt=PROMPTS[1], **kw)
    want = client(single).completions.create(model="tiny", prompt=PROMPTS[1], **kw)
    assert [c.text for c in got.choices] == [c.text for c in want.choices]


def test_shared_prefix_hits_one_replica(ingress: Server) -> None:
    before = {r["id"]: r["routed"].get("prefix_hit", 0) for r in live(ingress)}
    for i in range(6):
        complete(ingress, f"{SHARED} t{200 + i}", max_tokens=2, temperature=0.0)
    after = {r["id"]: r["routed"].get("prefix_hit", 0) for r in live(ingress)}
    gained = {rid: after[rid] - before.get(rid, 0) for rid in after}
    # the first request placed the prefix (least loaded), the five that follow hit it
    assert max(gained.values()) == 5, (gained, ingress.get("/v1/cluster/replicas"))
    holder = max(gained, key=lambda r: gained[r])

    def hit_lines() -> list[str]:
        text = httpx.get(ingress.url + "/metrics", timeout=10).text
        return [line for line in text.splitlines() if line.startswith("mixserve:prefix_cache_hits_total{")]

    def holder_hits() -> float:  # replica stats reach the ingress by polling: wait for the last ones
        return sum(float(line.rsplit(" ", 1)[1]) for line in hit_lines() if f'replica="{holder}"' in line)

    assert len(hit_lines()) == 2 and all('replica="' in line for line in hit_lines())
    assert wait_for(lambda: holder_hits() >= 5 * 9, timeout_s=30), hit_lines()


def test_session_header_pins_a_replica(ingress: Server) -> None:
    c = openai.OpenAI(base_url=ingress.url + "/v1", api_key="unused", max_retries=0,
                      default_headers={"x-session-id": "chat-42"})
    before = {r["id"]: r["routed"].get("session", 0) for r in live(ingress)}
    for prompt in PROMPTS:
        c.completions.create(model="tiny", prompt=prompt, max_tokens=2, temperature=0.0)
    after = {r["id"]: r["routed"].get("session", 0) for r in live(ingress)}
    assert sorted(after[r] - before.get(r, 0) for r in after) == [0, len(PROMPTS) - 1]


STRATEGIES = ({"strategy": "majority", "budget": 3}, {"strategy": "bon", "budget": 3, "verifier": "task",
                                                       "reference": "17", "extractor": "number"})


def _scaled(server: Server, extra: dict[str, Any], max_tokens: int = 8, **kw: Any) -> dict[str, Any]:
    out = client(server).completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=max_tokens,
                                            extra_body=extra, **kw)
    return out.model_dump()  # type: ignore[no-any-return]


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_strategy_requests_match_the_single_process_server(ingress: Server, single: Server, kind: str) -> None:
    """A strategy runs whole on one routed replica: same selection, candidates and text as one process."""
    for extra in STRATEGIES:
        got, want = _scaled(ingress, extra, **KINDS[kind]), _scaled(single, extra, **KINDS[kind])
        assert got["choices"] == want["choices"]
        assert got["scaling"] == want["scaling"] and len(got["scaling"]["candidates"]) == 3
        assert got["usage"]["scaling"]["num_samples"] == 3


def test_streamed_strategy_progress_matches(ingress: Server, single: Server) -> None:
    def run(server: Server) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        stream = client(server).chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": PROMPTS[1]}], max_tokens=8, temperature=1.0,
            seed=5, stream=True, extra_body=STRATEGIES[1])
        chunks = [c.model_dump() for c in stream]
        events = [{k: v for k, v in c["scaling_event"].items() if k not in ("request_id", "key")}
                  for c in chunks if c.get("scaling_event")]
        return events, chunks[-1]

    (got_events, got_final), (want_events, want_final) = run(ingress), run(single)
    kinds = [e["event"] for e in got_events]
    assert kinds.count("candidate") == 3 and kinds.count("score") == 3 and kinds[-1] == "selection"
    assert sorted(map(str, got_events)) == sorted(map(str, want_events))
    assert got_final["choices"] == want_final["choices"] and got_final["scaling"] == want_final["scaling"]


def test_bad_strategy_gives_the_same_400(ingress: Server, single: Server) -> None:
    for extra in ({"strategy": "telepathy"}, {"strategy": "majority", "budget": 0},
                  {"strategy": "bon", "verifier": "task"}):
        body = {"model": "tiny", "prompt": PROMPTS[0], "max_tokens": 4, **extra}
        got, want = (httpx.post(s.url + "/v1/completions", json=body, timeout=60) for s in (ingress, single))
        assert got.status_code == want.status_code == 400, got.text
        assert got.json() == want.json()


def _stream_and_act(ingress: Server, single: Server, act: Any, prompt: str, seed: int = 3) -> None:
    """Stream a long seeded request, call `act(request)` after its first chunks, check it is unchanged."""
    kw = {"temperature": 1.0, "seed": seed, "max_tokens": 480, "extra_body": {"ignore_eos": True}}
    want = complete(single, prompt, **kw)
    stream = client(ingress).completions.create(model="tiny", prompt=prompt, stream=True, **kw)
    it = iter(stream)
    head = [next(it) for _ in range(3)]
    flights = ingress.get("/v1/cluster/requests")["requests"]
    assert len(flights) == 1, flights
    act(flights[0])
    assert stream_text(head) + stream_text(it) == want


def _until_it_lands(ingress: Server, single: Server, act: Any, landed: Any, seed: int = 3) -> None:
    """The tiny model can finish a request on its replica before `act` reaches it (a loaded machine delays
    the client, not the replica): then the act had nothing to move and the stream was trivially whole.
    Try other prompts until the act met a running request; every try checks the stream."""
    for prompt in PROMPTS:
        _stream_and_act(ingress, single, act, prompt, seed)
        if landed():
            return
        assert wait_for(lambda: len(live(ingress)) == 2), ingress.get("/v1/cluster/replicas")
    pytest.fail(f"the act never met a running request in {len(PROMPTS)} tries")


BLOCK = 4  # the test servers' --block-size


def kv_counts(ingress: Server) -> dict[str, tuple[float, float]]:
    """Replica -> (migrated_kv_tokens, recomputed_tokens), as its last stats poll reported them."""
    return {r["id"]: (r["stats"].get("migrated_kv_tokens", 0.0), r["stats"].get("recomputed_tokens", 0.0))
            for r in ingress.get("/v1/cluster/replicas")["replicas"]}


class KVMoves:
    """What the replicas (still there) counted since `mark()`: KV tokens imported, tokens recomputed."""

    def __init__(self, ingress: Server) -> None:
        self.ingress = ingress
        self.before: dict[str, tuple[float, float]] = {}

    def mark(self) -> None:
        self.before = kv_counts(self.ingress)

    def delta(self) -> tuple[float, float]:
        now = kv_counts(self.ingress)
        zero = (0.0, 0.0)
        return (sum(v[0] - self.before.get(k, zero)[0] for k, v in now.items()),
                sum(v[1] - self.before.get(k, zero)[1] for k, v in now.items()))

    def resumed(self) -> bool:
        """A resume was counted (stats are polled: wait for it)."""
        return wait_for(lambda: self.delta()[1] > 0, timeout_s=30)


def test_live_migration_keeps_the_stream(ingress: Server, single: Server) -> None:
    """KV blocks move (the default): the target recomputes only the last partial block."""
    moves: list[Any] = []
    kv = KVMoves(ingress)
    before = ingress.get("/v1/cluster/replicas")["migrations"]

    def migrate(flight: dict[str, Any]) -> None:
        kv.mark()
        moves.append(ingress.post("/v1/cluster/migrate", {"request_id": flight["id"]}))

    # moved, and not just as the old replica finished (then nothing is left to export: it recomputes)
    _until_it_lands(ingress, single, migrate, lambda: moves[-1]["moved"] == 1 and kv.resumed() and kv.delta()[0] > 0)
    migrated, recomputed = kv.delta()
    assert migrated >= BLOCK and 1 <= recomputed <= BLOCK, (migrated, recomputed)
    status = ingress.get("/v1/cluster/replicas")
    assert status["migrations"] > before and status["kv_migration"] == "blocks"
    assert status["migrated_kv_tokens"] >= migrated
    metrics = httpx.get(ingress.url + "/metrics", timeout=30).text
    assert "mixserve:migrated_kv_tokens_total{" in metrics and "mixserve:recomputed_tokens_total{" in metrics


def test_migration_can_recompute(ingress: Server, single: Server) -> None:
    """`{"kv": "recompute"}`: no KV moves; the target recomputes what the client had (the stream is whole)."""
    moves: list[Any] = []
    kv = KVMoves(ingress)

    def migrate(flight: dict[str, Any]) -> None:
        kv.mark()
        moves.append(ingress.post("/v1/cluster/migrate", {"request_id": flight["id"], "kv": "recompute"}))

    _until_it_lands(ingress, single, migrate, lambda: moves[-1]["moved"] == 1 and kv.resumed(), seed=4)
    migrated, recomputed = kv.delta()
    assert migrated == 0 and recomputed >= 1, (migrated, recomputed)
    bad = httpx.post(ingress.url + "/v1/cluster/migrate", json={"request_id": "x", "kv": "telepathy"}, timeout=30)
    assert bad.status_code == 400 and "kv" in bad.text


def test_drain_then_add_a_replica(ingress: Server, single: Server) -> None:
    drained: list[Any] = []
    kv = KVMoves(ingress)

    def drain(flight: dict[str, Any]) -> None:
        kv.mark()
        drained.append(ingress.post(f"/v1/cluster/replicas/{flight['replicas'][0]}/drain"))

    def landed() -> bool:
        if drained[-1]["migrated"] == 1 and kv.resumed() and kv.delta()[0] > 0:
            return True
        if len(live(ingress)) < 2:
            ingress.post("/v1/cluster/replicas")  # put a replica back, try again
        return False

    _until_it_lands(ingress, single, drain, landed)
    migrated, recomputed = kv.delta()
    assert migrated >= BLOCK and 1 <= recomputed <= BLOCK, (migrated, recomputed)
    assert len(live(ingress)) == 1
    added = ingress.post("/v1/cluster/replicas")
    assert added["state"] == "ready", added
    assert len(live(ingress)) == 2
    assert complete(ingress, PROMPTS[1], max_tokens=8, temperature=0.0) == \
        complete(single, PROMPTS[1], max_tokens=8, temperature=0.0)


def test_killed_replica_loses_nothing_and_is_replaced(ingress: Server, single: Server) -> None:
    killed: list[str] = []
    before = ingress.get("/v1/cluster/replicas")["failovers"]

    def kill(flight: dict[str, Any]) -> None:
        pids = {r["id"]: r["pid"] for r in live(ingress)}
        replica = flight["replicas"][0]
        os.kill(pids[replica], signal.SIGKILL)
        killed.append(replica)

    def landed() -> bool:
        status = ingress.get("/v1/cluster/replicas")
        return status["failovers"] > before

    _until_it_lands(ingress, single, kill, landed)
    status = ingress.get("/v1/cluster/replicas")
    assert status["deaths"] >= 1, status
    assert wait_for(lambda: len(live(ingress)) == 2), ingress.get("/v1/cluster/replicas")
    assert not set(killed) & {r["id"] for r in live(ingress)}


def test_killed_replica_mid_strategy_reruns_it(ingress: Server, single: Server) -> None:
    """The replica running a strategy dies: the strategy reruns elsewhere with the same candidates."""
    extra, kw = {"strategy": "majority", "budget": 3, "ignore_eos": True}, {"temperature": 1.0, "seed": 9}
    want = _scaled(single, extra, max_tokens=480, **kw)
    before = ingress.get("/v1/cluster/replicas")["strategy_reruns"]
    for _ in range(3):
        assert wait_for(lambda: len(live(ingress)) == 2), ingress.get("/v1/cluster/replicas")
        with ThreadPoolExecutor(1) as threads:
            future = threads.submit(_scaled, ingress, extra, 480, **kw)
            running: list[dict[str, Any]] = []
            deadline = time.monotonic() + 60
            while not running and not future.done() and time.monotonic() < deadline:
                running = ingress.get("/v1/cluster/requests")["strategies"]
            if running:
                pids = {r["id"]: r["pid"] for r in live(ingress)}
                os.kill(pids[running[0]["replicas"][0]], signal.SIGKILL)
            got = future.result(timeout=300)
        assert got["choices"] == want["choices"] and got["scaling"] == want["scaling"]
        if ingress.get("/v1/cluster/replicas")["strategy_reruns"] > before:
            break
    else:
        pytest.fail("the kill never met a running strategy in 3 tries")
    assert wait_for(lambda: len(live(ingress)) == 2), ingress.get("/v1/cluster/replicas")
