"""The quantized linear kernels against the gguf package's dequantization, then a matmul.

Weights are random blocks of each GGUF format (random bytes, scale fields set to sane fp16
values), so every bit pattern of the quantized values is exercised. With quantized activations
(8 bits: per block of 32, scale max|x| / 127, round to nearest even; 16 bits, the default: the
same with 127 * 255 steps, multiplied as two int8 planes; on the panels, 8 bits per group of
16 too: two scales per block) the kernel must match the matmul of
the same activations quantized as the kernel quantizes them up to fp32 summation, and the
unquantized matmul within the bound that activation rounding allows (sum |w| |x - x_q|); with
activation quantization off (the ops' test hook), the unquantized matmul up to fp32 summation.
Both integer paths run here: AVX512-VNNI and the forced AVX2 one.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QT
from gguf.quants import dequantize

from pagedllm.layers.quantization.int8 import int8_round_trip
from pagedllm.ops import cpu_ops, cpu_ops_error

ROWS = [1, 3, 8, 64, 300]
# Byte offsets of each format's fp16 fields within a block (d, then a minimum where it has one).
HALF_FIELDS = {QT.Q8_0: [0], QT.Q4_0: [0], QT.Q4_1: [0, 2], QT.Q4_K: [0, 2], QT.Q5_K: [0, 2],
               QT.Q6_K: [208]}
FORMATS = list(HALF_FIELDS)
BITS = [8, 16]
QMAX = {8: 127, 16: 127 * 255}
# The panels' activation schemes: (bits, values per scale).
PANEL_SCHEMES = [(8, 32), (16, 32), (8, 16)]


@pytest.fixture(autouse=True)
def _need_ops() -> None:
    if cpu_ops() is None:
        pytest.skip(f"CPU ops unavailable: {cpu_ops_error()}")


def isas() -> list[str]:
    """The integer paths this machine runs: VNNI where the build has it, AVX2 forced."""
    ops = cpu_ops()
    best = ops.quant_kernel_isa() if ops is not None else "scalar"
    return {"avx512_vnni": ["avx512_vnni", "avx2"], "avx2": ["avx2"]}.get(best, ["scalar"])


@contextlib.contextmanager
def kernel_isa(name: str):
    cpu_ops().set_quant_kernel_isa(name)
    try:
        yield
    finally:
        cpu_ops().set_quant_kernel_isa("auto")


def random_blocks(qtype: QT, n: int, k: int, seed: int) -> np.ndarray:
    """[n, bytes per row] uint8: random blocks with fp16 scales in [0.002, 0.02]."""
    rng = np.random.default_rng(seed)
    values, nbytes = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(n, k // values, nbytes), dtype=np.uint8)
    for i, offset in enumerate(HALF_FIELDS[qtype]):
        field = rng.uniform(0.002, 0.02, size=(n, k // values)).astype(np.float16)
        if qtype == QT.Q4_1 and i == 1:  # Q4_1's minimum: negative, about -8 d
            field = (-8 * field).astype(np.float16)
        raw[:, :, offset:offset + 2] = field.view(np.uint8).reshape(n, k // values, 2)
    return raw.reshape(n, -1)


def quantized_activations(x: torch.Tensor, bits: int = 16, group: int = 32) -> torch.Tensor:
    """x as the kernel sees it: integer groups of 32 (or 16; zero-padded) times their scales."""
    m, k = x.shape
    qmax = QMAX[bits]
    padded = torch.nn.functional.pad(x.float(), (0, -k % 32)).view(m, -1, group)
    d = padded.abs().amax(-1, keepdim=True) / qmax
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    return (torch.round(padded * inv).clamp(-qmax, qmax) * d).view(m, -1)[:, :k]


def check_against(out: torch.Tensor, x: torch.Tensor, w: torch.Tensor, bias, quantized: bool,
                  bits: int = 16, group: int = 32):
    """out against x @ w.T + bias in float64, with the tolerance the mode allows."""
    x64, w64 = x.double(), w.double()
    ref = x64 @ w64.T + (0 if bias is None else bias.double())
    out = out.double()
    summation = 2e-6 * (x64.abs() @ w64.abs().T) + 1e-6
    if not quantized:
        assert ((out - ref).abs() <= summation).all(), (out - ref).abs().max()
        return
    xq = quantized_activations(x, bits, group).double()
    ref_q = xq @ w64.T + (0 if bias is None else bias.double())
    assert ((out - ref_q).abs() <= summation).all(), (out - ref_q).abs().max()
    rounding = (x64 - xq).abs() @ w64.abs().T
    assert ((out - ref).abs() <= rounding + summation).all()


def gguf_linear(x, raw: torch.Tensor, qtype: QT, bias=None, quantize=True, out_dtype=None,
                bits: int | None = None):
    """The op; bits None: its default activation precision."""
    out = torch.empty(x.shape[0], raw.shape[0], dtype=out_dtype or x.dtype)
    args = (out, x, raw, int(qtype), torch.empty(0) if bias is None else bias, quantize)
    cpu_ops().gguf_linear(*args) if bits is None else cpu_ops().gguf_linear(*args, bits)
    return out


@pytest.mark.parametrize("qtype", FORMATS, ids=lambda q: q.name)
def test_dequantize_rows_equals_gguf(qtype: QT) -> None:
    raw = random_blocks(qtype, 24, 512, seed=1)
    ref = torch.from_numpy(dequantize(raw, qtype).astype(np.float32))
    ids = torch.tensor([5, 0, 23, 5])
    out = torch.empty(4, 512)
    cpu_ops().gguf_dequantize_rows(out, torch.from_numpy(raw), int(qtype), ids)
    assert torch.equal(out, ref[ids])
    out_bf16 = torch.empty(4, 512, dtype=torch.bfloat16)
    cpu_ops().gguf_dequantize_rows(out_bf16, torch.from_numpy(raw), int(qtype), ids)
    assert torch.equal(out_bf16, ref[ids].bfloat16())


@pytest.mark.parametrize("qtype", FORMATS, ids=lambda q: q.name)
def test_gguf_linear_equals_dequantize_then_matmul(qtype: QT) -> None:
    # K = 512 for the 256-value formats; 96 (a half chunk past the last 64) for the others.
    k = 512 if GGML_QUANT_SIZES[qtype][0] == 256 else 96
    raw_np = random_blocks(qtype, 37, k, seed=int(qtype))
    raw = torch.from_numpy(raw_np)
    w = torch.from_numpy(dequantize(raw_np, qtype).astype(np.float32))
    gen = torch.Generator().manual_seed(0)
    bias = torch.randn(37, generator=gen)
    for isa in isas():
        with kernel_isa(isa):
            for rows in ROWS:
                x = torch.randn(rows, k, generator=gen)
                x[0, :40] = 0.0  # an all-zero block (scale 0)
                for bits in BITS:
                    out = gguf_linear(x, raw, qtype, bias, bits=bits)
                    check_against(out, x, w, bias, quantized=True, bits=bits)
                    # Batch invariance: a row's bits are the same alone.
                    for i in {0, rows // 2, rows - 1}:
                        alone = gguf_linear(x[i:i + 1], raw, qtype, bias, bits=bits)
                        assert torch.equal(alone[0], out[i])
                assert torch.equal(gguf_linear(x, raw, qtype, bias), out)  # default: 16
                check_against(gguf_linear(x, raw, qtype, bias, quantize=False), x, w, bias,
                              quantized=False)


def test_bf16_activations_and_outputs() -> None:
    raw_np = random_blocks(QT.Q4_1, 50, 576, seed=3)
    raw = torch.from_numpy(raw_np)
    w = torch.from_numpy(dequantize(raw_np, QT.Q4_1).astype(np.float32))
    x = torch.randn(9, 576, generator=torch.Generator().manual_seed(1)).bfloat16()
    out32 = gguf_linear(x, raw, QT.Q4_1, out_dtype=torch.float32)
    check_against(out32, x.float(), w, None, quantized=True)
    assert torch.equal(gguf_linear(x, raw, QT.Q4_1), out32.bfloat16())
    # A strided x (a view into wider rows) gives the same result.
    wide = torch.zeros(9, 700, dtype=torch.bfloat16)
    wide[:, 7:583] = x
    assert torch.equal(gguf_linear(wide[:, 7:583], raw, QT.Q4_1, out_dtype=torch.float32), out32)


def test_int8_linear_equals_dequantize_then_matmul() -> None:
    gen = torch.Generator().manual_seed(4)
    weight = torch.randn(45, 100, generator=gen)
    weight[3] = 0.0  # a zero row: scale 0
    q, scales = cpu_ops().pack_int8_weight(weight)
    assert q.shape == (45, 128) and q.dtype == torch.uint8
    assert torch.equal(q[:, 100:], torch.full((45, 28), 128, dtype=torch.uint8))
    w = (q[:, :100].float() - 128) * scales[:, None]
    # The scales the torch round trip picks (least squared error), to rounding of the search.
    torch.testing.assert_close(w, int8_round_trip(weight), rtol=0, atol=1e-6)
    inv = torch.where(scales == 0, 0, 1 / scales)
    assert torch.equal(q[:, :100].float() - 128,
                       torch.round(weight * inv[:, None]).clamp(-127, 127))
    # No worse than the plain max |row| / 127 scale.
    plain_scale = weight.abs().amax(1, keepdim=True) / 127
    plain = torch.round(weight / plain_scale.clamp_min(1e-30)).clamp(-127, 127) * plain_scale
    assert ((w - weight).pow(2).sum(1) <= (plain - weight).pow(2).sum(1) + 1e-9).all()
    bias = torch.randn(45, generator=gen)
    check_int8_linear(q, scales, w, bias, gen)


@pytest.mark.parametrize("group_size", [32, 64])
def test_int8_groups_equal_dequantize_then_matmul(group_size: int) -> None:
    """A scale per group of inputs: the same rounding per group, the same kernel."""
    gen = torch.Generator().manual_seed(9)
    weight = torch.randn(21, 100, generator=gen)
    weight[2, 64:] = 0.0  # a zero group
    weight[5, :10] *= 30  # an outlier group
    q, scales = cpu_ops().pack_int8_weight(weight, group_size)
    assert q.shape == (21, 128) and scales.shape == (21, 128 // group_size)
    w = (q[:, :100].float() - 128) * scales.repeat_interleave(group_size, 1)[:, :100]
    torch.testing.assert_close(w, int8_round_trip(weight, group_size), rtol=0, atol=1e-6)
    # Finer than one scale per row on the outlier row.
    per_row = int8_round_trip(weight)
    assert (w[5] - weight[5]).pow(2).sum() < (per_row[5] - weight[5]).pow(2).sum()
    check_int8_linear(q, scales, w, torch.randn(21, generator=gen), gen)
    with pytest.raises(RuntimeError, match="group_size must be 0 .* or a multiple of 16"):
        cpu_ops().pack_int8_weight(weight, 48)


def check_int8_linear(q, scales, w, bias, gen) -> None:
    n, k = w.shape
    for isa in isas():
        with kernel_isa(isa):
            for rows in ROWS:
                x = torch.randn(rows, k, generator=gen)
                for bits in BITS:
                    out = torch.empty(rows, n)
                    cpu_ops().int8_linear(out, x, q, scales, bias, True, bits)
                    check_against(out, x, w, bias, quantized=True, bits=bits)
                    alone = torch.empty(1, n)
                    cpu_ops().int8_linear(alone, x[-1:], q, scales, bias, True, bits)
                    assert torch.equal(alone[0], out[-1])
                out = torch.empty(rows, n)
                cpu_ops().int8_linear(out, x, q, scales, bias, False)
                check_against(out, x, w, bias, quantized=False)


def test_isa_paths_agree_on_integer_sums() -> None:
    """VNNI and AVX2 sum the same integers; only the fp32 accumulation order differs."""
    raw_np = random_blocks(QT.Q8_0, 16, 256, seed=5)
    raw = torch.from_numpy(raw_np)
    x = torch.randn(5, 256, generator=torch.Generator().manual_seed(2))
    for bits in BITS:
        results = []
        for isa in isas():
            with kernel_isa(isa):
                results.append(gguf_linear(x, raw, QT.Q8_0, bits=bits))
        for other in results[1:]:
            torch.testing.assert_close(other, results[0], rtol=1e-6, atol=1e-5)


def test_activation_bits() -> None:
    """16-bit activations: 256 times finer steps than 8-bit; any other width is refused."""
    raw_np = random_blocks(QT.Q4_1, 64, 576, seed=8)
    w = torch.from_numpy(dequantize(raw_np, QT.Q4_1).astype(np.float32)).double()
    x = torch.randn(4, 576, generator=torch.Generator().manual_seed(3))
    exact = x.double() @ w.T
    err = {bits: (gguf_linear(x, torch.from_numpy(raw_np), QT.Q4_1, bits=bits).double()
                  - exact).abs().max().item() for bits in BITS}
    assert err[16] < err[8] / 50, err
    with pytest.raises(RuntimeError, match="activation_bits must be 8 or 16, got 12"):
        gguf_linear(x, torch.from_numpy(raw_np), QT.Q4_1, bits=12)
    # On the panels, 8-bit activations with a scale per 16 inputs: finer than per 32; only
    # with 8 bits, and only on panels.
    packed, fmt = panels(raw_np, QT.Q4_1)
    err_g = {group: (panel_linear(x, packed, fmt, bits=8, group=group).double()
                     - exact).abs().max().item() for group in (16, 32)}
    assert err_g[16] < err_g[32], err_g
    with pytest.raises(RuntimeError, match="activation_group must be 32, or 16 with 8-bit"):
        panel_linear(x, packed, fmt, bits=16, group=16)
    with pytest.raises(RuntimeError, match="activation_group must be 32, or 16 with 8-bit"):
        panel_linear(x, packed, fmt, bits=8, group=64)
    with pytest.raises(RuntimeError, match="activation_group 16 needs a weight repacked"):
        out = torch.empty(4, 64)
        cpu_ops().gguf_linear(out, x, torch.from_numpy(raw_np), int(QT.Q4_1), torch.empty(0),
                              True, 8, 16)


def test_bad_input_dimension_is_refused() -> None:
    raw = torch.from_numpy(random_blocks(QT.Q8_0, 4, 64, seed=6))
    with pytest.raises(RuntimeError, match="not a multiple of this format's block of 32"):
        gguf_linear(torch.randn(2, 48), raw[:, :51], QT.Q8_0)
    raw_k = torch.from_numpy(random_blocks(QT.Q4_K, 4, 256, seed=7))
    with pytest.raises(RuntimeError, match="not a multiple of this format's block of 256"):
        gguf_linear(torch.randn(2, 288), raw_k, QT.Q4_K)
    with pytest.raises(RuntimeError, match="a weight row has 68 bytes; 96 inputs"):
        gguf_linear(torch.randn(2, 96), raw, QT.Q8_0)
    with pytest.raises(RuntimeError, match="unsupported quantized format 6"):
        gguf_linear(torch.randn(2, 64), raw, QT.Q5_0)


PANEL_TYPES = [QT.Q4_0, QT.Q4_1, QT.Q8_0, QT.Q4_K, QT.Q5_K, QT.Q6_K]
PANEL_FORMAT = 2000  # ops/csrc/quant.h: kPanelFormat


def panels(raw_np: np.ndarray, qtype: QT) -> tuple[torch.Tensor, int]:
    """A copy of raw blocks repacked into panels of 16 rows, and the format id the op takes."""
    packed = torch.from_numpy(raw_np.copy())
    fmt = cpu_ops().gguf_pack_panels_(packed, int(qtype))
    assert fmt == PANEL_FORMAT + int(qtype) and packed.shape == raw_np.shape
    return packed, fmt


def panel_linear(x, packed: torch.Tensor, fmt: int, bias=None, quantize=True,
                 bits: int | None = None, group: int = 32):
    out = torch.empty(x.shape[0], packed.shape[0], dtype=x.dtype)
    args = (out, x, packed, fmt, torch.empty(0) if bias is None else bias, quantize)
    if bits is None:
        cpu_ops().gguf_linear(*args)
    else:
        cpu_ops().gguf_linear(*args, bits, group)
    return out


@pytest.mark.parametrize("qtype", PANEL_TYPES, ids=lambda q: q.name)
def test_panels_equal_dequantize_then_matmul(qtype: QT) -> None:
    # 100 rows: 6 whole panels of 16 (3 work items of 2 panels) and 4 rows left as stored;
    # K: 3 blocks of 32, or 2 superblocks of the K-quants' 256.
    n, k = 100, 512 if GGML_QUANT_SIZES[qtype][0] == 256 else 96
    raw_np = random_blocks(qtype, n, k, seed=10 + int(qtype))
    packed, fmt = panels(raw_np, qtype)
    assert not torch.equal(packed, torch.from_numpy(raw_np))
    w = torch.from_numpy(dequantize(raw_np, qtype).astype(np.float32))
    # Every row dequantizes to the gguf package's values (the tied embedding's lookup).
    ids = torch.tensor([0, 17, 95, 96, 99, 50])
    rows = torch.empty(len(ids), k)
    cpu_ops().gguf_dequantize_rows(rows, packed, fmt, ids)
    assert torch.equal(rows, w[ids])
    gen = torch.Generator().manual_seed(4)
    bias = torch.randn(n, generator=gen)
    # 5 and 6: a 4-row tile, then the 1- or 2-row tile.
    for rows in ROWS + [5, 6]:
        x = torch.randn(rows, k, generator=gen)
        x[0, :40] = 0.0  # an all-zero block (scale 0)
        outs = {}
        for bits, group in PANEL_SCHEMES:
            per_isa = []
            for isa in isas() + ["scalar"]:
                with kernel_isa(isa):
                    out = panel_linear(x, packed, fmt, bias, bits=bits, group=group)
                    check_against(out, x, w, bias, quantized=True, bits=bits, group=group)
                    # Batch invariance: a row's bits are the same alone.
                    for i in {0, rows // 2, rows - 1}:
                        alone = panel_linear(x[i:i + 1], packed, fmt, bias, bits=bits,
                                             group=group)
                        assert torch.equal(alone[0], out[i])
                per_isa.append(out)
            # Every integer path does each output's float operations alike: the same bits.
            for other in per_isa[1:]:
                assert torch.equal(other, per_isa[0])
            outs[bits, group] = per_isa[0]
        # The op's default: the process's GGUF activations (set_gguf_activations).
        assert torch.equal(panel_linear(x, packed, fmt, bias),
                           outs[tuple(cpu_ops().gguf_activations())])
        check_against(panel_linear(x, packed, fmt, bias, quantize=False), x, w, bias,
                      quantized=False)


def test_panels_take_bf16_and_refuse_other_types() -> None:
    raw_np = random_blocks(QT.Q4_1, 48, 576, seed=11)
    packed, fmt = panels(raw_np, QT.Q4_1)
    x = torch.randn(5, 576, generator=torch.Generator().manual_seed(5)).bfloat16()
    out = panel_linear(x, packed, fmt)
    w = torch.from_numpy(dequantize(raw_np, QT.Q4_1).astype(np.float32))
    out32 = torch.empty(5, 48)
    cpu_ops().gguf_linear(out32, x, packed, fmt, torch.empty(0))
    check_against(out32, x.float(), w, None, quantized=True)
    assert torch.equal(out, out32.bfloat16())
    raw_5 = torch.from_numpy(random_blocks(QT.Q8_0, 16, 64, seed=12))[:, :44]  # Q5_0's size
    with pytest.raises(RuntimeError, match="panels take Q4_0 .* not format 6"):
        cpu_ops().gguf_pack_panels_(raw_5.contiguous(), int(QT.Q5_0))


def test_a_tied_embedding_reads_the_packed_blocks() -> None:
    """A tied LM head repacks the token table in place; the embedding, another tensor over the
    same bytes, then looks its rows up in the panel layout."""
    from pagedllm.layers.quantization.gguf import _pack_panels, stored_format

    raw_np = random_blocks(QT.Q8_0, 40, 64, seed=13)
    head = torch.from_numpy(raw_np.copy())
    embedding = head[:]  # a second tensor over the storage, as the loader hands them over
    assert _pack_panels(head, int(QT.Q8_0)) == PANEL_FORMAT + int(QT.Q8_0)
    assert _pack_panels(embedding, int(QT.Q8_0)) == PANEL_FORMAT + int(QT.Q8_0)  # packed once
    fmt = stored_format(embedding, int(QT.Q8_0))
    assert fmt == PANEL_FORMAT + int(QT.Q8_0)
    ids = torch.tensor([39, 0, 16, 33])
    out = torch.empty(4, 64)
    cpu_ops().gguf_dequantize_rows(out, embedding, fmt, ids)
    ref = torch.from_numpy(dequantize(raw_np, QT.Q8_0).astype(np.float32))
    assert torch.equal(out, ref[ids])


@pytest.mark.parametrize("qtype", [QT.Q4_1, QT.Q8_0], ids=lambda q: q.name)
def test_panel_prefetch_changes_no_bits(qtype: QT) -> None:
    """The tiles' prefetching (set_panel_prefetch_bytes, a tuning hook) moves no result: the
    same bits with none, with a short and with the default distance, past the weight's end
    included (100 rows: 6 panels, then 4 rows repacked per call), bf16 outputs with and
    without a bias (whole panels are stored in vectors, the rest one value at a time)."""
    raw_np = random_blocks(qtype, 100, 576, seed=14)
    packed, fmt = panels(raw_np, qtype)
    gen = torch.Generator().manual_seed(6)
    bias = torch.randn(100, generator=gen)
    x = torch.randn(5, 576, generator=gen).bfloat16()
    results = []
    try:
        for distance in (0, 64, 2048):
            cpu_ops().set_panel_prefetch_bytes(distance)
            results.append([panel_linear(x[:rows], packed, fmt, b)
                            for rows in (1, 5) for b in (None, bias)])
    finally:
        cpu_ops().set_panel_prefetch_bytes(2048)
    for other in results[1:]:
        for got, want in zip(other, results[0]):
            assert torch.equal(got, want)
    # The vector stores round as the scalar ones: a row's bits alone are those of its batch.
    for alone, batch in ((results[0][0], results[0][2]), (results[0][1], results[0][3])):
        assert torch.equal(alone[0], batch[0])
