"""A model directory's config and tokenizer without transformers (after the first start).

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

Importing transformers at all costs a start about 0.4 s more, so the record also holds what
answers without it, checked the same way: for the config, the values of its properties and
the names of its methods (`RecordedConfig`: values, class attributes, aliases and properties
from the record; a method or a property's change builds the real config, which answers from
then on), and for a fast tokenizer its Rust tokenizer's JSON (written beside the record) and
special-token values (`pagedllm.tokenizer.FastTokenizer`, checked against transformers'
encode, decode and ids-to-tokens answers on probes). Later starts use these where the record
has them, else the rebuilds above.

The record is keyed by the directory, its config and tokenizer files' bytes, the transformers
version and this file; any change reads the usual way again. PAGEDLLM_FAST_HF_LOAD=0 turns it
off; PAGEDLLM_HF_RECORD_DIR moves the records.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import logging
import os
import re
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

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


def _transformers_version() -> str:
    """transformers' version, read from its package without importing it (about 0.4 s)."""
    spec = importlib.util.find_spec("transformers")
    text = Path(spec.origin).read_text() if spec is not None and spec.origin else ""
    found = re.search(r"""^__version__\s*=\s*["']([^"']+)["']""", text, re.MULTILINE)
    if found is None:  # an unusual install: ask the package itself
        import transformers

        return transformers.__version__
    return found.group(1)


_record_paths: dict[tuple, Path] = {}


def _record_path(model_dir: Path) -> Path:
    """The record's file: named by the directory and a hash of its key files' bytes (hashed
    once per process while their size and modification time stay the same)."""
    stats = []
    for name in _KEY_FILES:
        try:
            st = (model_dir / name).stat()
            stats.append((name, st.st_size, st.st_mtime_ns))
        except OSError:
            stats.append((name, None, None))
    memo = (str(model_dir), tuple(stats), str(record_dir()))
    path = _record_paths.get(memo)
    if path is None:
        path = _record_paths[memo] = _hashed_record_path(model_dir)
    return path


def _hashed_record_path(model_dir: Path) -> Path:
    h = hashlib.sha256()
    for name in _KEY_FILES:
        path = model_dir / name
        h.update(name.encode() + b"\0")
        if path.is_file():
            h.update(path.read_bytes())
        h.update(b"\0")
    h.update(_transformers_version().encode())
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
    if isinstance(value, (set, frozenset)):
        return {"__set__": [_encode(v) for v in sorted(value, key=repr)],
                "frozen": isinstance(value, frozenset)}
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):  # e.g. id2label's int keys
            return {"__items__": [[_encode(k), _encode(v)] for k, v in value.items()]}
        if {"__dtype__", "__tuple__", "__items__", "__set__"} & set(value):
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
        if set(value) == {"__set__", "frozen"}:
            items = [_decode(v) for v in value["__set__"]]
            return frozenset(items) if value["frozen"] else set(items)
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
    record["light"] = _light_record(config, record)
    return record


def _light_record(config: Any, record: dict) -> dict | None:
    """What a RecordedConfig needs beyond the record's values: the public attributes the
    config answers that are neither its values nor its class's (properties, read once here),
    and its other public names (methods, and properties that refuse), which build the real
    config; None where a RecordedConfig would answer differently."""
    import warnings

    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            plain = set(vars(config)) | set(record["class_attrs"])
            answers = {}
            for name, value in _public_values(config).items():
                if name not in plain:
                    try:
                        answers[name] = _encode(value)
                    except TypeError:  # a view object: the real config answers it
                        continue
            others = sorted(n for n in dir(config) if not n.startswith("_")
                            and n not in plain and n not in answers)
            light = json.loads(json.dumps({"answers": answers, "others": others}))
    except TypeError as exc:
        logger.debug("config of %s has no light record: %s", type(config).__name__, exc)
        return None
    finally:
        hf_logging.set_verbosity(verbosity)
    built = _light_config({**record, "light": light})
    # NOTE: the others are the real config's own answers (reading one here would build it).
    differ = _differences(config, built, skip=light["others"])
    if differ or built.__dict__.get(_REAL) is not None:
        logger.debug("config of %s has no light record: it differs in %s",
                     type(config).__name__, differ)
        return None
    return light


_REAL = "_pagedllm_real_config"


class RecordedConfig:
    """A model config from its record without transformers (about 0.4 s of a start): the
    config's values as attributes, its class's attributes on a class of the same name, its
    aliases (`attribute_map`) and properties as the record holds them. Anything else, a
    method (`to_dict`, ...) or a change to a property, builds the real config (a
    `PreTrainedConfig` subclass, `_config_from_state`) from the values now held, which answers
    everything from then on."""

    # NOTE: the class's own attributes are answered from _class_values, not set on the class:
    # once the real config answers, they must not shadow it.
    _class_values: ClassVar[dict] = {}
    _light: ClassVar[dict] = {}
    _record_of_class: ClassVar[tuple] = ("", {})

    def _real(self, reason: str = "") -> Any:
        real = self.__dict__.get(_REAL)
        if real is None:
            logger.debug("%s: the real config is built (%s)", type(self).__name__, reason)
            name, class_attrs = type(self)._record_of_class
            real = _config_from_state(name, class_attrs, dict(self.__dict__))
            self.__dict__.clear()
            self.__dict__[_REAL] = real
        return real

    def __getattr__(self, name: str) -> Any:
        real = self.__dict__.get(_REAL)
        if real is not None:
            return getattr(real, name)
        if name.startswith("__"):
            raise AttributeError(name)
        cls = type(self)
        alias = cls._class_values.get("attribute_map", {}).get(name)
        if alias is not None:
            return getattr(self, alias)
        if name in cls._class_values:
            return cls._class_values[name]
        light = cls._light
        if name in light["answers"]:
            return _decode(light["answers"][name])
        if name in light["others"]:
            return getattr(self._real(name), name)
        raise AttributeError(f"'{cls.__name__}' object has no attribute '{name}'")

    def __setattr__(self, name: str, value: Any) -> None:
        real = self.__dict__.get(_REAL)
        if real is None:
            cls = type(self)
            name = cls._class_values.get("attribute_map", {}).get(name, name)
            if name not in cls._light["answers"] and name not in cls._light["others"]:
                self.__dict__[name] = value
                return
            real = self._real(f"{name} set")
        setattr(real, name, value)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, RecordedConfig):
            other = other._real()
        return self._real() == other

    def __hash__(self) -> int:
        return hash(self._real())

    def __repr__(self) -> str:
        return repr(self._real("repr"))

    def __iter__(self):
        return iter(self._real())

    def __reduce__(self) -> tuple:
        # NOTE: the mp executor pickles the config to its workers: a RecordedConfig of the
        # values held now (the real config's, once built), so they import no transformers.
        real = self.__dict__.get(_REAL)
        state = dict((real if real is not None else self).__dict__)
        name, class_attrs = type(self)._record_of_class
        return _light_from_state, (name, class_attrs, type(self)._light, state)


_LIGHT_CLASSES: dict[tuple, type] = {}


def _light_from_state(name: str, class_attrs: dict, light: dict, state: dict) -> Any:
    key = (name, json.dumps(class_attrs, sort_keys=True), json.dumps(light, sort_keys=True))
    cls = _LIGHT_CLASSES.get(key)
    if cls is None:
        cls = type(name, (RecordedConfig,), {
            "__module__": __name__, "_light": light, "_record_of_class": (name, class_attrs),
            "_class_values": {k: _decode(v) for k, v in class_attrs.items()}})
        _LIGHT_CLASSES[key] = cls
    config = object.__new__(cls)
    config.__dict__.update(state)
    return config


def _light_config(record: dict) -> Any:
    return _light_from_state(record["class"], record["class_attrs"], record["light"],
                             {k: _decode(v) for k, v in record["values"].items()})


def _config_from_any_record(record: dict) -> Any:
    """A RecordedConfig where the record holds what it needs, else the rebuilt real config."""
    if record.get("light"):
        return _light_config(record)
    return _config_from_record(record)


def _differences(config: Any, rebuilt: Any, skip: Sequence[str] = ()) -> list[str]:
    """The public attributes whose values differ (read quietly: some are deprecated aliases
    that warn). An attribute that is not equal to itself on the original (a property that
    builds a fresh view per read) is compared by type. Names in `skip` are left out."""
    import warnings

    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            want, got = _public_values(config), _public_values(rebuilt)
            out = []
            for name in sorted((set(want) | set(got) | set(vars(config))) - {*skip, _REAL}):
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

    return _through_record(model_dir, "config", _config_from_any_record, load,
                           lambda config, _: _config_record(config))


def load_tokenizer(model_dir: Path, background: bool = False) -> Any:
    """AutoTokenizer.from_pretrained(model_dir, local_files_only=True), or where its record
    says so, a FastTokenizer (pagedllm/tokenizer.py) over the Rust tokenizer transformers had
    configured: checked to answer as transformers' does when the record was made, and
    building that object only when asked for more (see the module docstring). With
    `background`, a FastTokenizer's Rust tokenizer loads on a thread (tokenizer.wait_loaded)."""
    model_dir = Path(model_dir).resolve()
    damaged = False
    if fast_enabled():
        record = _read_record(model_dir)
        fast = None if record is None else record.get("tokenizer_fast")
        if fast:
            try:
                return _fast_tokenizer(model_dir, fast, background)
            except Exception as exc:  # noqa: BLE001 - a damaged record: load the usual way
                logger.warning("tokenizer record of %s not usable (%s)", model_dir, exc)
                damaged = True
    tokenizer = _load_hf_tokenizer(model_dir)
    if fast_enabled():
        record = _read_record(model_dir) or {"format": RECORD_FORMAT}
        if damaged or "tokenizer_fast" not in record:  # recorded (again)
            record["tokenizer_fast"] = _fast_record(tokenizer, model_dir)
            _write_record(model_dir, record)
    return tokenizer


def _load_hf_tokenizer(model_dir: Path) -> Any:
    """transformers' tokenizer, through its recorded class directly where that was checked to
    give the same tokenizer."""
    def load(path: Path) -> Any:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path, local_files_only=True)

    def rebuild(class_name: str) -> Any:
        return _tokenizer_class(class_name).from_pretrained(model_dir, local_files_only=True)

    return _through_record(model_dir, "tokenizer_class", rebuild, load, _tokenizer_record)


def _backend_path(model_dir: Path) -> Path:
    return _record_path(model_dir).with_suffix(".tokenizer.json")


def _fast_tokenizer(model_dir: Path, fast: dict, background: bool = False) -> Any:
    from pagedllm.tokenizer import FastTokenizer

    backend_json = _backend_path(model_dir).read_text()
    if hashlib.sha256(backend_json.encode()).hexdigest() != fast["backend_sha256"]:
        raise ValueError("its Rust tokenizer file has changed")
    return FastTokenizer.from_state(fast["state"], backend_json,
                                    functools.partial(_load_hf_tokenizer, model_dir),
                                    background)


def _fast_record(tokenizer: Any, model_dir: Path) -> dict | None:
    """The FastTokenizer record of a loaded tokenizer (its Rust tokenizer written beside the
    record), or None where one rebuilt from it answers a probe differently."""
    from pagedllm.tokenizer import state_of

    try:
        made = state_of(tokenizer)
        if made is None:
            return None
        state, backend_json = made
        fast = {"state": json.loads(json.dumps(state)),
                "backend_sha256": hashlib.sha256(backend_json.encode()).hexdigest()}
        path = _backend_path(model_dir)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            f.write(backend_json)
        os.replace(tmp, path)
        rebuilt = _fast_tokenizer(model_dir, fast)
        differ = fast_differences(rebuilt, tokenizer)
    except Exception as exc:  # noqa: BLE001 - any failure: keep transformers' tokenizer
        logger.debug("tokenizer of %s has no fast record: %s", model_dir, exc)
        return None
    if differ:
        logger.debug("tokenizer of %s has no fast record: it differs in %s", model_dir, differ)
        return None
    return fast


_PROBE_TEXTS = (_PROBE_TEXT, "", " ", "  leading and trailing  ", "a\n\nb\r\n",
                "don't , isn't . ok ? yes ! it 's", "日本語のテキストと中文", "x" * 300,
                "\u200b\ufeff\x00 odd")


def fast_differences(fast: Any, tokenizer: Any) -> list[str]:
    """What a FastTokenizer answers differently from transformers' tokenizer: encode with and
    without special tokens (of probe texts and of the special tokens written out), decode with
    and without skipping them, ids to tokens, every token's id and text, the special tokens,
    lengths and values. Empty when it answers as transformers' does."""
    from pagedllm.tokenizer import STATE_ATTRIBUTES

    out = []
    specials = list(tokenizer.all_special_tokens)
    texts = [*_PROBE_TEXTS, "".join(specials), " ".join(f"{t} hi" for t in specials)]
    for text in texts:
        for add in (True, False):
            ids = tokenizer.encode(text, add_special_tokens=add)
            if fast.encode(text, add_special_tokens=add) != ids:
                out.append(f"encode({text!r}, add_special_tokens={add})")
            for skip in (False, True):
                if fast.decode(ids, skip_special_tokens=skip) != tokenizer.decode(
                        ids, skip_special_tokens=skip):
                    out.append(f"decode(encode({text!r}), skip_special_tokens={skip})")
            for skip in (False, True):
                if fast.convert_ids_to_tokens(ids, skip_special_tokens=skip) != \
                        tokenizer.convert_ids_to_tokens(ids, skip_special_tokens=skip):
                    out.append(f"convert_ids_to_tokens(encode({text!r}))")
    vocab = tokenizer.get_vocab()
    if fast.get_vocab() != vocab:
        out.append("get_vocab()")
    ids = sorted(vocab.values())
    # NOTE: both decode through the same Rust tokenizer: a sample of single ids (and every
    # special one) checks the wrapper's part, at a 16th of the cost of them all.
    sample = sorted({*ids[::16], *tokenizer.all_special_ids, *ids[-64:]})
    if [fast.decode([i]) for i in sample] != [tokenizer.decode([i]) for i in sample]:
        out.append("decode([id]) of some id")
    if fast.convert_ids_to_tokens(ids) != tokenizer.convert_ids_to_tokens(ids):
        out.append("convert_ids_to_tokens(every id)")
    if fast.decode(ids[:2000], skip_special_tokens=True) != tokenizer.decode(
            ids[:2000], skip_special_tokens=True):
        out.append("decode(ids, skip_special_tokens=True)")
    for name in (*STATE_ATTRIBUTES, "vocab_size", "is_fast"):
        if getattr(fast, name) != getattr(tokenizer, name):
            out.append(name)
    if len(fast) != len(tokenizer):
        out.append("len")
    return out
