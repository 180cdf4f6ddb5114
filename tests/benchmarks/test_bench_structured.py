"""`bench structured`: a short run on a tiny model prints its table and writes its JSON, with both
arms generating the same tokens (the schema cannot end within max_tokens)."""

from __future__ import annotations

import json
import subprocess
import sys

from pagedllm.benchmarks.structured import readings_schema


def test_schema_cannot_end_before_its_minimum_of_readings():
    schema = readings_schema(3)
    readings = schema["properties"]["readings"]
    assert readings["minItems"] == 3 and schema["required"] == ["readings"]
    assert readings["items"]["required"] == ["sensor", "value"]


def test_short_structured_run_prints_its_table_and_writes_json(tiny_llama_factory, tmp_path):
    model = tiny_llama_factory(vocab_size=49152, hidden_size=32, num_layers=1)
    out = tmp_path / "structured.json"
    result = subprocess.run(
        [sys.executable, "-m", "pagedllm.benchmarks", "bench", "structured", "--model",
         str(model), "--dtype", "float32", "--num-requests", "3", "--input-len", "16",
         "--output-len", "12", "--min-items", "8", "--rounds", "1", "--single-rounds", "1",
         "--output-json", str(out)],
        check=False, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    header = next(line for line in lines if line.startswith("workload "))
    assert "out tok/s" in header
    assert all(f"mask {part} ms/step" in header for part in ("fill", "wait", "apply"))
    assert sum(line.startswith(("fixed 3 x 16/12", "single 1 x 16/12")) for line in lines) == 4
    assert "ended before max_tokens" not in result.stdout
    assert f"wrote {out}" in result.stdout
    runs = json.loads(out.read_text())["runs"]
    fixed, single = runs["fixed 3 x 16/12"], runs["single 1 x 16/12"]
    for run, num_requests in ((fixed, 3), (single, 1)):
        free, constrained = run["unconstrained"], run["json_schema"]
        assert free["output_tokens"] == constrained["output_tokens"] == 12 * num_requests
        assert constrained["num_cut_short"] == 0 and constrained["num_masked_steps"] > 0
        assert constrained["grammar_build_s"] > 0 and constrained["grammar_wait_s"] >= 0
        assert free["num_masked_steps"] == 0 and len(run["ratio_per_round"]) == 1
        assert constrained["sample_text"].startswith('{"readings":[')
