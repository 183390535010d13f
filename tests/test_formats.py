"""Packed formats: bit-plane layout, round trips, reference matmuls."""
from __future__ import annotations

import pytest
import torch

from gq_kernels.bcq import reference as bcq_ref
from gq_kernels.lut import reference as lut_ref
from gq_kernels.packing import pack_bitplanes, packed_words, unpack_bitplanes


def _codes(out_f: int, in_f: int, bits: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 1 << bits, (out_f, in_f), generator=g, dtype=torch.int64).to(torch.uint8)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("in_f", [1, 33, 80, 96])
def test_pack_roundtrip(bits, in_f):
    codes = _codes(7, in_f, bits, seed=bits * 100 + in_f)
    q = pack_bitplanes(codes, bits)
    assert q.dtype == torch.int32 and tuple(q.shape) == (bits, 7, packed_words(in_f))
    back = unpack_bitplanes(q, in_f)
    assert back.dtype == torch.uint8 and torch.equal(back, codes)


def test_pack_layout_bit_positions():
    # Column c -> word c // 32, bit c % 32; plane b holds bit b of the code; padding is zero.
    codes = torch.zeros(2, 40, dtype=torch.uint8)
    codes[0, 33] = 0b101  # bits 0 and 2 -> planes 0 and 2, word 1, bit 1
    codes[1, 31] = 0b010  # bit 1 -> plane 1, word 0, bit 31 (the int32 sign bit)
    q = pack_bitplanes(codes, 3)
    expected = torch.zeros(3, 2, 2, dtype=torch.int32)
    expected[0, 0, 1] = 2
    expected[2, 0, 1] = 2
    expected[1, 1, 0] = -(2**31)
    assert torch.equal(q, expected)


def test_pack_all_ones_full_word():
    codes = torch.full((1, 32), 255, dtype=torch.uint8)
    q = pack_bitplanes(codes, 8)
    assert torch.equal(q, torch.full((8, 1, 1), -1, dtype=torch.int32))
    assert torch.equal(unpack_bitplanes(q, 32), codes)


def test_pack_rejects_out_of_range_codes():
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        pack_bitplanes(torch.full((1, 3), 4, dtype=torch.uint8), 2)


def test_unpack_rejects_wrong_width():
    q = pack_bitplanes(_codes(2, 40, 2), 2)
    with pytest.raises(ValueError, match="in_features=70"):
        unpack_bitplanes(q, 70)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lut_matmul_equals_dense(dtype):
    bits, out_f, in_f = 3, 12, 70
    codes = _codes(out_f, in_f, bits)
    codebook = torch.randn(out_f, 1 << bits, generator=torch.Generator().manual_seed(1)).half()
    q = lut_ref.pack(codes, bits)
    w = lut_ref.dequantize(codes, codebook)
    assert torch.equal(lut_ref.dequantize_packed(q, codebook, in_f), w)
    x = torch.randn(2, 5, in_f).to(dtype)
    bias = torch.randn(out_f)
    y = lut_ref.matmul(x, q, codebook, in_f, bias=bias)
    assert y.dtype == dtype and y.shape == (2, 5, out_f)
    # Same op as the dense layer it replaces: bit for bit; and close to the plain formula.
    assert torch.equal(y, torch.nn.functional.linear(x, w.to(dtype), bias.to(dtype)))
    torch.testing.assert_close(y.float(), x.float() @ w.to(dtype).float().T + bias.to(dtype).float(),
                               rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("group_size", [-1, 16, 24])
def test_bcq_matmul_equals_dense(group_size):
    bits, out_f, in_f = 4, 9, 70
    codes = _codes(out_f, in_f, bits)
    g = torch.Generator().manual_seed(2)
    n_g = bcq_ref.n_groups(in_f, group_size)
    scales = torch.rand(out_f, n_g, generator=g).half()
    offsets = torch.randn(out_f, n_g, generator=g).half()
    q = bcq_ref.pack(codes, bits)
    w = bcq_ref.dequantize(codes, scales, offsets, group_size)
    assert torch.equal(bcq_ref.dequantize_packed(q, scales, offsets, group_size, in_f), w)
    x = torch.randn(3, in_f)
    assert torch.equal(bcq_ref.matmul(x, q, scales, offsets, group_size, in_f), x @ w.T)


def test_bcq_rejects_wrong_group_count():
    codes = _codes(4, 64, 2)
    q = bcq_ref.pack(codes, 2)
    s = torch.ones(4, 3, dtype=torch.float16)
    with pytest.raises(ValueError, match="scales must be"):
        bcq_ref.dequantize_packed(q, s, s, 16, 64)
