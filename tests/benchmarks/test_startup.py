"""`pagedllm bench startup`: each start in a fresh process, the engine's phases timed from the
process start, written as JSON."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from pagedllm import startup_profile

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
        phases = row["phases"]
        assert next(iter(phases)) == "server modules" and "kv pool" in phases
        assert list(phases)[-2:] == ["server started", "listening, first /health"]
        assert all(s >= 0 for s in phases.values())
        assert abs(sum(phases.values()) - row["health_s"]) < 1e-6
    assert "/health 200" in stdout and "server started" in stdout


def test_a_launched_process_reports_its_phases(monkeypatch, capsys):
    monkeypatch.setattr(startup_profile, "_marks", [])
    startup_profile.report()  # no launcher: nothing
    assert capsys.readouterr().err == ""
    monkeypatch.setenv(startup_profile.START_ENV, repr(time.time() - 1.0))
    startup_profile.mark("a")
    startup_profile.mark("b")
    startup_profile.report()
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(startup_profile.REPORT_PREFIX)
    phases = json.loads(line[len(startup_profile.REPORT_PREFIX):])["phases"]
    assert [name for name, _ in phases] == ["a", "b"]
    assert phases[0][1] >= 1.0 and phases[1][1] >= 0


def test_bad_flags_are_refused():
    import argparse

    from pagedllm.benchmarks.startup import add_cli_args, check_args

    parser = argparse.ArgumentParser()
    add_cli_args(parser)
    with pytest.raises(ValueError, match="--num-starts"):
        check_args(parser.parse_args(["--num-starts", "0"]))
    with pytest.raises(ValueError, match="--cold-cache-dir needs --cold"):
        check_args(parser.parse_args(["--cold-cache-dir", "/tmp"]))


def test_cold_points_every_cache_at_the_fresh_folder(tmp_path, monkeypatch):
    """--cold: every folder pagedllm caches in between starts (the cache folder and every
    PAGEDLLM_*DIR variable the package reads) lies in the fresh folder."""
    import re
    from pathlib import Path

    import pagedllm
    from pagedllm.benchmarks.startup import cold_env
    from pagedllm.models import hf_fast, packed_cache
    from pagedllm.ops import cpu_extension
    from pagedllm.paths import cache_root

    package = Path(pagedllm.__file__).parent
    names = {m for f in package.rglob("*.py")
             for m in re.findall(r'"(PAGEDLLM_[A-Z_]*DIR)"', f.read_text())}
    root = tmp_path / "fresh"
    env = cold_env(root)
    assert "PAGEDLLM_CACHE_DIR" in names and names <= set(env)
    for name in names:  # a user's own settings are overridden
        monkeypatch.setenv(name, str(tmp_path / "user" / name))
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    for folder in (cache_root(), packed_cache.cache_dir(), hf_fast.record_dir(),
                   cpu_extension.build_directory()):
        assert folder.is_relative_to(root), folder


def test_cold_work_is_timed_from_the_fresh_folders_files(tmp_path):
    import os

    from pagedllm.benchmarks.startup import cold_work_seconds

    assert cold_work_seconds(tmp_path) == {"native build": None, "conversion": None}
    build = tmp_path / "torch_extensions" / "pagedllm_cpu_0123"
    model = tmp_path / "models" / "smollm2-1-ab"
    for path, at in ((build.with_suffix(".lock"), 100.0), (build / "BUILT", 190.5),
                     (build / "x.o", 150.0), (model.with_suffix(".lock"), 10.0),
                     (model / "config.json", 12.0), (model / "sub" / "model.safetensors", 13.25)):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("")
        os.utime(path, (at, at))
    assert cold_work_seconds(tmp_path) == {"native build": 90.5, "conversion": 3.25}
    (build / "BUILT").unlink()  # a build that did not finish is not timed
    assert cold_work_seconds(tmp_path)["native build"] is None


@pytest.mark.slow
def test_a_cold_start_leaves_the_users_cache_alone(tmp_path, tiny_llama_factory, monkeypatch):
    """A --cold run writes only into its fresh folder, and removes it."""
    monkeypatch.setenv("PAGEDLLM_CACHE_DIR", str(tmp_path / "user"))
    monkeypatch.setenv("PAGEDLLM_DISABLE_CPU_KERNEL", "1")  # no native build in a test
    (tmp_path / "cold").mkdir()
    out = tmp_path / "startup.json"
    result = subprocess.run(
        [sys.executable, "-m", "pagedllm.benchmarks", "bench", "startup", "--mode", "llm",
         "--cold", "--cold-cache-dir", str(tmp_path / "cold"), "--num-starts", "1",
         "--model", str(tiny_llama_factory()), "--num-kv-blocks", "16", "--dtype", "float32",
         "--output-json", str(out)], capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    assert data["cold"] and data["llm"]["cold_work"] == {"native build": None,
                                                         "conversion": None}
    assert "install (s)" in result.stdout
    assert not (tmp_path / "user").exists() and not list((tmp_path / "cold").iterdir())
