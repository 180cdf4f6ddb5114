"""The throughput benchmark's rounds: engines stay loaded, take turns, and report their median."""

from __future__ import annotations

import json

from pagedllm.benchmarks import throughput
from pagedllm.benchmarks.workloads import make_requests, round_requests


def _round(elapsed: float) -> dict:
    return {"num_requests": 2, "prompt_tokens": 20, "output_tokens": 100, "elapsed_s": elapsed,
            "peak_rss_gib": elapsed / 100}


def test_summary_is_the_median_round_and_keeps_every_round():
    ready = {"startup_s": 1.0, "first_token_s": 1.5}
    row = throughput.summarize("pagedllm", "float32", "fixed", ready,
                               [_round(10.0), _round(40.0), _round(20.0)])
    assert row["elapsed_s"] == 20.0
    assert row["output_tokens_per_s"] == 5.0
    assert row["peak_rss_gib"] == 0.4
    assert row["rounds_output_tokens_per_s"] == [10.0, 2.5, 5.0]
    assert row["startup_s"] == 1.0


def test_summary_skips_failed_rounds_and_reports_an_engine_that_never_ran():
    ready = {"startup_s": 1.0, "first_token_s": 1.5}
    row = throughput.summarize("vllm", "float32", "fixed", ready,
                               [{"error": "exit 1"}, _round(25.0)])
    assert row["elapsed_s"] == 25.0 and row["rounds_output_tokens_per_s"] == [None, 4.0]
    row = throughput.summarize("vllm", "float32", "fixed", {"error": "cannot start"}, [])
    assert row["error"] == "cannot start"


def test_engines_take_turns_over_rounds(tiny_llama_factory, tmp_path, monkeypatch, capfd):
    model = tiny_llama_factory(vocab_size=49152, hidden_size=32, num_layers=1)
    out = tmp_path / "throughput.json"
    monkeypatch.setattr(throughput, "measure_matmul_peak",
                        lambda: {"float32": {"torch.matmul": 100.0}})
    assert throughput.main([
        "--engines", "pagedllm:float32", "transformers:float32",
        "--workload", "single", "--rounds", "2", "--transformers-batch-sizes", "1",
        "--vllm-python", str(tmp_path / "no-such-python"), "--model", str(model),
        "--output-json", str(out), "--disable-tqdm"]) == 0
    text = capfd.readouterr().out
    turns = [line for line in text.splitlines() if line.startswith("--- ") and " on " in line]
    assert turns == ["--- pagedllm (float32) on single ---",
                     "--- transformers (float32) on single ---",
                     "--- transformers (float32) on single ---",
                     "--- pagedllm (float32) on single ---"]
    rows = {r["engine"]: r for r in json.loads(out.read_text())["results"]}
    for name in ("pagedllm", "transformers"):
        assert rows[name]["output_tokens"] == 128
        assert len(rows[name]["rounds_output_tokens_per_s"]) == 2
        assert rows[name]["startup_s"] > 0
    assert "cannot start" in rows["vllm"]["error"]
    assert "per round" in text


def test_later_rounds_draw_fresh_prompts_of_the_same_lengths():
    first = make_requests("sharegpt-like", 8)
    assert [r.prompt_token_ids for r in round_requests("sharegpt-like", 8, 0)] == \
        [r.prompt_token_ids for r in first]
    for round_index in (1, 2):
        again = round_requests("sharegpt-like", 8, round_index)
        assert [len(r.prompt_token_ids) for r in again] == [len(r.prompt_token_ids) for r in first]
        assert [r.output_len for r in again] == [r.output_len for r in first]
        assert all(a.prompt_token_ids != b.prompt_token_ids for a, b in zip(again, first))
    assert round_requests("fixed", 2, 1)[0].prompt_token_ids != \
        round_requests("fixed", 2, 2)[0].prompt_token_ids
    # Workloads of one round do not share prompts (a prefix cache would carry them over), in
    # the first round (the workloads' own seeds) as in later ones.
    for round_index in (0, 1):
        firsts = [round_requests(w, None, round_index)[0].prompt_token_ids[:16]
                  for w in ("fixed", "sharegpt-like", "single")]
        assert len({tuple(f) for f in firsts}) == 3
