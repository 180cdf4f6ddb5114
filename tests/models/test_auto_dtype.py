"""dtype "auto" follows the checkpoint: bf16 and fp16 checkpoints run in bfloat16 on CPU,
float32 ones in float32; a GGUF file in bfloat16 where the CPU multiplies bf16 natively."""

from __future__ import annotations

import pytest
import torch
from hf_reference import save_tiny_model

from pagedllm import LLM
from pagedllm.models.default_model import auto_dtype


@pytest.mark.parametrize("saved,expected", [(torch.float32, "float32"),
                                            (torch.bfloat16, "bfloat16"),
                                            (torch.float16, "bfloat16")])
def test_auto_follows_the_checkpoint(tokenizer_dir, tmp_path, saved, expected) -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=512, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=64)
    model = Qwen2ForCausalLM(config)
    save_tiny_model(model, tmp_path, tokenizer_dir)
    if saved != torch.float32:  # saved again in that dtype: config.json says so
        model.to(saved).save_pretrained(tmp_path)
    llm = LLM(str(tmp_path), num_kv_blocks=16)
    assert llm.llm_engine.config.dtype == expected
    assert llm.llm_engine.config.torch_dtype == getattr(torch, expected)
    out = llm.generate([{"prompt_token_ids": [5, 6, 7]}], use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) > 0


def test_a_gguf_runs_in_bf16_where_the_cpu_multiplies_it() -> None:
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    expected = "bfloat16" if native else "float32"
    assert auto_dtype("model.Q4_K_M.gguf", None) == expected
    assert auto_dtype(None, None) == expected  # the shipped GGUF
    assert auto_dtype("model.gguf", None, device="cuda") == "bfloat16"
