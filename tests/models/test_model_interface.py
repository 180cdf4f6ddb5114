"""The model interface: every family loads through its own weight mapping, a checkpoint that
contradicts its config fails at LLM(path) naming the tensor, and the registry lists them all."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from hf_reference import save_tiny_model
from safetensors.torch import load_file, save_file
from torch import nn

from pagedllm import LLM
from pagedllm.layers.linear import Linear
from pagedllm.models.interface import CausalLM, WeightMapping, load_mapped_weights


@pytest.fixture(scope="module")
def tiny_dirs(tokenizer_dir, tmp_path_factory) -> dict[str, Path]:
    """One tiny random GPT-2 and one OPT directory."""
    from transformers import GPT2Config, GPT2LMHeadModel, OPTConfig, OPTForCausalLM

    ids = dict(vocab_size=512, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=64, **ids))
    opt = OPTForCausalLM(OPTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                   ffn_dim=64, max_position_embeddings=64, **ids))
    return {
        "gpt2": save_tiny_model(gpt2, tmp_path_factory.mktemp("gpt2"), tokenizer_dir),
        "opt": save_tiny_model(opt, tmp_path_factory.mktemp("opt"), tokenizer_dir),
    }


def _copy(model_dir: Path, tmp_path: Path, config: dict | None = None,
          edit_weights=None) -> Path:
    """A copy of model_dir with config.json keys overridden and edit_weights(dict) applied."""
    copy = shutil.copytree(model_dir, tmp_path / "model")
    if config:
        path = copy / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
    if edit_weights:
        weights = load_file(copy / "model.safetensors")
        edit_weights(weights)
        save_file(weights, copy / "model.safetensors", metadata={"format": "pt"})
    return copy


@pytest.mark.parametrize("family", ["gpt2", "opt"])
def test_families_implement_the_interface_on_the_packed_cpu_paths(tiny_dirs, family):
    model = LLM(str(tiny_dirs[family]), num_kv_blocks=16).llm_engine.worker.model
    assert isinstance(model, CausalLM)
    # Every projection and the tied LM head run on packed weights.
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    assert linears and all(m.packed is not None for m in linears)
    assert model.tied_lm_head is not None and len(model.packed_weights()) == len(linears) + 1
    logits = model.compute_logits(torch.zeros(3, model.config.hidden_size))
    assert logits.shape == (3, 512) and logits.dtype == torch.float32


def test_more_layers_than_the_checkpoint_holds_names_the_missing_tensors(tiny_dirs, tmp_path):
    model_dir = _copy(tiny_dirs["gpt2"], tmp_path, config={"n_layer": 3})
    with pytest.raises(ValueError, match=r"has no tensor for GPT2LMHeadModel parameter\(s\) "
                                         r"h\.2\.attn\.c_attn\.bias, .* and \d+ more") as exc:
        LLM(str(model_dir))
    assert str(model_dir) in str(exc.value)


def test_a_missing_packed_shard_is_named_as_the_checkpoint_names_it(tiny_dirs, tmp_path):
    def drop(weights):
        del weights["model.decoder.layers.1.self_attn.k_proj.weight"]

    model_dir = _copy(tiny_dirs["opt"], tmp_path, edit_weights=drop)
    with pytest.raises(ValueError, match=r"parameter\(s\) layers\.1\.self_attn\.k_proj\.weight: "
                                         r"does the config match"):
        LLM(str(model_dir))


def test_a_wrong_shape_names_the_tensor(tiny_dirs, tmp_path):
    model_dir = _copy(tiny_dirs["opt"], tmp_path, config={"ffn_dim": 48})
    # The first fc1 tensor in the file's (sorted) order is the bias.
    with pytest.raises(ValueError, match=r"'model\.decoder\.layers\.0\.fc1\.bias' has shape "
                                         r"\(64,\), but the config makes it \(48,\)"):
        LLM(str(model_dir))


def test_a_tensor_without_a_place_is_named(tiny_dirs, tmp_path):
    def add(weights):
        weights["transformer.h.0.attn.q_attn.weight"] = torch.zeros(32, 32)

    model_dir = _copy(tiny_dirs["gpt2"], tmp_path, edit_weights=add)
    with pytest.raises(ValueError, match=r"'transformer\.h\.0\.attn\.q_attn\.weight' has no place "
                                         r"in GPT2LMHeadModel"):
        LLM(str(model_dir))


def test_an_unknown_architecture_lists_every_family(tiny_dirs, tmp_path):
    model_dir = _copy(tiny_dirs["opt"], tmp_path, config={"architectures": ["BloomForCausalLM"]})
    with pytest.raises(ValueError, match=r"BloomForCausalLM is not supported; supported: "
                                         r"LlamaForCausalLM, GPT2LMHeadModel, OPTForCausalLM"):
        LLM(str(model_dir))


def test_an_unknown_activation_is_refused(tiny_dirs, tmp_path):
    model_dir = _copy(tiny_dirs["gpt2"], tmp_path, config={"activation_function": "swish"})
    with pytest.raises(ValueError, match=r"activation_function 'swish' is not supported"):
        LLM(str(model_dir))


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv = Linear(2, 6, bias=False)
        self.qkv.shard_sizes = [2, 2, 2]
        self.out = Linear(2, 2, bias=False)


def test_mapping_packs_shards_transposes_and_defers_to_a_weight_loader():
    """The seam a sharded or quantized layer plugs into: a parameter with a weight_loader
    receives its checkpoint tensor (and shard) instead of being copied into."""
    model = _Tiny()
    received = []
    model.out.weight.weight_loader = lambda param, tensor, shard: received.append((tensor, shard))
    mapping = WeightMapping(prefixes={"model.": ""}, transposed_suffixes=("out.weight",),
                            packed_modules={"q": ("qkv", 0), "k": ("qkv", 1), "v": ("qkv", 2)})
    weights = [(f"model.{name}.weight", torch.full((2, 2), float(i)))
               for i, name in enumerate(["q", "k", "v"])]
    out = torch.arange(4.0).view(2, 2)
    loaded = load_mapped_weights(model, [*weights, ("model.out.weight", out)], mapping)
    assert loaded == {"qkv.weight", "out.weight"}
    assert model.qkv.weight[:, 0].tolist() == [0, 0, 1, 1, 2, 2]
    [(tensor, shard)] = received
    assert shard is None and torch.equal(tensor, out.t())
