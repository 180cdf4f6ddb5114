"""`pagedllm bench startup`: each start in a fresh process, the engine's phases timed from the
process start, written as JSON."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

PHASES = ["imports", "config", "tokenizer", "weights read", "weights packed", "kv pool",
          "engine rest"]


def _bench(tmp_path, model, mode: str) -> tuple[dict, str]:
    out = tmp_path / "startup.json"
    result = subprocess.run(
        [sys.executable, "-m", "pagedllm.benchmarks", "bench", "startup", "--mode", mode,
         "--num-starts", "1", "--model", str(model), "--num-kv-blocks", "16",
         "--dtype", "float32", "--output-json", str(out)],
        capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr
    assert f"results written to {out}" in result.stdout
    return json.loads(out.read_text()), result.stdout


def test_llm_starts_are_timed_by_phase(tmp_path, tiny_llama_factory):
    data, stdout = _bench(tmp_path, tiny_llama_factory(), "llm")
    assert data["engine_kwargs"]["num_kv_blocks"] == 16 and "serve" not in data
    for start in ("cold", "warm"):
        row = data["llm"][start]
        assert list(row["phases"]) == PHASES
        assert all(s >= 0 for s in row["phases"].values())
        # ready = process start to LLM() returned: the phases plus LLM()'s own tail
        assert sum(row["phases"].values()) <= row["ready_s"] + 1e-3
        assert row["first_forward_s"] > 0 and row["peak_rss_mib"] >= row["idle_rss_mib"] > 0
        assert row["ready_cpu_s"] > 0
    assert "LLM() ready" in stdout and "kv pool" in stdout


@pytest.mark.slow
def test_server_starts_are_timed_to_the_first_health_200(tmp_path, tiny_llama_factory):
    data, stdout = _bench(tmp_path, tiny_llama_factory(), "serve")
    for row in (data["serve"]["cold"], data["serve"]["warm"]):
        assert row["health_s"] > 0 and row["peak_rss_mib"] >= row["idle_rss_mib"] > 0
        assert row["health_cpu_s"] > 0
    assert "/health 200" in stdout


def test_bad_flags_are_refused():
    import argparse

    from pagedllm.benchmarks.startup import add_cli_args, check_args

    parser = argparse.ArgumentParser()
    add_cli_args(parser)
    with pytest.raises(ValueError, match="--num-starts"):
        check_args(parser.parse_args(["--num-starts", "0"]))
