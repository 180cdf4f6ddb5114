"""What a warm start imports: with the config record and the packed weights cached, `LLM()`
pulls in neither transformers, nor sympy (torch's symbolic shapes, about half a second, once reached through
Module.to_empty on the meta model) nor transformers' per-family config modules and the kernels
hub behind them (models/hf_fast.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

CHILD = r"""
import json, sys
from pagedllm import LLM
LLM(sys.argv[1], num_kv_blocks=16, block_size=8, dtype="bfloat16")
print("MODULES " + json.dumps(sorted({m.split(".")[0] for m in sys.modules})))
"""


def _start(model_dir, env) -> set[str]:
    result = subprocess.run([sys.executable, "-c", CHILD, str(model_dir)], env=env,
                            capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(ln for ln in result.stdout.splitlines() if ln.startswith("MODULES "))
    return set(json.loads(line[len("MODULES "):]))


def test_a_warm_start_imports_no_sympy_nor_the_kernels_hub(tiny_llama_factory, tmp_path):
    model_dir = tiny_llama_factory(num_heads=4, num_kv_heads=2)
    env = {**os.environ, "PAGEDLLM_PACKED_WEIGHT_CACHE_DIR": str(tmp_path / "packed"),
           "PAGEDLLM_HF_RECORD_DIR": str(tmp_path / "records")}
    env.pop("PAGEDLLM_PACKED_WEIGHT_CACHE", None)
    env.pop("PAGEDLLM_FAST_HF_LOAD", None)
    _start(model_dir, env)  # the first start writes the records and the packing
    modules = _start(model_dir, env)
    # The config and tokenizer come from their records (models/hf_fast.py, pagedllm/tokenizer.py).
    assert "torch" in modules and "transformers" not in modules
    assert not {"sympy", "kernels"} & modules, sorted({"sympy", "kernels"} & modules)
