"""`bench throughput|latency|serve`: the sub-commands parse, run from the installed package, print
their table and write their JSON (`python -m pagedllm.benchmarks bench ...`, the `pagedllm bench`
command without the rest of the CLI)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest

from pagedllm.benchmarks.cli import add_bench_parser, run_bench


def _bench(*argv: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pagedllm.benchmarks", "bench", *argv],
                          capture_output=True, text=True, cwd=cwd, timeout=120)


def _parse(*argv: str) -> argparse.Namespace:
    """As the `pagedllm` command parses: `bench` added to a parser of its own."""
    parser = argparse.ArgumentParser(prog="pagedllm")
    add_bench_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["bench", *argv])


@pytest.mark.parametrize("command, flag", [("throughput", "--vllm-python"),
                                           ("latency", "--num-iters-warmup"),
                                           ("serve", "--request-rates")])
def test_help_of_each_sub_command(command, flag):
    result = _bench(command, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: python -m pagedllm.benchmarks bench {command}")
    assert flag in result.stdout and "--output-json" in result.stdout


def test_bench_needs_a_sub_command_and_lists_them():
    result = _bench()
    assert result.returncode == 2
    assert "{throughput,latency,serve,startup,startup-peers,structured}" in result.stderr


def test_parsed_flags_name_the_sub_command_and_bad_ones_raise():
    args = _parse("latency", "--batch-size", "2", "--output-json", "x.json")
    assert (args.command, args.bench_command, args.batch_size, args.output_json) == (
        "bench", "latency", 2, "x.json")
    with pytest.raises(ValueError, match="--rounds"):
        run_bench(_parse("throughput", "--rounds", "0"))
    with pytest.raises(ValueError, match="--num-iters"):
        run_bench(_parse("latency", "--num-iters", "0"))
    with pytest.raises(ValueError, match="bad server"):
        run_bench(_parse("serve", "--servers", "sglang"))


def test_short_throughput_run_prints_its_table_and_writes_json(tiny_llama_factory, tmp_path):
    # 4 requests x 128/128 tokens on a one-layer model: pagedllm only, one round, in a
    # subprocess that hosts the engine in another (throughput_runner, run as a module).
    # Its projections quantized to int8 at load (--quantization reaches the engine).
    model = tiny_llama_factory(vocab_size=49152, hidden_size=64, num_layers=1)
    out = tmp_path / "out" / "throughput.json"
    result = _bench("throughput", "--engines", "pagedllm:float32", "--workload", "fixed",
                    "--num-requests", "4", "--rounds", "1", "--model", str(model),
                    "--quantization", "int8", "--output-json", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    header = next(line for line in lines if line.startswith("workload "))
    assert "out tok/s" in header and "peak RSS GiB" in header
    row = next(line for line in lines if line.startswith("fixed "))
    assert "pagedllm (float32)" in row and "1.00x" in row
    assert f"wrote {out}" in result.stdout
    saved_run = json.loads(out.read_text())
    assert saved_run["quantization"] == "int8"
    (saved,) = saved_run["results"]
    assert (saved["engine"], saved["workload"], saved["num_requests"]) == ("pagedllm", "fixed", 4)
    assert saved["output_tokens"] == 4 * 128 and saved["output_tokens_per_s"] > 0
    assert not (tmp_path / "benchmarks").exists()  # only where --output-json says


def test_short_latency_run_reports_percentiles(tiny_llama_factory, tmp_path, capsys):
    model = tiny_llama_factory(vocab_size=512, hidden_size=32, num_layers=1)
    out = tmp_path / "latency.json"
    status = run_bench(_parse(
        "latency", "--model", str(model), "--dtype", "float32", "--batch-size", "2",
        "--input-len", "8", "--output-len", "4", "--num-iters-warmup", "1", "--num-iters", "3",
        "--output-json", str(out), "--disable-tqdm"))
    assert status == 0
    text = capsys.readouterr().out
    assert "2 requests x (8 prompt + 4 output tokens), 3 calls after 1 warm-up" in text
    rows = [line.split()[0] for line in text.splitlines()
            if line.split() and line.split()[0] in ("avg", "p10", "p50", "p99")]
    assert rows == ["avg", "p10", "p50", "p99"]
    saved = json.loads(out.read_text())
    assert len(saved["latencies"]) == 3
    assert list(saved["percentiles"]) == ["10", "25", "50", "75", "90", "99"]
    assert min(saved["latencies"]) <= saved["percentiles"]["50"] <= max(saved["latencies"])
    assert saved["avg_latency"] == pytest.approx(sum(saved["latencies"]) / 3)
    assert saved["config"]["batch_size"] == 2


def test_workload_arithmetic_reads_every_familys_config_names(tmp_path):
    """`bench throughput --model DIR` works for every family: GPT-2 names its sizes n_embd /
    n_layer / n_inner and OPT ffn_dim; both have an ungated MLP."""
    from transformers import GPT2Config, LlamaConfig, OPTConfig

    from pagedllm.benchmarks.throughput import workload_flops
    from pagedllm.benchmarks.workloads import BenchRequest

    requests = [BenchRequest(prompt_token_ids=[1, 2, 3], output_len=2)]
    configs = {
        "gpt2": GPT2Config(n_embd=64, n_layer=2, n_head=4, n_inner=256, vocab_size=100),
        "opt": OPTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         ffn_dim=256, vocab_size=100, word_embed_proj_dim=64),
        "llama": LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=4, intermediate_size=256, vocab_size=100),
    }
    attention = 4 * 64 * 64
    for name, config in configs.items():
        config.save_pretrained(tmp_path / name)
        mlp = (2 if name in ("gpt2", "opt") else 3) * 64 * 256
        per_token = 2 * (attention + mlp) * 2
        want = 3 * per_token + 2 * (per_token + 2 * 64 * 100)
        assert workload_flops(str(tmp_path / name), requests) == want, name
