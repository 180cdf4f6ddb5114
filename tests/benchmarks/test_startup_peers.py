"""`pagedllm bench startup-peers`: the arms alternate, failed starts stay out of the means, a
missing peer is skipped with a line, the table and JSON come from the starts (fake starts here:
no peer and no engine is started)."""

from __future__ import annotations

import argparse
import json

import pytest

from pagedllm.benchmarks import startup, startup_peers
from pagedllm.benchmarks.cli import add_bench_parser, run_bench
from pagedllm.benchmarks.startup_peers import Arm, format_table, run_rounds, summarize


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="pagedllm")
    add_bench_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["bench", "startup-peers", *argv])


def _missing_peers(tmp_path) -> list[str]:
    return ["--ov-python", str(tmp_path / "no-python"), "--llama-server",
            str(tmp_path / "no-llama-server")]


def test_arms_alternate_rotate_by_round_and_failures_are_kept_apart():
    calls = []

    def fake(name, results):
        def start():
            calls.append(name)
            value = results.pop(0)
            if isinstance(value, Exception):
                raise value
            return {"ready_s": value, "peak_rss_mib": 300.0, "idle_rss_mib": 200.0}
        return Arm(name, start)

    arms = [fake("a", [9.0, 1.0, 2.0]), fake("b", [9.0, RuntimeError("boom\nmore"), 4.0]),
            fake("c", [9.0, 5.0, 7.0])]
    logged = []
    out = run_rounds(arms, rounds=2, starts_per_round=1, log=logged.append)
    # warm-up of each, then round 0 in order, round 1 rotated by one
    assert calls == ["a", "b", "c", "a", "b", "c", "b", "c", "a"]
    assert out["a"]["warmup"]["ready_s"] == 9.0
    assert [s.get("ready_s") for s in out["b"]["starts"]] == [None, 4.0]
    assert "  b: error: boom" in logged

    b = summarize(out["b"]["starts"])
    assert (b["ready_s"], b["num_failed"], b["mean_ready_s"], b["min_ready_s"]) == ([4.0], 1, 4.0,
                                                                                    4.0)
    a = summarize(out["a"]["starts"])
    assert (a["mean_ready_s"], a["min_ready_s"], a["mean_peak_rss_mib"]) == (1.5, 1.0, 300.0)
    assert a["mean_first_forward_s"] is None  # no start measured it
    failed = summarize([{"error": "x"}])
    assert failed["mean_ready_s"] is None and failed["min_ready_s"] is None


def test_table_has_a_row_per_arm_with_each_start():
    summaries = {
        "pagedllm LLM()": summarize([
            {"ready_s": 1.25, "first_forward_s": 0.1, "ready_cpu_s": 1.0, "peak_rss_mib": 900.0,
             "idle_rss_mib": 800.0},
            {"ready_s": 1.75, "first_forward_s": 0.3, "ready_cpu_s": 1.2, "peak_rss_mib": 1000.0,
             "idle_rss_mib": 820.0}]),
        "llama-server -t 2": summarize([{"ready_s": 0.8, "peak_rss_mib": 150.0,
                                         "idle_rss_mib": 140.0}, {"error": "exit 1"}]),
    }
    header, llm, llama = format_table(summaries)
    assert len({len(header), len(llm), len(llama)}) == 1  # columns aligned, "-" included
    assert header.split()[:4] == ["engine", "ready", "s", "per"]
    assert llm.split() == ["pagedllm", "LLM()", "1.25", "1.75", "1.50", "1.25", "0.20", "1.10",
                           "950", "810"]
    assert llama.split() == ["llama-server", "-t", "2", "0.80", "(1", "failed)", "0.80", "0.80",
                             "-", "-", "150", "140"]


def test_missing_peers_are_skipped_with_a_line(tmp_path):
    args = _parse(*_missing_peers(tmp_path), "--ov-model", str(tmp_path))
    arms, skipped = startup_peers.build_arms(args)
    assert [a.name for a in arms] == ["pagedllm LLM()", "pagedllm serve"]
    assert skipped == [
        f"OpenVINO GenAI skipped: no python at {tmp_path / 'no-python'} (--ov-python)",
        (f"llama.cpp skipped: no llama-server at {tmp_path / 'no-llama-server'} "
         "(--llama-server)")]

    # a python that exists but a folder without the exported model; pipelines named
    ov_python = tmp_path / "python"
    ov_python.write_text("#!/bin/sh\n")
    ov_python.chmod(0o755)
    model = tmp_path / "ir"
    model.mkdir()
    (model / "openvino_model.xml").write_text("<net/>")
    args = _parse("--pagedllm", "none", "--ov-python", str(ov_python), "--ov-model",
                  str(tmp_path / "empty"), "--ov-model", str(model), "--ov-pipelines", "cb",
                  "--llama-server", str(tmp_path / "no-llama-server"))
    arms, skipped = startup_peers.build_arms(args)
    assert [a.name for a in arms] == ["OpenVINO GenAI cb ir"]
    assert skipped[0].startswith(f"OpenVINO GenAI skipped for {tmp_path / 'empty'}: no "
                                 "openvino_model.xml")


def test_command_line_runs_the_arms_and_writes_json(tmp_path, monkeypatch, capsys):
    def fake_llm(kwargs, extra_env=None):
        assert kwargs == {"num_kv_blocks": 64}
        return {"phases": {}, "ready_s": 1.0, "first_forward_s": 0.2, "ready_cpu_s": 0.9,
                "peak_rss_mib": 700.0, "idle_rss_mib": 650.0}

    def fake_server(kwargs, extra_env=None):
        return {"health_s": 2.0, "health_cpu_s": 1.5, "peak_rss_mib": 800.0,
                "idle_rss_mib": 750.0}

    monkeypatch.setattr(startup, "start_llm", fake_llm)
    monkeypatch.setattr(startup, "start_server", fake_server)
    monkeypatch.setattr(startup_peers, "host_phase",
                        lambda: {"import_torch_s": 0.9, "loadavg": [1.0, 1.0, 1.0]})
    out = tmp_path / "out" / "peers.json"
    assert run_bench(_parse(*_missing_peers(tmp_path), "--rounds", "2", "--starts-per-round",
                            "1", "--num-kv-blocks", "64", "--output-json", str(out))) == 0
    stdout = capsys.readouterr().out
    assert "OpenVINO GenAI skipped" in stdout and "llama.cpp skipped" in stdout
    assert "host before: import torch 0.90 s" in stdout
    assert f"results written to {out}" in stdout
    data = json.loads(out.read_text())
    assert data["engine_kwargs"] == {"num_kv_blocks": 64} and len(data["skipped"]) == 2
    assert list(data["arms"]) == ["pagedllm LLM()", "pagedllm serve"]
    serve = data["arms"]["pagedllm serve"]
    assert serve["warmup"]["ready_s"] == 2.0 and len(serve["starts"]) == 2
    assert serve["summary"]["mean_ready_cpu_s"] == 1.5
    assert data["arms"]["pagedllm LLM()"]["summary"]["mean_first_forward_s"] == 0.2


def test_bad_flags_are_refused(tmp_path):
    for argv, match in ((["--rounds", "0"], "--rounds"),
                        (["--starts-per-round", "0"], "--starts-per-round"),
                        (["--ov-pipelines", "cb,vlm"], "--ov-pipelines: unknown vlm"),
                        (["--pagedllm", "generate"], "--pagedllm: unknown generate")):
        with pytest.raises(ValueError, match=match):
            run_bench(_parse(*argv))
    assert run_bench(_parse(*_missing_peers(tmp_path), "--pagedllm", "none")) == 1
