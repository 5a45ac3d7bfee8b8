"""Structured outputs offline: constraint specs, states (fork, sync, free), and every constraint kind on
the embedded real model, unchanged by chunked prefill, preemption and prefix caching."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch

from mixserve import SamplingParams
from mixserve.config import CacheConfig, SchedulerConfig
from mixserve.llm import LLM
from mixserve.loading.checkpoint import Checkpoint
from mixserve.outputs import FinishReason
from mixserve.sample import Sampler, SamplingRow
from mixserve.sampling_params import SamplingError
from mixserve.structured import StructuredError, StructuredOutput
from mixserve.structured.constraints import Constraints
from tests.structured.schemas import generated_schemas

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                           "pets": {"type": "array", "items": {"enum": ["cat", "dog"]},
                                                    "maxItems": 2}},
          "required": ["name", "age"], "additionalProperties": False}
ASK = [{"role": "user", "content": "Describe a person as JSON."}]


# -- specs (no model) -------------------------------------------------------------------------------
@pytest.mark.parametrize(("kwargs", "field"), [
    ({"regex": "(["}, "structured.regex"),
    ({"json": {"type": "objekt"}}, "structured.json"),
    ({"json": "not json"}, "structured.json"),
    ({"grammar": "start: missing_rule"}, "structured.grammar"),
    ({"grammar": "root ::= [unclosed"}, "structured.grammar"),
    ({"choice": ()}, "structured.choice"),
    ({"choice": ("a", "")}, "structured.choice"),
    ({}, "structured"),
    ({"regex": "a", "choice": ("a",)}, "structured"),
])
def test_invalid_constraints_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(StructuredError) as info:
        StructuredOutput(**kwargs)
    assert info.value.field == field
    assert field in str(info.value)


def test_every_kind_compiles_and_gbnf_is_accepted() -> None:
    for spec in (StructuredOutput(json=PERSON), StructuredOutput(json_object=True), StructuredOutput(regex="a+b"),
                 StructuredOutput(choice=("x", "y")), StructuredOutput(grammar='start: "a" | "b"'),
                 StructuredOutput(grammar='root ::= "a" [0-9]+')):
        assert spec.compiled
    assert StructuredOutput(json=PERSON) == StructuredOutput(json=json.dumps(PERSON))
    assert StructuredOutput(json=PERSON).schema == PERSON


@pytest.mark.parametrize("conflict", [{"stop": ("}",)}, {"stop_token_ids": (5,)}, {"ignore_eos": True},
                                      {"min_tokens": 3}])
def test_params_reject_what_could_cut_a_constraint(conflict: dict) -> None:
    with pytest.raises(SamplingError, match="structured"):
        SamplingParams(structured=StructuredOutput(json_object=True), **conflict)


# -- states ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def constraints(smollm2_checkpoint: Checkpoint) -> Constraints:
    tok = smollm2_checkpoint.tokenizer
    return Constraints(tok.backend.to_str, int(smollm2_checkpoint.hf_config["vocab_size"]), tok.eos_token_ids)


def test_fork_keeps_independent_states(constraints: Constraints, smollm2_checkpoint: Checkpoint) -> None:
    tok = smollm2_checkpoint.tokenizer
    spec = StructuredOutput(choice=("apple pie", "banana split"))
    parent = constraints.new_state(spec)
    assert parent.sync([]) is None
    child = parent.fork()
    apple = tok.encode("apple pie", add_special_tokens=False)
    banana = tok.encode("banana split", add_special_tokens=False)
    assert parent.sync(apple) is None and parent.is_accepting
    assert not child.is_accepting and child.num_consumed == 0
    assert child.sync(banana) is None and child.is_accepting
    other = parent.fork()
    assert other.is_accepting and other.num_consumed == len(apple)
    assert other.sync(apple[:-1]) is None and not other.is_accepting  # rollback
    assert parent.is_accepting  # the copy's rollback left the original alone


def test_masks_allow_only_grammar_tokens_and_free_on_finish(constraints: Constraints,
                                                           smollm2_checkpoint: Checkpoint) -> None:
    tok = smollm2_checkpoint.tokenizer
    spec = StructuredOutput(regex="[0-9]{2}")
    masks = constraints.masks([("a", spec, []), ("b", spec, tok.encode("4", add_special_tokens=False))])
    assert set(masks.allowed) == {"a", "b"} and not masks.errors
    for rid in ("a", "b"):
        allowed_ids = masks.allowed[rid].nonzero().flatten().tolist()
        texts = {tok.decode([i]) for i in allowed_ids}
        assert texts and all(re.fullmatch(r"[0-9]{1,2}", t) for t in texts), sorted(texts)[:10]
    done = tok.encode("42", add_special_tokens=False)
    final = constraints.masks([("b", spec, done)]).allowed["b"]
    assert set(final.nonzero().flatten().tolist()) <= set(tok.eos_token_ids)
    constraints.free(["a", "b"])
    assert "a" not in constraints.states and "b" not in constraints.states


def test_sampler_never_picks_a_disallowed_token() -> None:
    vocab = 300
    logits = torch.randn(6, vocab) * 5
    allowed = torch.zeros(vocab, dtype=torch.bool)
    allowed[[7, 150, 299]] = True
    params = [SamplingParams(temperature=0), SamplingParams(temperature=1.0), SamplingParams(top_k=2),
              SamplingParams(top_p=0.5), SamplingParams(min_p=0.2), SamplingParams(temperature=0)]
    rows = [SamplingRow(p, [], [], None, allowed=allowed if i != 5 else None) for i, p in enumerate(params)]
    sampler = Sampler(torch.Generator().manual_seed(0))
    for _ in range(20):
        tokens = sampler(logits, rows).token_ids
        assert all(t in (7, 150, 299) for t in tokens[:5])
        assert tokens[5] == int(logits[5].argmax())


# -- the real model --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llm(smollm2_path: str) -> LLM:
    return LLM(smollm2_path, num_blocks=256, block_size=16, max_model_len=1024, weight_format="dense")


def test_every_kind_on_the_real_model(llm: LLM) -> None:
    cases = [
        (StructuredOutput(json=PERSON), lambda t: jsonschema.validate(json.loads(t), PERSON)),
        (StructuredOutput(json_object=True), lambda t: isinstance(json.loads(t), dict) or pytest.fail(t)),
        (StructuredOutput(regex=r"[A-Z][a-z]{2,8} [0-9]{1,3}"),
         lambda t: re.fullmatch(r"[A-Z][a-z]{2,8} [0-9]{1,3}", t) or pytest.fail(t)),
        (StructuredOutput(choice=("red", "green", "blue")), lambda t: t in ("red", "green", "blue") or pytest.fail(t)),
        (StructuredOutput(grammar='start: "Answer: " ("yes" | "no") "."'),
         lambda t: t in ("Answer: yes.", "Answer: no.") or pytest.fail(t)),
        (StructuredOutput(grammar='root ::= "id-" [0-9] [0-9] [0-9]'),
         lambda t: re.fullmatch(r"id-[0-9]{3}", t) or pytest.fail(t)),
    ]
    prompt = llm.chat_prompt(ASK)
    outs = [llm.generate(prompt, SamplingParams(n=2, temperature=0.9, seed=i, max_tokens=120, structured=spec))[0]
            for i, (spec, _) in enumerate(cases)]
    for (spec, check), out in zip(cases, outs):
        assert len(out.outputs) == 2
        for sample in out.outputs:
            assert sample.finish_reason is FinishReason.STOP, (spec.kind, sample)
            check(sample.text)
    assert not llm.engine.runner.constraints.states  # type: ignore[attr-defined]  # all freed


def test_generated_schemas_validate_offline(llm: LLM) -> None:
    prompt = llm.chat_prompt([{"role": "user", "content": "Describe an object as JSON."}])
    schemas = generated_schemas(8, seed=3)
    params = [SamplingParams(temperature=0.7, seed=i, max_tokens=150, structured=StructuredOutput(json=s))
              for i, s in enumerate(schemas)]
    outs = [llm.generate(prompt, p)[0] for p in params]
    for schema, out in zip(schemas, outs):
        sample = out.outputs[0]
        assert sample.finish_reason is FinishReason.STOP, (schema, sample.text)
        jsonschema.validate(json.loads(sample.text), schema)


def test_max_tokens_on_an_unfinished_constraint_is_length(llm: LLM) -> None:
    schema = {"type": "object", "properties": {"story": {"type": "string", "minLength": 300}}, "required": ["story"]}
    out = llm.generate("Tell a story:", SamplingParams(temperature=0, max_tokens=6,
                                                      structured=StructuredOutput(json=schema)))[0].outputs[0]
    assert out.finish_reason is FinishReason.LENGTH and len(out.token_ids) == 6
    assert out.text.startswith('{"story": "')


def _variant(llm: LLM, num_blocks: int = 256, block_size: int = 16, prefix: bool = True, budget: int = 512,
             max_model_len: int = 256) -> LLM:
    return llm.with_config(cache=CacheConfig(block_size=block_size, num_blocks=num_blocks,
                                             enable_prefix_caching=prefix),
                           scheduler=SchedulerConfig(max_num_batched_tokens=budget), max_model_len=max_model_len)


def test_chunked_prefill_preemption_and_prefix_cache_leave_constrained_output_unchanged(llm: LLM) -> None:
    prompts = [llm.chat_prompt([{"role": "user", "content": q}])
               for q in ("Describe a person as JSON.", "Give me JSON about a pet owner.", "JSON for a kid.")]
    params = SamplingParams(temperature=0, max_tokens=40, structured=StructuredOutput(json=PERSON))
    reference = [llm.generate(p, params)[0].outputs[0].token_ids for p in prompts]

    def run(engine: LLM) -> list[list[int]]:
        return [o.outputs[0].token_ids for o in engine.generate(prompts, params)]

    assert run(_variant(llm, budget=7, prefix=False)) == reference  # chunked prefill
    tight = _variant(llm, num_blocks=14, block_size=8, max_model_len=104)
    assert run(tight) == reference  # preemption
    assert tight.engine.scheduler.num_preemptions > 0
    cached = _variant(llm)
    assert run(cached) == reference and run(cached) == reference  # second run: prefix-cache hits
    assert cached.engine.scheduler.pool.num_hits > 0
    sampled = SamplingParams(n=4, temperature=1.0, seed=11, max_tokens=60, structured=StructuredOutput(json=PERSON))
    out = llm.generate(prompts[0], sampled)[0]  # n > 1: each fork has its own state
    for sample in out.outputs:
        jsonschema.validate(json.loads(sample.text), PERSON)
    assert len({s.text for s in out.outputs}) > 1


def test_cli_flags_build_the_constraint(tmp_path) -> None:  # noqa: ANN001
    import argparse

    from mixserve.structured.cli import add_structured_args, structured_from_args
    parser = argparse.ArgumentParser()
    add_structured_args(parser)
    schema = tmp_path / "s.json"
    schema.write_text(json.dumps(PERSON))
    spec = structured_from_args(parser.parse_args(["--json-schema", str(schema)]))
    assert spec is not None and spec.schema == PERSON
    assert structured_from_args(parser.parse_args([])) is None
    assert structured_from_args(parser.parse_args(["--choice", "a", "b"])) == StructuredOutput(choice=("a", "b"))
    (tmp_path / "bad.json").write_text("{nope")
    for argv, needle in ((["--json-schema", str(tmp_path / "bad.json")], "bad.json"),
                         (["--json-schema", str(tmp_path / "missing.json")], "missing.json"),
                         (["--regex", "a", "--json"], "only one")):
        with pytest.raises(StructuredError, match=needle):
            structured_from_args(parser.parse_args(argv))


def test_chat_with_tools_named_function(llm: LLM) -> None:
    from mixserve.structured.tools import chat_with_tools
    params = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 16}}, "required": ["city"],
              "additionalProperties": False}
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": params}}]
    answers = chat_with_tools(llm, [{"role": "user", "content": "Weather in Oslo?"}], tools,
                              tool_choice={"type": "function", "function": {"name": "get_weather"}},
                              params=SamplingParams(n=2, temperature=0.8, seed=1, max_tokens=60),
                              parallel_tool_calls=False)
    assert len(answers) == 2
    for answer in answers:
        assert answer.finish_reason == "tool_calls" and len(answer.tool_calls) == 1
        assert answer.tool_calls[0].name == "get_weather"
        jsonschema.validate(json.loads(answer.tool_calls[0].arguments), params)
