"""The `pagedllm` command as a user runs it: text on stdout, one clear line on errors."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def run_cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pagedllm", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
    )


def test_generate_on_the_default_model_prints_the_completion(smollm2_dir):
    result = run_cli("generate", "What is the capital of France?", "--chat", "--max-tokens", "16",
                     "--num-kv-blocks", "64")
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout


def test_generate_with_a_model_directory_matches_the_library(tiny_llama_factory):
    from pagedllm import LLM, SamplingParams

    model_dir = tiny_llama_factory(num_heads=4, num_kv_heads=2, vocab_size=49152)
    result = run_cli("generate", "Hello there", "--model", str(model_dir), "--max-tokens", "8",
                     "--num-kv-blocks", "32")
    assert result.returncode == 0, result.stderr
    llm = LLM(str(model_dir), num_kv_blocks=32)
    expected = llm.generate("Hello there", SamplingParams(temperature=0, max_tokens=8),
                            use_tqdm=False)[0].outputs[0].text
    assert result.stdout == expected + "\n"


@pytest.mark.parametrize(
    "args, message",
    [
        (["generate", "hi", "--model", "/nonexistent/model"], "does not exist"),
        (["generate", "hi", "--max-tokens", "0"], "max_tokens"),
        (["generate", "hi", "--temperature", "-2"], "temperature"),
        (["generate", "hi", "--max-tokens", "many"], "invalid int value"),
        (["generate"], "required"),
        (["frobnicate"], "invalid choice"),
        (["generate", "hi", "--swap-space", "inf"], "swap_space"),
        (["generate", "hi", "--num-kv-blocks", "1000000000"], "GiB of host memory"),
        (["serve", "--chat-template", "./no_such_template.jinja"], "not a file"),
        (["serve", "--port", "-1"], "cannot listen"),
    ],
)
def test_bad_input_prints_one_line_and_exits_non_zero(args, message):
    result = run_cli(*args)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_prompt_longer_than_the_context_is_one_line(tiny_llama_factory):
    model_dir = tiny_llama_factory(num_heads=4, num_kv_heads=2, vocab_size=49152)
    result = run_cli("generate", "word " * 600, "--model", str(model_dir), "--num-kv-blocks", "64")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "max_model_len" in lines[0], result.stderr


@pytest.mark.parametrize("command", ["throughput", "latency", "serve"])
def test_bench_help_through_the_pagedllm_command(command):
    result = run_cli("bench", command, "--help", timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: pagedllm bench {command}")
    assert "--output-json" in result.stdout
