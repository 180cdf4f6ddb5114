"""Structured outputs through the offline API (`LLM.generate`): SmolLM2 under a JSON schema, a
regex, a choice and a Lark grammar; a tiny random model (fast) for preemption, parallel
samples, a slow compile and bad input."""

from __future__ import annotations

import ast
import json
import re
import threading

import jsonschema
import pytest

from pagedllm import LLM
from pagedllm.sampling_params import SamplingParams, StructuredOutputsParams

# Nested objects, bounded arrays, enums, required and optional fields, ranges and patterns.
# NOTE: every string is bounded and additionalProperties is false, so every output ends
# within max_tokens whatever the model picks.
PERSON_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "pattern": "^[A-Z][a-z]{1,11}$"},
        "age": {"type": "integer", "minimum": 18, "maximum": 99},
        "height_m": {"type": "number", "minimum": 1.2, "maximum": 2.3},
        "role": {"enum": ["engineer", "artist", "doctor", "teacher"]},
        "skills": {"type": "array", "items": {"type": "string", "pattern": "^[a-z]{2,10}$"},
                   "minItems": 1, "maxItems": 3},
        "address": {"type": "object", "properties": {
            "city": {"type": "string", "pattern": "^[A-Z][a-z]{1,14}$"},
            "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["city"], "additionalProperties": False},
        "nickname": {"type": "string", "maxLength": 12},
    },
    "required": ["name", "age", "role", "skills", "address"],
    "additionalProperties": False,
}
# A short bounded schema the tiny random model always completes.
SMALL_SCHEMA = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 0, "maximum": 999},
        "kind": {"enum": ["a", "b", "c"]},
        "tags": {"type": "array", "items": {"type": "string", "pattern": "^[a-z]{1,4}$"},
                 "maxItems": 2},
    },
    "required": ["id", "kind", "tags"],
    "additionalProperties": False,
}
DATE = r"(19|20)[0-9]{2}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])"
ARITHMETIC = """
start: expr
expr: term (("+" | "-") term)*
term: NUMBER | "(" expr ")"
NUMBER: /[1-9][0-9]{0,2}/
"""


def constrained(max_tokens: int = 64, temperature: float = 1.0, **constraint) -> SamplingParams:
    return SamplingParams(temperature=temperature, max_tokens=max_tokens,
                          structured_outputs=StructuredOutputsParams(**constraint))


def assert_all_blocks_free(llm: LLM) -> None:
    stats = llm.llm_engine.get_stats()
    assert not llm.llm_engine.has_unfinished_requests()
    assert stats.num_free_blocks == stats.num_blocks


def is_arithmetic(text: str) -> bool:
    """Parses `text` as the ARITHMETIC grammar does: numbers, + and -, parentheses."""
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError:
        return False
    allowed = (ast.Expression, ast.BinOp, ast.Add, ast.Sub, ast.Constant)
    return (" " not in text and all(isinstance(node, allowed) for node in ast.walk(tree))
            and all(isinstance(n.value, int) for n in ast.walk(tree)
                    if isinstance(n, ast.Constant)))


@pytest.fixture(scope="module")
def smol(smollm2_dir) -> LLM:
    return LLM(str(smollm2_dir), num_kv_blocks=256)


@pytest.fixture(scope="module")
def tiny_dir(tiny_llama_factory):
    return tiny_llama_factory(num_heads=4, num_kv_heads=2, vocab_size=49152)


@pytest.fixture(scope="module")
def tiny(tiny_dir) -> LLM:
    return LLM(str(tiny_dir), num_kv_blocks=256, block_size=8)


# ---- SmolLM2 ----------------------------------------------------------------------------------

def test_json_schema_outputs_of_16_requests_at_temperature_1_validate(smol):
    jobs = ["pilot", "chef", "nurse", "coder", "farmer", "singer", "judge", "baker"]
    prompts = [f"Write a JSON profile of a {job} (person {i}):" for i, job in
               enumerate(jobs * 2)]
    outputs = smol.generate(prompts, constrained(max_tokens=200, json=PERSON_SCHEMA),
                            use_tqdm=False)
    assert len(outputs) == 16
    for output in outputs:
        completion = output.outputs[0]
        assert completion.finish_reason == "stop", completion.text
        jsonschema.validate(json.loads(completion.text), PERSON_SCHEMA)
    assert len({o.outputs[0].text for o in outputs}) > 1  # sampled, not one answer 16 times
    assert_all_blocks_free(smol)


def test_json_object_gives_an_object(smol):
    out = smol.generate(["Give a JSON object describing a cat:"],
                        constrained(max_tokens=200, temperature=0.0, json_object=True,
                                    disable_any_whitespace=True), use_tqdm=False)
    assert isinstance(json.loads(out[0].outputs[0].text), dict)


def test_regex_outputs_fully_match(smol):
    outputs = smol.generate([f"Date of event {i}:" for i in range(4)],
                            constrained(regex=DATE), use_tqdm=False)
    for output in outputs:
        assert re.fullmatch(DATE, output.outputs[0].text), output.outputs[0].text
        assert output.outputs[0].finish_reason == "stop"


def test_each_parallel_sample_is_one_of_the_choices(smol):
    choices = ["Paris", "London", "Rome", "a city on the river Danube"]
    out = smol.generate(["The capital of France is"],
                        SamplingParams(n=4, temperature=1.5, seed=3, max_tokens=32,
                                       structured_outputs=StructuredOutputsParams(
                                           choice=choices)), use_tqdm=False)
    texts = [c.text for c in out[0].outputs]
    assert len(texts) == 4 and all(text in choices for text in texts), texts


def test_lark_grammar_outputs_parse(smol):
    outputs = smol.generate(["An arithmetic expression:", "Compute"],
                            constrained(max_tokens=48, grammar=ARITHMETIC), use_tqdm=False)
    for output in outputs:
        completion = output.outputs[0]
        if completion.finish_reason == "stop":
            assert is_arithmetic(completion.text), completion.text
        else:  # cut by max_tokens: still a prefix the grammar accepts
            assert re.fullmatch(r"[0-9+\-()]*", completion.text), completion.text


# ---- tiny model ---------------------------------------------------------------------------

def workload() -> tuple[list[dict], list[SamplingParams]]:
    prompts = [{"prompt_token_ids": [5 + i] * (6 + i)} for i in range(8)]
    params = [
        constrained(max_tokens=48, temperature=0.0, json=SMALL_SCHEMA,
                    disable_any_whitespace=True),
        constrained(max_tokens=48, temperature=0.0, regex=DATE),
        constrained(max_tokens=48, temperature=0.0, choice=["alpha", "beta", "gamma"]),
        SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True),  # unconstrained
        constrained(max_tokens=48, temperature=0.0, json=SMALL_SCHEMA,
                    disable_any_whitespace=True),
        SamplingParams(n=2, temperature=1.0, seed=11, max_tokens=48,
                       structured_outputs=StructuredOutputsParams(json=SMALL_SCHEMA,
                                                                  disable_any_whitespace=True)),
        constrained(max_tokens=48, temperature=0.0, grammar=ARITHMETIC),
        constrained(max_tokens=48, temperature=0.0, regex=DATE),
    ]
    return prompts, params


def texts_of(llm: LLM) -> list[list[str]]:
    prompts, params = workload()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    return [[c.text for c in sorted(o.outputs, key=lambda c: c.index)] for o in outputs]


def assert_valid(texts: list[list[str]]) -> None:
    for i in (0, 4):
        jsonschema.validate(json.loads(texts[i][0]), SMALL_SCHEMA)
    for sample in texts[5]:
        jsonschema.validate(json.loads(sample), SMALL_SCHEMA)
    assert re.fullmatch(DATE, texts[1][0]) and re.fullmatch(DATE, texts[7][0])
    assert texts[2][0] in ("alpha", "beta", "gamma")


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_preempted_constrained_outputs_equal_a_large_pool(tiny, tiny_dir, mode):
    expected = texts_of(tiny)
    assert_valid(expected)
    # 16 blocks of 8 tokens: the 9 sequences (up to 61 tokens each) cannot all run at once.
    small = LLM(str(tiny_dir), num_kv_blocks=16, block_size=8, preemption_mode=mode,
                swap_space=0.01)
    assert texts_of(small) == expected
    stats = small.llm_engine.get_stats()
    assert stats.num_preemptions > 0
    if mode == "swap":
        assert stats.num_swap_outs > 0
    assert_all_blocks_free(small)


def test_a_slow_compile_does_not_stall_other_requests(tiny):
    engine = tiny.llm_engine
    manager = engine.input_processor.structured_output
    release = threading.Event()
    compile_ = manager.backend.compile

    def slow_compile(params):
        release.wait(timeout=30)
        return compile_(params)

    manager.backend.compile = slow_compile
    try:
        engine.add_request("slow", {"prompt_token_ids": [7] * 5},
                           constrained(max_tokens=8, temperature=0.0, regex="slow[0-9]{3}"))
        engine.add_request("free", {"prompt_token_ids": [9] * 5},
                           SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True))
        finished = {}
        while "free" not in finished:
            for output in engine.step():
                if output.finished:
                    finished[output.request_id] = output
        assert engine.scheduler.requests["slow"].seqs[0].num_output_tokens == 0
        release.set()
        while engine.has_unfinished_requests():
            for output in engine.step():
                if output.finished:
                    finished[output.request_id] = output
    finally:
        manager.backend.compile = compile_
        release.set()
    assert re.fullmatch(r"slow[0-9]{3}", finished["slow"].outputs[0].text)


@pytest.mark.parametrize("constraint, field, fragment", [
    ({"json": {"type": "object", "properties": {"a": {"type": "strnig"}}}},
     "structured_outputs.json", "strnig"),
    ({"json": {"type": "object", "dependentSchemas": {"a": {}}}}, "structured_outputs.json",
     "dependentSchemas"),
    ({"regex": "([a-z]+"}, "structured_outputs.regex", "regex"),
    ({"grammar": "start: missing_rule"}, "structured_outputs.grammar", "missing_rule"),
])
def test_a_bad_constraint_is_refused_before_any_work(tiny, constraint, field, fragment):
    prompts = [{"prompt_token_ids": [5] * 4}] * 3
    params = [SamplingParams(max_tokens=4), constrained(**constraint), SamplingParams()]
    with pytest.raises(ValueError, match=rf"prompt 1: {re.escape(field)} is invalid: .*"
                                         rf"{re.escape(fragment)}"):
        tiny.generate(prompts, params, use_tqdm=False)
    assert_all_blocks_free(tiny)
    assert len(tiny.generate(prompts, SamplingParams(max_tokens=2), use_tqdm=False)) == 3


def test_one_constraint_per_request():
    with pytest.raises(ValueError, match="exactly one of .* got json and regex"):
        StructuredOutputsParams(json={"type": "object"}, regex="a+")
    with pytest.raises(ValueError, match="got none"):
        StructuredOutputsParams()
    with pytest.raises(ValueError, match="structured_outputs.json is not valid JSON"):
        StructuredOutputsParams(json="{not json")
    with pytest.raises(ValueError, match="structured_outputs must be a StructuredOutputsParams"):
        SamplingParams(structured_outputs={"regex": "a"})


def test_the_callers_params_stay_as_they_were(tiny):
    params = constrained(max_tokens=8, temperature=0.0, regex="[a-c]{3}")
    tiny.generate([{"prompt_token_ids": [5] * 4}] * 2, params, use_tqdm=False)
    assert params.structured_outputs.compiled is None
    assert params == constrained(max_tokens=8, temperature=0.0, regex="[a-c]{3}")
