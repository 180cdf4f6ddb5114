"""A model directory's config and tokenizer without transformers' per-family config modules.

In transformers 5, every `configuration_<family>.py` imports `utils.type_validators`, which
imports `activations` -> `integrations.hub_kernels` -> `core_model_loading`, and with them
`torch.distributed.tensor`, accelerate and the kernels hub: about a second of a start that
needs none of it. `AutoTokenizer` loads the config too, so it pays the same.

So the first start reads both the usual way (AutoConfig, AutoTokenizer) and records what it
got, checked: the config as every attribute value it holds (its class's defaults and derived
values included) and the class attributes it reads through (`attribute_map`, `model_type`),
kept only where a config rebuilt from the record answers every public attribute as the
original does; the tokenizer's class where it is one of transformers' backend classes that
load from the directory's own files, and the rebuilt tokenizer encodes, decodes and templates
as the original. Later starts rebuild both from the record: a `PreTrainedConfig` subclass of
the same name with the recorded attributes, and the tokenizer through its class directly.

The record is keyed by the directory, its config and tokenizer files' bytes, the transformers
version and this file; any change reads the usual way again. PAGEDLLM_FAST_HF_LOAD=0 turns it
off; PAGEDLLM_HF_RECORD_DIR moves the records.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pagedllm.paths import cache_root

logger = logging.getLogger(__name__)

FAST_ENV = "PAGEDLLM_FAST_HF_LOAD"
RECORD_DIR_ENV = "PAGEDLLM_HF_RECORD_DIR"
RECORD_FORMAT = 1
# The files that decide the config and the tokenizer.
_KEY_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "chat_template.jinja", "chat_template.json",
              "tokenizer.model", "vocab.json", "merges.txt")
# Tokenizer classes that load from the directory's files alone (no config needed).
_DIRECT_TOKENIZERS = ("TokenizersBackend", "PreTrainedTokenizerFast")
_PROBE_TEXT = "Hello, world! 123 <b>x</b>\n\tÜber naïve café 🙂  spaces."
_PROBE_CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
               {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2+2?"}]


def fast_enabled() -> bool:
    return os.environ.get(FAST_ENV, "1") not in ("0", "false", "no", "off")


def _record_path(model_dir: Path) -> Path:
    import transformers

    h = hashlib.sha256()
    for name in _KEY_FILES:
        path = model_dir / name
        h.update(name.encode() + b"\0")
        if path.is_file():
            h.update(path.read_bytes())
        h.update(b"\0")
    h.update(transformers.__version__.encode())
    h.update(Path(__file__).read_bytes())
    where = hashlib.sha256(str(model_dir).encode()).hexdigest()[:12]
    return record_dir() / f"{where}-{h.hexdigest()[:24]}.json"


def record_dir() -> Path:
    """$PAGEDLLM_HF_RECORD_DIR, else `hf_records` in pagedllm's cache folder."""
    return Path(os.environ.get(RECORD_DIR_ENV) or cache_root() / "hf_records")


# ---- values to JSON and back --------------------------------------------------------------

def _encode(value: Any) -> Any:
    """JSON for a config value; TypeError where it has none that decodes to an equal value."""
    import torch

    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.dtype):
        return {"__dtype__": str(value).removeprefix("torch.")}
    if isinstance(value, list):
        return [_encode(v) for v in value]
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v) for v in value]}
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):  # e.g. id2label's int keys
            return {"__items__": [[_encode(k), _encode(v)] for k, v in value.items()]}
        if {"__dtype__", "__tuple__", "__items__"} & set(value):
            raise TypeError("a dict that looks like an encoded value")
        return {k: _encode(v) for k, v in value.items()}
    raise TypeError(f"{type(value).__name__} is not recorded")


def _decode(value: Any) -> Any:
    import torch

    if isinstance(value, list):
        return [_decode(v) for v in value]
    if isinstance(value, dict):
        if set(value) == {"__dtype__"}:
            return getattr(torch, value["__dtype__"])
        if set(value) == {"__tuple__"}:
            return tuple(_decode(v) for v in value["__tuple__"])
        if set(value) == {"__items__"}:
            return {_decode(k): _decode(v) for k, v in value["__items__"]}
        return {k: _decode(v) for k, v in value.items()}
    return value


# ---- the config ---------------------------------------------------------------------------

def _public_values(obj: Any) -> dict[str, Any]:
    """Every public non-callable attribute of obj that reads without an error."""
    out = {}
    for name in dir(obj):
        if name.startswith("_"):
            continue
        try:
            value = getattr(obj, name)
        except Exception as exc:  # noqa: BLE001 - a property that refuses is left out
            logger.debug("%s.%s not compared: %s", type(obj).__name__, name, exc)
            continue
        if not callable(value):
            out[name] = value
    return out


def _config_record(config: Any) -> dict | None:
    """The record of a loaded config, or None where one rebuilt from it would differ."""
    from transformers.configuration_utils import PreTrainedConfig

    cls = type(config)
    try:
        class_attrs = {name: _encode(value) for name, value in vars(cls).items()
                       if not name.startswith("__") and not callable(value)
                       and not isinstance(value, (property, classmethod, staticmethod))}
        record = {"class": cls.__name__, "class_attrs": class_attrs,
                  "values": {k: _encode(v) for k, v in vars(config).items()}}
        record = json.loads(json.dumps(record))
    except TypeError as exc:
        logger.debug("config of %s not recorded: %s", cls.__name__, exc)
        return None
    # A method or property of the family's class that the rebuilt config would lack.
    base = set(dir(PreTrainedConfig))
    own = {n for n in dir(cls) if not n.startswith("_") and n not in base
           and n not in class_attrs and not n.startswith("validate")}
    if own:
        logger.debug("config of %s not recorded: it defines %s", cls.__name__, sorted(own))
        return None
    rebuilt = _config_from_record(record)
    if type(rebuilt).__name__ != cls.__name__ or _differences(config, rebuilt):
        logger.debug("config of %s not recorded: rebuilt differs in %s", cls.__name__,
                     _differences(config, rebuilt))
        return None
    return record


def _differences(config: Any, rebuilt: Any) -> list[str]:
    """The public attributes whose values differ (read quietly: some are deprecated aliases
    that warn). An attribute that is not equal to itself on the original (a property that
    builds a fresh view per read) is compared by type."""
    import warnings

    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            want, got = _public_values(config), _public_values(rebuilt)
            out = []
            for name in sorted(set(want) | set(got) | set(vars(config))):
                try:
                    a, b = getattr(config, name), getattr(rebuilt, name)
                    stable = bool(a == getattr(config, name))
                    same = bool(a == b) if stable else type(a) is type(b)
                except Exception:  # noqa: BLE001 - unreadable on one side: different
                    same = False
                if not same:
                    out.append(name)
            return out
    finally:
        hf_logging.set_verbosity(verbosity)


_CLASSES: dict[tuple, type] = {}


def _config_class(name: str, class_attrs: dict) -> type:
    """The rebuilt config class of a record (one per name and class attributes)."""
    from transformers.configuration_utils import PreTrainedConfig

    key = (name, json.dumps(class_attrs, sort_keys=True))
    cls = _CLASSES.get(key)
    if cls is None:
        attrs = {k: _decode(v) for k, v in class_attrs.items()}
        cls = type(name, (PreTrainedConfig,), {
            **attrs, "__module__": __name__, "__reduce__": _reduce_config,
            "_record_of_class": (name, class_attrs)})
        _CLASSES[key] = cls
    return cls


def _reduce_config(config: Any) -> tuple:
    # NOTE: the class is made at run time, so pickle (the mp executor sends the config to its
    # workers) names the function that makes it again, with the instance's current values.
    name, class_attrs = type(config)._record_of_class
    return _config_from_state, (name, class_attrs, dict(config.__dict__))


def _config_from_state(name: str, class_attrs: dict, state: dict) -> Any:
    config = object.__new__(_config_class(name, class_attrs))
    config.__dict__.update(state)
    return config


def _config_from_record(record: dict) -> Any:
    return _config_from_state(record["class"], record["class_attrs"],
                              {k: _decode(v) for k, v in record["values"].items()})


# ---- the tokenizer ------------------------------------------------------------------------

def _tokenizer_class(name: str):
    import transformers

    return getattr(transformers, name)


def _tokenizer_answers(tokenizer: Any) -> Any:
    """What a tokenizer answers on a probe: ids, text back, special tokens, the template."""
    ids = tokenizer.encode(_PROBE_TEXT)
    chat = None
    if getattr(tokenizer, "chat_template", None):
        try:
            chat = tokenizer.apply_chat_template(_PROBE_CHAT, tokenize=False,
                                                 add_generation_prompt=True)
        except Exception:  # noqa: BLE001 - a template that refuses this chat: compare that
            chat = "refused"
    return (ids, tokenizer.decode(ids), tokenizer.all_special_tokens, tokenizer.eos_token_id,
            tokenizer.bos_token_id, tokenizer.pad_token_id, len(tokenizer), chat,
            tokenizer.model_max_length, tokenizer.padding_side, tokenizer.truncation_side)


def _tokenizer_record(tokenizer: Any, model_dir: Path) -> str | None:
    """The tokenizer's class name where loading through it directly gives the same answers."""
    name = type(tokenizer).__name__
    if name not in _DIRECT_TOKENIZERS:
        return None
    try:
        direct = _tokenizer_class(name).from_pretrained(model_dir, local_files_only=True)
        same = (type(direct) is type(tokenizer)
                and _tokenizer_answers(direct) == _tokenizer_answers(tokenizer))
    except Exception as exc:  # noqa: BLE001 - any failure: keep the usual way
        logger.debug("tokenizer of %s not recorded: %s", model_dir, exc)
        return None
    return name if same else None


# ---- entry points -------------------------------------------------------------------------

def _read_record(model_dir: Path) -> dict | None:
    path = _record_path(model_dir)
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if record.get("format") == RECORD_FORMAT else None


def _write_record(model_dir: Path, record: dict) -> None:
    path = _record_path(model_dir)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            json.dump(record, f)
        os.replace(tmp, path)
    except OSError as exc:
        logger.debug("no record of %s written: %s", model_dir, exc)


def _through_record(model_dir: Path, field: str, rebuild: Callable[[Any], Any],
                    load: Callable[[Path], Any], record_of: Callable[[Any, Path], Any]) -> Any:
    """The value that load(model_dir) gives, rebuilt from the record's `field` where it holds
    one (rebuild(record[field])); otherwise loaded, and where the record has no `field` yet,
    record_of(value, model_dir) is written there (None: the value cannot be rebuilt)."""
    model_dir = Path(model_dir).resolve()
    record = _read_record(model_dir) if fast_enabled() else None
    if record is not None and record.get(field) is not None:
        try:
            return rebuild(record[field])
        except Exception as exc:  # noqa: BLE001 - a damaged record: load the usual way
            logger.warning("%s record of %s not usable (%s)", field.split("_")[0], model_dir,
                           exc)
            record = None
    value = load(model_dir)
    if fast_enabled() and (record is None or field not in record):
        record = record or {"format": RECORD_FORMAT}
        record[field] = record_of(value, model_dir)
        _write_record(model_dir, record)
    return value


def load_config(model_dir: Path) -> Any:
    """AutoConfig.from_pretrained(model_dir, local_files_only=True), rebuilt from its checked
    record where one exists (see the module docstring)."""
    def load(path: Path) -> Any:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(path, local_files_only=True)

    return _through_record(model_dir, "config", _config_from_record, load,
                           lambda config, _: _config_record(config))


def load_tokenizer(model_dir: Path) -> Any:
    """AutoTokenizer.from_pretrained(model_dir, local_files_only=True), loaded through its
    recorded class directly where that was checked to give the same tokenizer."""
    model_dir = Path(model_dir).resolve()

    def load(path: Path) -> Any:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path, local_files_only=True)

    def rebuild(class_name: str) -> Any:
        return _tokenizer_class(class_name).from_pretrained(model_dir, local_files_only=True)

    return _through_record(model_dir, "tokenizer_class", rebuild, load, _tokenizer_record)
