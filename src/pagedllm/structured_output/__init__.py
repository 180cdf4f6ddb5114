"""Structured outputs: constrained decoding under JSON schemas, regexes, choices and grammars.

The input processor validates each request's constraint and starts its compile
(`manager.StructuredOutputManager`); the scheduler (core) keeps one grammar per sequence,
advances it with each accepted token and builds the step's bitmask; the model runner applies
the bitmask to the logits before the sampler (`bitmask.apply_grammar_bitmask`). Only
`backend.py`'s implementations know the grammar library.
"""
