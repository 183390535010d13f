"""Triton ``lut`` kernels (kernels/lut/triton_kernels.py) against the PyTorch reference.

Without a GPU they run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1); the
``gpu`` tests repeat the checks compiled on CUDA, Llama-2-7B shapes included.
"""
from __future__ import annotations

import os

import pytest
import torch

triton = pytest.importorskip("triton", reason="Triton is not installed (pip install triton)")

CUDA = torch.cuda.is_available()
INTERPRETED = not CUDA
if INTERPRETED and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA: set TRITON_INTERPRET=1 to run the Triton kernels in the interpreter",
                allow_module_level=True)

from gq_kernels.lut import reference as ref  # noqa: E402
from gq_kernels.lut.triton_kernels import MAX_GEMV_ROWS, lut_dequantize, lut_gemv  # noqa: E402

# ||y - y_ref|| / ||y_ref||: both sides use the same W_hat in the activation dtype and accumulate
# in fp32, so they differ by summation order (~1e-6) plus each output's rounding to the dtype
# (unit roundoff 2^-11 fp16, 2^-8 bf16). Four unit roundoffs leaves room and still catches a
# wrong code, codebook row or column (those give errors of order 1).
REL_BOUND = {torch.float16: 4 * 2.0**-11, torch.bfloat16: 4 * 2.0**-8}
# The interpreter emulates bf16 with numpy: fp16 -> bf16 truncates instead of rounding and
# tl.dot on bf16 returns garbage. Those cases are checked compiled, on the GPU only.
INTERP_BF16 = "Triton interpreter: bf16 conversion truncates and bf16 tl.dot is wrong; checked on GPU"


def make_weight(n: int, k: int, bits: int, device, seed: int):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (n, k), generator=g, dtype=torch.uint8)
    codebook = torch.randn(n, 1 << bits, generator=g).half()
    return ref.pack(codes, bits).to(device), codebook.to(device)


def check_gemv(n, k, bits, m, dtype, device, seed=0):
    qweight, codebook = make_weight(n, k, bits, device, seed)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed + 1)).to(device=device, dtype=dtype)
    out = torch.full((m, n), float("nan"), dtype=dtype, device=device)  # poison: every element must be written
    y = lut_gemv(x, qweight, codebook, out=out)
    assert y.data_ptr() == out.data_ptr() and y.shape == (m, n) and y.dtype == dtype
    assert not torch.isnan(y).any(), "kernel left poisoned outputs"
    w = ref.dequantize_packed(qweight.cpu(), codebook.cpu(), k).to(dtype).float()
    y_ref = x.cpu().float() @ w.T  # fp32 product of the very operands the spec multiplies
    err = ((y.cpu().float() - y_ref).norm() / y_ref.norm()).item()
    assert err < REL_BOUND[dtype], f"lut gemv {n}x{k} bits={bits} m={m} {dtype}: rel err {err:.2e}"


def check_dequantize(n, k, bits, dtype, device, seed=0):
    qweight, codebook = make_weight(n, k, bits, device, seed)
    out = torch.full((n, k), float("nan"), dtype=dtype, device=device)
    w = lut_dequantize(qweight, codebook, k, dtype, out=out)
    expected = ref.dequantize_packed(qweight.cpu(), codebook.cpu(), k).to(dtype)
    assert torch.equal(w.cpu(), expected), f"lut dequantize {n}x{k} bits={bits} {dtype} is not bit-exact"


# ------------------------------------------------------------------ CPU (interpreter) or GPU
DEVICE = "cuda" if CUDA else "cpu"


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("n,k", [(576, 1536), (1536, 576), (37, 100)])
def test_gemv_one_row_fp16(bits, n, k):
    check_gemv(n, k, bits, 1, torch.float16, DEVICE, seed=bits)


@pytest.mark.parametrize("m", [2, 3, 5, 8, 16])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_gemv_several_rows_fp16(m, bits):
    check_gemv(576, 1536, bits, m, torch.float16, DEVICE, seed=m)


def test_gemv_several_rows_lut8_fp16():
    check_gemv(1536, 576, 8, 4, torch.float16, DEVICE)


# The one-row-per-warp path reads BW = 4, 2 or 1 words per lane and K in chunks of 32 * BW words:
# 8192 -> BW 4 in two chunks, 6144 -> BW 2 in three, 4010 -> BW 4 with a partial last word and
# lanes past K (see _gemv_config). Small N keeps the interpreter fast.
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("n,k,m", [(40, 8192, 1), (33, 6144, 2), (19, 4010, 3)])
def test_gemv_wide_chunks_fp16(bits, n, k, m):
    check_gemv(n, k, bits, m, torch.float16, DEVICE, seed=bits + m)


def test_gemv_wide_chunks_bf16():
    for bits in (2, 3, 4, 8):
        check_gemv(40, 8192, bits, 1, torch.bfloat16, DEVICE, seed=bits)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_gemv_one_row_bf16(bits):
    check_gemv(576, 1536, bits, 1, torch.bfloat16, DEVICE, seed=bits)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("n,k", [(576, 1536), (1536, 576), (37, 100)])
def test_dequantize_fp16_fp32_bit_exact(bits, n, k):
    for dtype in (torch.float16, torch.float32):
        check_dequantize(n, k, bits, dtype, DEVICE, seed=bits)


@pytest.mark.skipif(INTERPRETED, reason=INTERP_BF16)
@pytest.mark.parametrize("m", [2, 8, 16])
def test_gemv_several_rows_bf16(m):
    for bits in (2, 3, 4, 8):
        check_gemv(1536, 576, bits, m, torch.bfloat16, DEVICE, seed=m)


@pytest.mark.skipif(INTERPRETED, reason=INTERP_BF16)
def test_dequantize_bf16_bit_exact():
    for bits in (2, 3, 4, 8):
        check_dequantize(576, 1536, bits, torch.bfloat16, DEVICE, seed=bits)


def test_wrong_kernel_would_be_caught():
    """The checks can fail: a codebook with two rows swapped gives a large error."""
    qweight, codebook = make_weight(64, 96, 3, DEVICE, 0)
    x = torch.randn(1, 96).to(device=DEVICE, dtype=torch.float16)
    y = lut_gemv(x, qweight, codebook[torch.tensor([1, 0, *range(2, 64)])].contiguous())
    w = ref.dequantize_packed(qweight.cpu(), codebook.cpu(), 96).half().float()
    y_ref = x.cpu().float() @ w.T
    assert ((y.cpu().float() - y_ref).norm() / y_ref.norm()).item() > REL_BOUND[torch.float16]


def test_bad_inputs_raise():
    qweight, codebook = make_weight(32, 64, 3, DEVICE, 0)
    x = torch.randn(1, 64).to(device=DEVICE, dtype=torch.float16)
    with pytest.raises(ValueError, match="rows"):
        lut_gemv(torch.randn(MAX_GEMV_ROWS + 1, 64).to(device=DEVICE, dtype=torch.float16), qweight, codebook)
    with pytest.raises(ValueError, match="fp16/bf16"):
        lut_gemv(x.float(), qweight, codebook)
    with pytest.raises(ValueError, match="words per row"):
        lut_gemv(torch.randn(1, 200).to(device=DEVICE, dtype=torch.float16), qweight, codebook)
    with pytest.raises(ValueError, match="codebook"):
        lut_gemv(x, qweight, codebook.float())
    with pytest.raises(ValueError, match="bits"):
        lut_gemv(x, qweight[:1].contiguous(), codebook[:, :2].contiguous())
    with pytest.raises(ValueError, match="dtype"):
        lut_dequantize(qweight, codebook, 64, torch.int8)


# ------------------------------------------------------------------ GPU only: 7B shapes
LLAMA7B = [(4096, 4096), (11008, 4096), (4096, 11008), (12288, 4096), (22016, 4096)]


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("n,k", LLAMA7B)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_llama7b_shapes(n, k, dtype):
    for bits in (2, 3, 4, 8):
        for m in (1, 2, 4, 8):
            check_gemv(n, k, bits, m, dtype, "cuda", seed=bits * 10 + m)
        check_dequantize(n, k, bits, dtype, "cuda", seed=bits)
