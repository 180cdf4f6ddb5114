"""The many-row tiles of the GGUF panel kernel (ops/csrc/quant_panels_gemm.cpp) against the
panel kernel's own tiles, bit for bit.

The reference is the scalar integer path, which never takes the many-row tiles (nor does the
forced AVX2 one): every output of the VNNI kernel must equal it exactly at every row count
1..300 (tiles of 4 rows, then the panel kernel's 1-3 row tiles; row blocks of 64 rows at
K = 2048), for Q4_0, Q4_1, Q8_0, Q4_K, Q5_K and Q6_K, 8- and 16-bit activations, fp32 and bf16, with and
without bias (8-bit ones with a scale per 32 or per 16 inputs), and a row's bits must be the
same alone as in any batch.
"""

from __future__ import annotations

import pytest
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QT
from test_quant_kernels import isas, kernel_isa, panels, random_blocks

from pagedllm.ops import cpu_ops, cpu_ops_error

PANEL_TYPES = [QT.Q4_0, QT.Q4_1, QT.Q8_0, QT.Q4_K, QT.Q5_K, QT.Q6_K]


@pytest.fixture(autouse=True)
def _need_ops() -> None:
    if cpu_ops() is None:
        pytest.skip(f"CPU ops unavailable: {cpu_ops_error()}")


def linear(x: torch.Tensor, packed: torch.Tensor, fmt: int, bias, bits: int,
           group: int = 32) -> torch.Tensor:
    out = torch.empty(x.shape[0], packed.shape[0], dtype=x.dtype)
    cpu_ops().gguf_linear(out, x, packed, fmt, torch.empty(0) if bias is None else bias, True,
                          bits, group)
    return out


def activations(rows: int, k: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(seed)).to(dtype)
    x[1] = 0.0  # a zero row: every sum is 0 (stored as +0 without bias)
    x[2, :40] = 0.0  # an all-zero block (scale 0)
    x[3] *= 1e4  # large values
    return x


@pytest.mark.parametrize("qtype", PANEL_TYPES, ids=lambda q: q.name)
def test_every_row_count_equals_the_panel_kernel(qtype: QT) -> None:
    # 100 weight rows: 3 items of 2 whole panels (the many-row tiles), 4 rows as stored.
    n, k = 100, 256 if GGML_QUANT_SIZES[qtype][0] == 256 else 96
    packed, fmt = panels(random_blocks(qtype, n, k, seed=20 + int(qtype)), qtype)
    bias = torch.randn(n, generator=torch.Generator().manual_seed(1))
    for dtype, b, bits, group in [(torch.float32, bias, 16, 32), (torch.bfloat16, None, 16, 32),
                                  (torch.bfloat16, bias, 8, 32), (torch.float32, None, 8, 32),
                                  (torch.bfloat16, bias, 8, 16), (torch.float32, None, 8, 16)]:
        x = activations(300, k, dtype, seed=int(qtype) + bits)
        with kernel_isa("scalar"):
            ref = linear(x, packed, fmt, b, bits, group)
        for isa in isas():
            with kernel_isa(isa):
                counts = range(1, 301) if isa == "avx512_vnni" else [1, 7, 64, 300]
                for rows in counts:
                    out = linear(x[:rows], packed, fmt, b, bits, group)
                    assert torch.equal(out, ref[:rows]), (isa, dtype, bits, group, rows)
                for i in [0, 1, 2, 3, 150, 299]:
                    assert torch.equal(linear(x[i:i + 1], packed, fmt, b, bits, group)[0], ref[i])


@pytest.mark.parametrize("qtype", PANEL_TYPES, ids=lambda q: q.name)
def test_row_blocks_and_a_wide_weight(qtype: QT) -> None:
    # K = 2048: row blocks of 64 rows (16-bit) or 128 (8-bit); 160 weight rows, 5 items.
    n, k = 160, 2048
    packed, fmt = panels(random_blocks(qtype, n, k, seed=30 + int(qtype)), qtype)
    bias = torch.randn(n, generator=torch.Generator().manual_seed(2))
    for bits, group in [(8, 32), (16, 32), (8, 16)]:
        x = activations(261, k, torch.bfloat16, seed=40 + bits)
        with kernel_isa("scalar"):
            ref = linear(x, packed, fmt, bias, bits, group)
        for isa in isas():
            with kernel_isa(isa):
                for rows in [4, 63, 64, 65, 130, 261]:
                    assert torch.equal(linear(x[:rows], packed, fmt, bias, bits, group),
                                       ref[:rows])


@pytest.mark.slow  # ~20 s of CPU, 45-90 s on the shared machine (each)
@pytest.mark.parametrize("k_quants", [False, True], ids=["32-value types", "K-quants"])
def test_a_gguf_request_is_batch_invariant(tmp_path, k_quants: bool) -> None:
    """Through the engine on the quantized path (a tiny GGUF: Q8_0, Q4_0 and Q4_1 panels; or
    Q4_K, Q5_K and Q6_K panels beside Q8_0, hidden 256): a request's tokens and logprobs alone
    equal those among others of random lengths (steps of 1 to ~600 rows: the many-row tiles
    and every remainder tile), and prefilled in chunks."""
    from engine.test_batch_invariance import crowd_failures
    from models.test_quantized import write_tiny_llama_gguf

    path = tmp_path / "tiny-llama.gguf"
    if k_quants:
        write_tiny_llama_gguf(path, {"attn_q": "Q4_K", "attn_v": "Q6_K", "attn_output": "Q5_K",
                                     "ffn_gate": "Q4_K", "ffn_up": "Q5_K", "ffn_down": "Q6_K"},
                              hidden=256, ffn=512)
    else:
        write_tiny_llama_gguf(path, {"attn_v": "Q4_0", "ffn_gate": "Q4_1", "ffn_up": "Q4_1"})
    base = {"dtype": "bfloat16", "quantization": "auto", "block_size": 16, "num_kv_blocks": 256,
            "seed": 0}
    failures = crowd_failures(str(path), base)
    assert not failures, "\n".join(failures)
