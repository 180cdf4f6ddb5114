"""The control-plane benchmark at a tiny size, run as users run it: its JSON holds what the docs
quote (message bytes, build/encode/decode times, ring and TCP sends, the projection at 8, 64
and 512 ranks), and the diff stays small while the whole state grows with the context."""

from __future__ import annotations

import json
import subprocess
import sys

from pagedllm.benchmarks.control_plane import model_params, step_compute_s


def test_control_plane_benchmark_writes_its_tables_and_json(tmp_path):
    out = tmp_path / "control_plane.json"
    proc = subprocess.run(
        [sys.executable, "-m", "pagedllm.benchmarks.control_plane", "--batches", "1", "16",
         "--contexts", "128", "1024", "--readers", "1", "2", "--steps", "17", "--repeats", "3",
         "--output-json", str(out)],
        capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "Projection: Llama-2-70B" in proc.stdout
    result = json.loads(out.read_text())
    rows = {(r["batch"], r["context"]): r for r in result["measured"]}
    assert sorted(rows) == [(1, 128), (1, 1024), (16, 128), (16, 1024)]
    for row in rows.values():
        assert row["build_us"] > 0 and row["encode_us"] > 0 and row["decode_us"] > 0
        assert row["tcp_send_us"] > 0
        assert set(row["ring"]) == {"1", "2"}
        assert all(r["deliver_us"] >= r["write_us"] > 0 for r in row["ring"].values())
        # The first step sends every prompt; a decode step is far smaller than the state.
        assert row["message_bytes"] < row["first_step_bytes"]
        assert row["message_bytes"] * 10 < row["full_state_bytes"]
    # A decode step's diff does not grow with the context (tables go as appends, over 17
    # steps 1/16 of the sequences take a block each step); the whole state grows by at least
    # 2 bytes per token id.
    for batch in (1, 16):
        short, long = rows[(batch, 128)], rows[(batch, 1024)]
        assert long["message_bytes"] <= short["message_bytes"] + 2 * batch
        assert long["full_state_bytes"] > short["full_state_bytes"] + 2 * batch * (1024 - 128)
    assert rows[(16, 128)]["message_bytes"] > rows[(1, 128)]["message_bytes"]

    projection = result["projection"]
    assert [p["ranks"] for p in projection[:3]] == [8, 64, 512]
    assert len(projection) == 3 * len(rows)
    for p in projection:
        assert p["driver_us"] > 0 and 0 < p["step_ms_ideal_tp"] <= p["step_ms_tp8_pp"]
        assert p["nodes"] == -(-p["ranks"] // 8)


def test_roofline_of_llama2_70b():
    # 68.98B parameters: 80 layers of 855.6M plus the untied 32000 x 8192 embedding and head.
    assert abs(model_params() - 68.98e9) < 0.01e9
    # Batch 1 reads the weights once (138 GB) over 8 A100s at 60% of 2.039 TB/s: ~14 ms.
    assert 13e-3 < step_compute_s(1, 128, 8) < 15e-3
    # Batch 256 at 4096 tokens: KV reads (256 * 4096 * 320 KiB = 344 GB) dominate.
    assert step_compute_s(256, 4096, 8) > 3 * step_compute_s(1, 4096, 8)
