"""`pagedllm serve` on a Qwen2 directory with a chat template, driven by the official `openai`
client: the chat reply is transformers' greedy continuation of the templated conversation."""

from __future__ import annotations

import pytest
from test_server import ServerProcess


@pytest.fixture(scope="module")
def qwen2_dir(tokenizer_dir, tmp_path_factory):
    from hf_reference import save_tiny_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    # The shipped tokenizer's whole vocabulary: chat text tokenizes to any id.
    config = Qwen2Config(vocab_size=49152, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, tie_word_embeddings=True, bos_token_id=1,
                         eos_token_id=2, pad_token_id=2)
    model_dir = save_tiny_model(Qwen2ForCausalLM(config), tmp_path_factory.mktemp("qwen2"),
                                tokenizer_dir)
    assert (model_dir / "chat_template.jinja").is_file()
    return model_dir


def test_chat_through_the_openai_client_matches_transformers(qwen2_dir, tmp_path):
    from hf_reference import hf_greedy, load_hf_model
    from transformers import AutoTokenizer

    messages = [{"role": "system", "content": "You are terse."},
                {"role": "user", "content": "Name a colour."}]
    tokenizer = AutoTokenizer.from_pretrained(qwen2_dir)
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                           return_dict=False)
    expected = hf_greedy(load_hf_model(qwen2_dir), [list(prompt)], 12)[0]
    server = ServerProcess(qwen2_dir, tmp_path / "server.log", "--num-kv-blocks", "64",
                           "--dtype", "float32")
    try:
        server.wait_ready()
        client = server.client()
        (model,) = [m.id for m in client.models.list().data]
        reply = client.chat.completions.create(
            model=model, messages=messages, max_tokens=12, temperature=0.0, logprobs=True,
            extra_body={"ignore_eos": True})
        assert reply.usage.prompt_tokens == len(prompt)
        assert len(reply.choices[0].logprobs.content) == 12
        assert reply.choices[0].message.content == tokenizer.decode(expected,
                                                                    skip_special_tokens=True)
    finally:
        server.stop()
