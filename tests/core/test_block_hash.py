"""Block hashes: the same tokens hash the same in every process (a cache shared across processes
or restarts needs that), and every input of the chain changes the hash."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pagedllm
from pagedllm.core.block_hash import ROOT_HASH, extend_block_hashes, hash_block_tokens

TOKENS = [5, 70000, 0, 2**31 - 1, 17, 17, 17, 17, 9]

_SCRIPT = f"""
import json
from pagedllm.core.block_hash import ROOT_HASH, extend_block_hashes, hash_block_tokens
hashes = []
extend_block_hashes(hashes, {TOKENS}, 4, {len(TOKENS)})
print(json.dumps([ROOT_HASH, hashes, hash_block_tokens(ROOT_HASH, [1, 2], ("lora", 3))]))
"""


def hashes_in_new_process(hash_seed: str) -> list:
    src_dir = str(Path(pagedllm.__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONHASHSEED=hash_seed,
               PYTHONPATH=os.pathsep.join(filter(None, [src_dir, os.environ.get("PYTHONPATH")])))
    result = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True,
                            text=True, check=True, timeout=60)
    return json.loads(result.stdout)


def test_block_hashes_are_the_same_in_every_process():
    # Two interpreters whose str hashes differ (salted by PYTHONHASHSEED) agree on every hash.
    first, second = hashes_in_new_process("1"), hashes_in_new_process("2")
    assert first == second
    hashes: list[int] = []
    extend_block_hashes(hashes, TOKENS, 4, len(TOKENS))
    assert first == [ROOT_HASH, hashes, hash_block_tokens(ROOT_HASH, [1, 2], ("lora", 3))]
    assert len(hashes) == 2  # token 9 does not fill a block


def test_every_input_changes_the_hash():
    base = hash_block_tokens(ROOT_HASH, [1, 2, 3, 4])
    assert 0 <= base < 2**64
    assert hash_block_tokens(ROOT_HASH, [1, 2, 3, 4]) == base
    assert hash_block_tokens(ROOT_HASH, [1, 2, 4, 3]) != base
    assert hash_block_tokens(base, [1, 2, 3, 4]) != base
    assert hash_block_tokens(ROOT_HASH, [1, 2, 3, 4], ("lora", 1)) != base
    assert hash_block_tokens(ROOT_HASH, [1, 2, 3, 4], ("lora", 2)) != hash_block_tokens(
        ROOT_HASH, [1, 2, 3, 4], ("lora", 1))
