"""A config whose architecture pagedllm lacks, or that names none, fails clearly at once."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pagedllm import LLM
from pagedllm.worker.worker import Worker


@pytest.fixture
def edited_model(tiny_llama_factory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Returns edit(architectures) -> a copy of a tiny Llama whose config.json has them
    (None drops the key); building the worker fails the test, as nothing heavy may run."""

    def no_worker(*args, **kwargs) -> None:
        raise AssertionError("the model was built before its architecture was checked")

    monkeypatch.setattr(Worker, "__init__", no_worker)

    def edit(architectures: list[str] | None) -> Path:
        model_dir = shutil.copytree(tiny_llama_factory(), tmp_path / "model")
        config_path = model_dir / "config.json"
        config = json.loads(config_path.read_text())
        assert config["architectures"] == ["LlamaForCausalLM"]  # what the copy starts from
        if architectures is None:
            del config["architectures"]
        else:
            config["architectures"] = architectures
        config_path.write_text(json.dumps(config))
        return model_dir

    return edit


def test_an_unknown_architecture_is_refused(edited_model) -> None:
    model_dir = edited_model(["FalconForCausalLM"])
    with pytest.raises(ValueError, match=r"architecture FalconForCausalLM is not supported; "
                                         r"supported: LlamaForCausalLM") as exc_info:
        LLM(str(model_dir))
    assert str(model_dir) in str(exc_info.value)


@pytest.mark.parametrize("architectures", [None, []], ids=["missing", "empty"])
def test_a_config_without_architectures_is_refused(edited_model, architectures) -> None:
    model_dir = edited_model(architectures)
    with pytest.raises(ValueError, match=r"names no architecture .*one of: LlamaForCausalLM"):
        LLM(str(model_dir))
