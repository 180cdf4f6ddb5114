"""One source of engine settings: EngineConfig's fields make LLM's keywords and the CLI's flags."""

from __future__ import annotations

import argparse
import dataclasses
import inspect

import pytest

from pagedllm import LLM
from pagedllm.config import EngineConfig
from pagedllm.entrypoints.cli import build_parser

SETTINGS = {f.name: f for f in dataclasses.fields(EngineConfig)}


def _engine_flags(command: str) -> dict[str, argparse.Action]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {action.dest: action for action in sub.choices[command]._actions
            if action.dest in SETTINGS}


def test_llm_keywords_are_the_settings_with_their_defaults():
    params = dict(inspect.signature(LLM).parameters)
    assert set(params) == set(SETTINGS)
    for name, field in SETTINGS.items():
        assert params[name].default == field.default, name


def test_llm_refuses_an_unknown_keyword_naming_it():
    with pytest.raises(TypeError, match="num_gpu_blocks"):
        LLM(num_gpu_blocks=8)


@pytest.mark.parametrize("command", ["generate", "serve"])
def test_every_setting_is_a_flag_with_the_same_default(command):
    flags = _engine_flags(command)
    assert set(flags) == set(SETTINGS)
    for name, action in flags.items():
        assert action.default == SETTINGS[name].default, name
        assert action.option_strings[0] == "--" + name.replace("_", "-")
        assert action.help, name


def test_parsed_flags_become_the_same_config():
    args = build_parser().parse_args(
        ["serve", "--dtype", "bfloat16", "--block-size", "32", "--swap-space", "0.5",
         "--no-enable-prefix-caching", "--preemption-mode", "swap", "--num-kv-blocks", "7"])
    config = EngineConfig(**EngineConfig.kwargs_from_cli_args(args))
    assert config == EngineConfig(dtype="bfloat16", block_size=32, swap_space=0.5,
                                  enable_prefix_caching=False, preemption_mode="swap",
                                  num_kv_blocks=7)
    defaults = build_parser().parse_args(["generate", "hi"])
    assert EngineConfig(**EngineConfig.kwargs_from_cli_args(defaults)) == EngineConfig()


def test_short_aliases_as_vllm_has_them():
    args = build_parser().parse_args(["serve", "-tp", "1"])
    assert args.tensor_parallel_size == 1


def test_a_flag_choice_outside_the_settings_check_is_refused():
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--preemption-mode", "drop"])
    with pytest.raises(ValueError, match="preemption_mode"):
        EngineConfig(preemption_mode="drop")
