"""The grammar backend (llguidance) and the compile manager, on SmolLM2's tokenizer: validation
errors name the field, grammars accept what the constraint accepts and mask the rest, roll back
and copy, and each distinct constraint compiles once, off the caller's thread."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from pagedllm.sampling_params import StructuredOutputsParams
from pagedllm.structured_output.backend import make_backend
from pagedllm.structured_output.manager import StructuredOutputManager

VOCAB = 49152


def grammar_for(manager, **constraint):
    return manager.compile(StructuredOutputsParams(**constraint)).result(timeout=60).copy()


def allowed(grammar) -> np.ndarray:
    bitmask = np.zeros((1, (grammar.vocab_size + 31) // 32), dtype=np.int32)
    grammar.fill_bitmask(bitmask, 0)
    return np.flatnonzero(np.unpackbits(bitmask.view(np.uint8), bitorder="little"))


def accepts_text(grammar, tokenizer, text: str) -> bool:
    """Feeds `text` token by token, each checked against the mask first; then EOS."""
    for token in tokenizer.encode(text):
        if token not in allowed(grammar) or not grammar.accept_tokens([token]):
            return False
    eos = tokenizer.eos_token_id
    return eos in allowed(grammar) and grammar.accept_tokens([eos]) and grammar.is_terminated()


@pytest.mark.parametrize("constraint, fragments", [
    ({"regex": "[0-9"}, ["structured_outputs.regex", "unclosed character class"]),
    ({"json": {"type": "strnig"}}, ["structured_outputs.json", "strnig"]),
    ({"json": {"type": "object", "dependentSchemas": {"a": {}}}},
     ["structured_outputs.json", "dependentSchemas"]),
    ({"json": {"type": "string", "pattern": "[a-"}}, ["structured_outputs.json", "regex"]),
    ({"grammar": "start: foo"}, ["structured_outputs.grammar", "foo"]),
    ({"grammar": "root ::= \"a\" ("}, ["structured_outputs.grammar"]),
    ({"json_object": True, "whitespace_pattern": "[ "}, ["structured_outputs.json_object"]),
])
def test_invalid_constraints_are_value_errors_naming_the_field(manager, constraint, fragments):
    before = manager.num_compiles
    with pytest.raises(ValueError) as info:
        manager.compile(StructuredOutputsParams(**constraint))
    for fragment in fragments:
        assert fragment in str(info.value)
    assert manager.num_compiles == before  # nothing was submitted


def test_json_schema_grammar(manager, tokenizer):
    schema = {"type": "object", "properties": {
        "name": {"type": "string", "pattern": "^[A-Z][a-z]+$"},
        "age": {"type": "integer", "minimum": 0, "maximum": 120}},
        "required": ["name", "age"], "additionalProperties": False}
    assert accepts_text(grammar_for(manager, json=schema), tokenizer,
                        '{"name": "Ada", "age": 36}')
    assert not accepts_text(grammar_for(manager, json=schema), tokenizer,
                            '{"name": "Ada", "age": 360}')
    assert not accepts_text(grammar_for(manager, json=schema, disable_any_whitespace=True),
                            tokenizer, '{"name": "Ada", "age": 36}')
    assert accepts_text(grammar_for(manager, json=schema, disable_any_whitespace=True),
                        tokenizer, '{"name":"Ada","age":36}')


def test_regex_choice_grammar_and_json_object(manager, tokenizer):
    assert accepts_text(grammar_for(manager, regex=r"\d{3}-[a-z]+"), tokenizer, "123-abc")
    assert not accepts_text(grammar_for(manager, regex=r"\d{3}-[a-z]+"), tokenizer, "12-abc")
    assert accepts_text(grammar_for(manager, choice=["yes", "no"]), tokenizer, "no")
    assert not accepts_text(grammar_for(manager, choice=["yes", "no"]), tokenizer, "maybe")
    lark = 'start: expr\nexpr: NUMBER | expr "+" expr | "(" expr ")"\nNUMBER: /[0-9]+/'
    assert accepts_text(grammar_for(manager, grammar=lark), tokenizer, "(1+23)+4")
    gbnf = 'root ::= "a" ("b" | "c")*'
    assert accepts_text(grammar_for(manager, grammar=gbnf), tokenizer, "abcb")
    assert accepts_text(grammar_for(manager, json_object=True), tokenizer, '{"x": [1, {}]}')
    assert not accepts_text(grammar_for(manager, json_object=True), tokenizer, "[1]")


def test_choices_past_the_parsers_row_limit_and_prefixes_of_each_other(manager, tokenizer):
    # As alternatives of one rule, llguidance's parser refused the first token of a list over
    # 2,000 choices; as one terminal, the lexer takes any number.
    words = [f"word{i:05d}" for i in range(5000)]
    grammar = grammar_for(manager, choice=words)
    assert accepts_text(grammar.copy(), tokenizer, "word04321")
    assert not accepts_text(grammar.copy(), tokenizer, "word5")
    assert not accepts_text(grammar, tokenizer, "word04321 ")
    both = grammar_for(manager, choice=["yes", "yes please", 'a "quoted" \\ choice'])
    assert accepts_text(both.copy(), tokenizer, "yes")
    assert accepts_text(both.copy(), tokenizer, "yes please")
    assert accepts_text(both, tokenizer, 'a "quoted" \\ choice')


def test_the_first_mask_is_built_on_the_compile_thread(tokenizer):
    # A large grammar builds lexer states on its first mask: on the compile thread, not in
    # the engine loop's first step with it.
    manager = StructuredOutputManager(tokenizer, VOCAB)
    threads = []
    compile_ = manager.backend.compile

    def compile_and_watch(params):
        grammar = compile_(params)
        fill = grammar.fill_bitmask
        grammar.fill_bitmask = lambda bitmask, row: (
            threads.append(threading.current_thread().name), fill(bitmask, row))[1]
        return grammar

    manager.backend.compile = compile_and_watch
    try:
        manager.compile(StructuredOutputsParams(regex="[a-z]+")).result(timeout=60)
    finally:
        manager.shutdown()
    assert len(threads) == 1 and threads[0].startswith("pagedllm-grammar")


def test_eos_only_where_the_text_may_end(manager, tokenizer):
    grammar = grammar_for(manager, regex="a+b?")
    eos = tokenizer.eos_token_id
    assert eos not in allowed(grammar)
    grammar.accept_tokens(tokenizer.encode("aa"))
    assert eos in allowed(grammar) and not grammar.is_terminated()
    grammar.accept_tokens(tokenizer.encode("b"))
    assert allowed(grammar).tolist() == [eos] and grammar.is_terminated()


def test_a_refused_token_leaves_eos_alone(manager, tokenizer):
    grammar = grammar_for(manager, choice=["yes"])
    assert not grammar.accept_tokens(tokenizer.encode("no"))
    assert grammar.error and grammar.is_terminated()
    assert allowed(grammar).tolist() == [tokenizer.eos_token_id]


def test_rollback_and_copy(manager, tokenizer):
    grammar = grammar_for(manager, choice=["abc", "abd"])
    start = allowed(grammar).tolist()
    tokens = tokenizer.encode("ab")
    assert grammar.validate_tokens(tokens) == len(tokens)
    grammar.accept_tokens(tokens)
    after = allowed(grammar).tolist()
    twin = grammar.copy()
    grammar.rollback(len(tokens))
    assert allowed(grammar).tolist() == start
    assert allowed(twin).tolist() == after  # the copy kept its own state


def test_each_constraint_compiles_once_on_the_compile_thread(tokenizer):
    manager = StructuredOutputManager(tokenizer, VOCAB)
    threads = []
    compile_ = manager.backend.compile
    manager.backend.compile = lambda params: (threads.append(threading.current_thread().name),
                                              compile_(params))[1]
    try:
        a = manager.compile(StructuredOutputsParams(json={"type": "object", "properties": {
            "b": {"type": "integer"}, "a": {"type": "integer"}}}))
        again = manager.compile(StructuredOutputsParams(json='{"type": "object", "properties":'
                                                        ' {"b": {"type": "integer"},'
                                                        ' "a": {"type": "integer"}}}'))
        # Another property order generates in another order: another grammar.
        reordered = manager.compile(StructuredOutputsParams(json={"type": "object", "properties": {
            "a": {"type": "integer"}, "b": {"type": "integer"}}}))
        compact = manager.compile(StructuredOutputsParams(json_object=True,
                                                          disable_any_whitespace=True))
        loose = manager.compile(StructuredOutputsParams(json_object=True))
        for future in (a, reordered, compact, loose):
            future.result(timeout=60)
        assert again is a
        assert len({id(f) for f in (a, reordered, compact, loose)}) == 4
        assert manager.num_compiles == 4
        assert len(threads) == 4 and all(name.startswith("pagedllm-grammar") for name in threads)
    finally:
        manager.shutdown()


def test_unknown_backend_is_a_value_error(tokenizer):
    with pytest.raises(ValueError, match="guidance"):
        make_backend("nope", tokenizer, VOCAB)


def test_a_compile_that_fails_leaves_eos_alone(tokenizer, caplog):
    manager = StructuredOutputManager(tokenizer, VOCAB)

    def broken(params):
        raise RuntimeError("no tables")

    manager.backend.compile = broken
    try:
        grammar = manager.compile(StructuredOutputsParams(regex="a+")).result(timeout=60).copy()
    finally:
        manager.shutdown()
    assert "failed to compile" in caplog.text
    assert allowed(grammar).tolist() == [tokenizer.eos_token_id]
    assert grammar.is_terminated() and grammar.error
