"""Fixtures of the structured-output tests: SmolLM2's tokenizer and a manager over it."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from pagedllm.structured_output.manager import StructuredOutputManager

VOCAB = 49152


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)


@pytest.fixture(scope="module")
def manager(tokenizer):
    manager = StructuredOutputManager(tokenizer, VOCAB)
    yield manager
    manager.shutdown()
