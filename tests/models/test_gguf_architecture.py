"""A GGUF file of an architecture transformers cannot read is refused at LLM(path), naming the
file and its architecture, before anything is built."""

from __future__ import annotations

import numpy as np
import pytest

from pagedllm import LLM


def test_a_gguf_of_an_unsupported_architecture_is_refused(tmp_path) -> None:
    import gguf

    path = tmp_path / "tiny-rwkv.gguf"
    writer = gguf.GGUFWriter(str(path), arch="rwkv6")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match=r"'tiny-rwkv\.gguf' cannot be loaded: .*rwkv6.*"
                                         r"LlamaForCausalLM"):
        LLM(str(path))
