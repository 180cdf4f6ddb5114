"""The GGUF conversion cache: one conversion per file content, whatever its path or mtime."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pagedllm.models import default_model


@pytest.fixture
def conversions(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[Path]:
    """Redirects the cache to tmp_path and records conversions instead of running them."""
    monkeypatch.setenv("PAGEDLLM_CACHE_DIR", str(tmp_path / "cache"))
    written: list[Path] = []

    def fake_write(gguf_path: Path, out_dir: Path) -> None:
        (out_dir / "config.json").write_text(gguf_path.read_bytes().decode())
        written.append(gguf_path)

    monkeypatch.setattr(default_model, "_write_hf_directory", fake_write)
    return written


def _gguf(path: Path, content: str, mtime: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content)
    os.utime(path, (mtime, mtime))
    return path


def test_a_reinstalled_file_reuses_its_conversion(conversions: list[Path], tmp_path: Path) -> None:
    first = _gguf(tmp_path / "site-a" / "model.gguf", "weights v1", 1_000)
    # The same bytes installed again elsewhere, later (pip gives every install a new mtime).
    again = _gguf(tmp_path / "site-b" / "model.gguf", "weights v1", 2_000)
    out_first = default_model.convert_gguf(first)
    assert default_model.convert_gguf(again) == out_first
    assert default_model.convert_gguf(first) == out_first
    assert conversions == [first]  # converted once
    assert (out_first / "config.json").read_text() == "weights v1"


def test_changed_content_gets_its_own_conversion(conversions: list[Path], tmp_path: Path) -> None:
    path = _gguf(tmp_path / "model.gguf", "weights v1", 1_000)
    out_v1 = default_model.convert_gguf(path)
    # Same name and size, new bytes and mtime: a different model.
    _gguf(path, "weights v2", 2_000)
    out_v2 = default_model.convert_gguf(path)
    assert out_v2 != out_v1 and out_v2.name.startswith("model-10-")
    assert (out_v2 / "config.json").read_text() == "weights v2"
    assert len(conversions) == 2
