"""The dispatcher routes every output to its owner: streams, blocking callers and strategies share one
engine without losing each other's outputs, and a failing controller fails only itself."""

from __future__ import annotations

import pytest

from mixserve.engine.dispatcher import Dispatcher, run_until
from mixserve.engine.engine import Engine, RequestError
from mixserve.llm import LLM
from mixserve.outputs import RequestOutput
from mixserve.sampling_params import SamplingParams
from mixserve.scaling import make_strategy, run_strategy
from mixserve.scaling.synthetic import AnswerPolicy, AnswerSpec, WordTokenizer, make_synthetic_engine
from tests.engine.fake import make_engine

SPECS = {"1": AnswerSpec("42", 0.6, filler=(("42", 6), ("wrong", 2))),
         "2": AnswerSpec("7", 0.5, filler=(("7", 12), ("wrong", 12)))}
PARAMS = SamplingParams(temperature=1.0, max_tokens=64, seed=3)


def synthetic_llm() -> LLM:
    """An `LLM` over the synthetic engine (the real constructor needs a checkpoint)."""
    tok = WordTokenizer()
    llm = LLM.__new__(LLM)
    llm.engine = make_synthetic_engine(AnswerPolicy(SPECS), tok)
    llm.tokenizer = tok
    llm.dispatcher = Dispatcher(llm.engine, namespace="t")  # the same request ids in every run
    return llm


def majority(llm: LLM) -> object:
    return make_strategy("majority", llm.tokenizer.encode("Q1: solve\n"), 8, PARAMS, strategy_id="vote")


def test_a_stream_and_a_strategy_share_one_engine() -> None:
    alone = synthetic_llm()
    reference_text = "".join(d.outputs[0].text for d in alone.stream("Q2: solve\n", PARAMS))
    reference = run_strategy(alone.dispatcher, majority(alone))  # type: ignore[arg-type]

    llm = synthetic_llm()
    stream = llm.stream("Q2: solve\n", PARAMS)
    first = next(stream)
    shared = run_strategy(llm.dispatcher, majority(llm))  # type: ignore[arg-type]  # steps the stream too
    text = first.outputs[0].text + "".join(d.outputs[0].text for d in stream)

    assert text == reference_text and "Answer:" in text
    assert (shared.answer, [c.text for c in shared.candidates]) == \
        (reference.answer, [c.text for c in reference.candidates])
    assert not llm.engine.has_unfinished() and llm.dispatcher.num_owners == 0


def test_generate_runs_beside_an_unfinished_stream() -> None:
    llm = synthetic_llm()
    stream = llm.stream("Q2: solve\n", PARAMS)
    first = next(stream)
    outs = llm.generate(["Q1: solve\n", "Q2: solve\n"], PARAMS)
    assert all(o.finished and "Answer:" in o.outputs[0].text for o in outs)
    rest = list(stream)
    assert rest and rest[-1].finished and first.request_id == rest[-1].request_id


class Record:
    def __init__(self) -> None:
        self.outputs: list[RequestOutput] = []
        self.error: BaseException | None = None

    def put(self, out: RequestOutput) -> None:
        self.outputs.append(out)

    def fail(self, error: BaseException) -> None:
        self.error = error


class Exploding:
    """A controller whose second output raises."""

    def __init__(self) -> None:
        self.seen = 0
        self.cancelled = False

    @property
    def controller_id(self) -> str:
        return "boom"

    def start(self, engine: Engine) -> None:
        engine.add_request("boom/a", [1, 2, 3], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))

    def on_output(self, engine: Engine, out: RequestOutput) -> None:
        self.seen += 1
        if self.seen == 2:
            raise ValueError("verifier crashed")

    @property
    def done(self) -> bool:
        return False

    def cancel(self, engine: Engine) -> None:
        self.cancelled = True

    def result(self) -> None:
        return None


def test_a_failing_controller_fails_alone() -> None:
    engine = make_engine()
    d = Dispatcher(engine)
    sink = Record()
    finished: list[tuple[object, BaseException | None]] = []
    d.add("plain", [4, 5], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True), sink)
    boom = Exploding()
    d.start(boom, lambda result, error: finished.append((result, error)))
    run_until(d, lambda: bool(sink.outputs) and sink.outputs[-1].finished, "plain")
    assert len(finished) == 1 and isinstance(finished[0][1], ValueError) and boom.cancelled
    assert "boom/a" not in engine.groups  # its requests were aborted
    assert sum(len(o.outputs[0].token_ids) for o in sink.outputs) == 10
    assert d.num_owners == 0


def test_ids_are_unique_and_reserved_names_rejected() -> None:
    engine = make_engine()
    d = Dispatcher(engine)
    ids = {d.new_id("x") for _ in range(1000)}
    assert len(ids) == 1000 and all(i.startswith("x-") and "/" not in i for i in ids)
    with pytest.raises(RequestError, match="must not contain '/'"):
        d.add("a/b", [1], SamplingParams(), Record())
    assert not engine.groups
    d.add("same", [1], SamplingParams(max_tokens=2), Record())
    with pytest.raises(RequestError, match="already in use"):
        d.add("same", [1], SamplingParams(), Record())


def test_outputs_nobody_owns_are_dropped() -> None:
    engine = make_engine()
    d = Dispatcher(engine)
    engine.add_request("stray", [1, 2], SamplingParams(temperature=0, max_tokens=3))
    sink = Record()
    d.add("mine", [3], SamplingParams(temperature=0, max_tokens=3), sink)
    while engine.has_unfinished():
        d.step()
    assert {o.request_id for o in sink.outputs} == {"mine"}
