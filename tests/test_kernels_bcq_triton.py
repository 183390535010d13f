"""Triton kernels of the ``bcq`` format (kernels/bcq/triton_kernels.py) against the reference.

Without CUDA the kernels run in the Triton interpreter (TRITON_INTERPRET=1, set before the kernels
module is imported) on small / odd shapes; tests marked ``gpu`` repeat the checks on CUDA with
Llama-2-7B shapes. Every GEMV writes into an output pre-filled with NaN, so an element the kernel
forgets to write fails the test.
"""
from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed: the bcq Triton kernels cannot run")

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if not torch.cuda.is_available() and not INTERPRET:
    pytest.skip("set TRITON_INTERPRET=1", allow_module_level=True)

from gq_kernels.bcq import reference as ref  # noqa: E402
from gq_kernels.bcq import triton_kernels as tk  # noqa: E402

# Non-gpu tests run where the kernels can: the interpreter on CPU tensors, else the GPU.
DEVICE = "cpu" if INTERPRET else "cuda"
requires_gpu = pytest.mark.skipif(not torch.cuda.is_available() or INTERPRET,
                                  reason="needs a CUDA GPU (and TRITON_INTERPRET unset)")

F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32

# Unit roundoff of the output dtype (one rounding of the fp32 result).
UNIT_ROUNDOFF = {F16: 2.0**-11, BF16: 2.0**-8}
# ||y - y_ref|| / ||y_ref|| bound against kernels.bcq.reference.matmul. The reference rounds every
# W_hat element to x's dtype and rounds y; the kernel keeps W_hat exact (fp32 tables and sums) and
# rounds only y. Both are independent relative errors of at most u per element, so for random data
# the ratio is about u (measured: fp16 ~3.5e-4 with u = 4.9e-4; bf16 ~3e-3 with u = 3.9e-3). The
# bounds leave ~4x / ~2.5x headroom; a wrong nibble, group or split costs far more (>= ~1e-2 at
# these sizes), and rounding bugs of the output are caught by the element-wise bound below.
REL_TOL = {F16: 2e-3, BF16: 1e-2}

# (N, K): N not a multiple of the 128-row blocks, and K = 576 is 18 words (not whole 4-word tiles).
ODD_SHAPES = [(576, 1536), (1536, 576)]
LLAMA_SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]


def make_weights(n: int, k: int, bits: int, group_size: int, device: str, seed: int,
                 scale_dtype: torch.dtype = F16):
    """Random packed bcq weight: qweight int32 [bits, n, ceil(k/32)], scales / offsets [n, n_groups]."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (n, k), generator=g, dtype=torch.uint8)
    groups = ref.n_groups(k, group_size)
    # Scales vary ~10x between groups (a wrong group shows); offsets centre W like a real zero point.
    scales = 0.002 + 0.02 * torch.rand(n, groups, generator=g)
    zero = torch.rand(n, groups, generator=g) * ((1 << bits) - 1)
    offsets = -scales * zero
    return (ref.pack(codes, bits).to(device), scales.to(scale_dtype).to(device),
            offsets.to(scale_dtype).to(device))


def make_x(m: int, k: int, dtype: torch.dtype, device: str, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 1)
    return torch.randn(m, k, generator=g).to(dtype).to(device)


def check_gemv(x, qweight, scales, offsets, group_size):
    """Run bcq_gemv into a NaN-poisoned output and compare with the reference (norm + element-wise)."""
    m, k = x.shape
    n = qweight.shape[1]
    out = torch.full((m, n), float("nan"), dtype=x.dtype, device=x.device)
    y = tk.bcq_gemv(x, qweight, scales, offsets, group_size, out=out)
    assert y.data_ptr() == out.data_ptr() and y.shape == (m, n) and y.dtype == x.dtype
    assert not torch.isnan(y).any(), f"{int(torch.isnan(y).sum())} output elements were never written"

    y_ref = ref.matmul(x, qweight, scales, offsets, group_size, k).float()
    rel = ((y.float() - y_ref).norm() / y_ref.norm()).item()
    assert rel < REL_TOL[x.dtype], f"relative error {rel:.3e} vs reference.matmul (bound {REL_TOL[x.dtype]})"

    # Element-wise against the exact product with the fp32 W_hat: one rounding of the result
    # (u |y|) plus fp32 summation error, bounded by K * 2^-24 times the sum of the magnitudes of the
    # terms the kernel adds (x * s * q and x * o separately, so the scale of |s q| + |o|).
    w = ref.dequantize_packed(qweight, scales, offsets, group_size, k).double()
    o = ref.expand_groups(offsets, k, group_size).double()
    magnitude = x.double().abs() @ (w - o).abs().T + x.double().abs() @ o.abs().T
    exact = x.double() @ w.T
    tol = UNIT_ROUNDOFF[x.dtype] * exact.abs() + 2 * k * 2.0**-24 * magnitude + 1e-7
    err = (y.double() - exact).abs()
    bad = err > tol
    assert not bad.any(), (
        f"{int(bad.sum())} elements off, worst {float((err / tol).max()):.2f}x the bound at "
        f"{[int(i) for i in (bad.nonzero()[0])]}"
    )
    return y


# ----------------------------------------------------------------------------------------- GEMV
# The interpreter runs the unrolled GEMV slowly (~1 s per 100k weights x bits), so the odd shapes
# get a representative handful here; the gpu tests below run the full cross product.
@pytest.mark.parametrize(
    "shape,bits,group_size,m,dtype",
    [
        (ODD_SHAPES[0], 3, 128, 1, F16),
        (ODD_SHAPES[0], 2, -1, 2, BF16),
        (ODD_SHAPES[1], 2, 36, 3, BF16),
        (ODD_SHAPES[1], 2, 128, 1, F16),  # K = 576: 4.5 groups of 128, the last one partial
    ],
)  # row counts up to 16 are covered on a smaller shape below
def test_gemv_odd_shapes(shape, bits, group_size, m, dtype):
    n, k = shape
    q, s, o = make_weights(n, k, bits, group_size, DEVICE, seed=bits * 100 + m)
    check_gemv(make_x(m, k, dtype, DEVICE, seed=m), q, s, o, group_size)


@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 6, 7, 8, 16])
def test_gemv_rows(m):
    """Every row count the decode path serves (x-row blocking and its tail), K % 4 != 0."""
    bits = (2, 3, 4)[m % 3]
    group_size = (-1, 128, 36)[(m // 3) % 3]
    dtype = (F16, BF16)[m % 2]
    n, k = 72, 203
    q, s, o = make_weights(n, k, bits, group_size, DEVICE, seed=m)
    check_gemv(make_x(m, k, dtype, DEVICE, seed=m), q, s, o, group_size)


@pytest.mark.parametrize("group_size", [-1, 32, 128, 36])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_gemv_bits_groups(bits, group_size):
    n, k = 40, 300  # 300 columns: 9.4 words, 2.3 groups of 128, 8.3 groups of 36
    dtype = (F16, BF16)[(bits + group_size) % 2]
    q, s, o = make_weights(n, k, bits, group_size, DEVICE, seed=bits)
    check_gemv(make_x(2, k, dtype, DEVICE, seed=bits), q, s, o, group_size)


def test_gemv_split_k_with_ragged_last_split():
    n, k, bits, group_size = 40, 2200, 3, 64
    cfg = tk._gemv_config(2, n, k, bits, group_size)
    n_tiles = ref.n_groups(k, 32) // cfg["BLOCK_W"]
    tiles_per_split = -(-n_tiles // cfg["SPLIT_K"])
    assert cfg["SPLIT_K"] > 1 and n_tiles % tiles_per_split != 0  # the case this test is for
    q, s, o = make_weights(n, k, bits, group_size, DEVICE, seed=7)
    check_gemv(make_x(2, k, BF16, DEVICE, seed=7), q, s, o, group_size)


def test_gemv_one_group_larger_than_k():
    """group_size >= K (one group, but not -1) and bf16 scales / offsets."""
    q, s, o = make_weights(24, 200, 4, 256, DEVICE, seed=3, scale_dtype=BF16)
    check_gemv(make_x(3, 200, F16, DEVICE, seed=3), q, s, o, 256)


def test_gemv_strided_rows_and_fresh_output():
    n, k = 50, 96
    q, s, o = make_weights(n, k, 3, 32, DEVICE, seed=5)
    wide = make_x(4, k + 40, F16, DEVICE, seed=5)
    x = wide[:, 8:8 + k]  # unit column stride, row stride k + 40
    y = tk.bcq_gemv(x, q, s, o, 32)
    assert y.shape == (4, n) and y.dtype == F16 and y.device == x.device and y.is_contiguous()
    torch.testing.assert_close(y, tk.bcq_gemv(x.contiguous(), q, s, o, 32), rtol=0, atol=0)
    check_gemv(x, q, s, o, 32)


def test_gemv_deterministic():
    q, s, o = make_weights(64, 512, 2, 128, DEVICE, seed=11)  # split-K: a fixed-order reduction
    assert tk._gemv_config(1, 64, 512, 2, 128)["SPLIT_K"] > 1
    x = make_x(1, 512, BF16, DEVICE, seed=11)
    assert torch.equal(tk.bcq_gemv(x, q, s, o, 128), tk.bcq_gemv(x, q, s, o, 128))


# ----------------------------------------------------------------------------------------- dequantize
def check_dequantize(n, k, bits, group_size, dtype, device, seed, scale_dtype=F16):
    q, s, o = make_weights(n, k, bits, group_size, device, seed, scale_dtype)
    w = tk.bcq_dequantize(q, s, o, group_size, k, dtype)
    assert w.shape == (n, k) and w.dtype == dtype and w.device == q.device
    expected = ref.dequantize_packed(q, s, o, group_size, k).to(dtype)
    # Bit-exact (NaN-free data): compare the raw bits so -0.0 vs 0.0 would also show.
    same = w.view(torch.int16 if dtype != F32 else torch.int32) == expected.view(
        torch.int16 if dtype != F32 else torch.int32)
    assert same.all(), f"{int((~same).sum())} of {same.numel()} elements differ from the reference"


@pytest.mark.parametrize("dtype", [F16, BF16, F32])
@pytest.mark.parametrize("group_size", [-1, 128, 36, 32, 7])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_dequantize_exact(bits, group_size, dtype):
    check_dequantize(37, 203, bits, group_size, dtype, DEVICE, seed=bits + group_size)


@pytest.mark.parametrize("shape,bits,group_size,dtype", [
    (ODD_SHAPES[0], 3, 128, BF16),
    (ODD_SHAPES[1], 4, 36, F16),
])
def test_dequantize_odd_shapes(shape, bits, group_size, dtype):
    check_dequantize(*shape, bits, group_size, dtype, DEVICE, seed=1)


def test_dequantize_bf16_scales():
    check_dequantize(16, 96, 2, 32, BF16, DEVICE, seed=2, scale_dtype=BF16)


# ----------------------------------------------------------------------------------------- bad inputs
def _good(device=DEVICE):
    q, s, o = make_weights(8, 64, 3, 32, device, seed=0)
    return make_x(2, 64, F16, device, seed=0), q, s, o


@pytest.mark.parametrize("case,match", [
    (lambda x, q, s, o: tk.bcq_gemv(x.float(), q, s, o, 32), "float16 or bfloat16"),
    (lambda x, q, s, o: tk.bcq_gemv(x[0], q, s, o, 32), "2-D"),
    (lambda x, q, s, o: tk.bcq_gemv(x.repeat(9, 1), q, s, o, 32), "1..16 rows"),
    (lambda x, q, s, o: tk.bcq_gemv(x[:0], q, s, o, 32), "1..16 rows"),
    (lambda x, q, s, o: tk.bcq_gemv(x.t().contiguous().t(), q, s, o, 32), "unit stride"),
    (lambda x, q, s, o: tk.bcq_gemv(x[:, :20], q, s, o, 32), "words per row"),
    (lambda x, q, s, o: tk.bcq_gemv(x, q.to(torch.int64), s, o, 32), "int32"),
    (lambda x, q, s, o: tk.bcq_gemv(x, q[:1], s, o, 32), "bits"),
    (lambda x, q, s, o: tk.bcq_gemv(x, q, s.float(), o, 32), "scales must be float16 or bfloat16"),
    (lambda x, q, s, o: tk.bcq_gemv(x, q, s, o[:, :1], 32), "offsets must be"),
    (lambda x, q, s, o: tk.bcq_gemv(x, q, s, o, 30), "multiple of 4"),
    (lambda x, q, s, o: tk.bcq_gemv(x, q, s, o, 0), "group_size"),
    (lambda x, q, s, o: tk.bcq_gemv(x, q, s, o, 64), "scales must be"),  # wrong n_groups
    (lambda x, q, s, o: tk.bcq_gemv(x, q, s, o, 32, out=torch.empty(2, 8, dtype=BF16, device=x.device)),
     "out must be"),
    (lambda x, q, s, o: tk.bcq_gemv(x, q, s, o, 32, out=torch.empty(8, 2, dtype=F16, device=x.device).t()),
     "contiguous"),
    (lambda x, q, s, o: tk.bcq_dequantize(q, s, o, 32, 64, torch.int8), "dtype"),
    (lambda x, q, s, o: tk.bcq_dequantize(q, s, o, 32, 100, F16), "words per row"),
    (lambda x, q, s, o: tk.bcq_dequantize(q, s, o, -2, 64, F16), "group_size"),
    (lambda x, q, s, o: tk.bcq_dequantize(q, s.t().contiguous().t(), o, 32, 64, F16), "contiguous"),
])
def test_bad_inputs_raise(case, match):
    with pytest.raises(ValueError, match=match):
        case(*_good())


@pytest.mark.skipif(not INTERPRET, reason="CPU tensors only run under the interpreter")
def test_cpu_tensors_need_the_interpreter(monkeypatch):
    x, q, s, o = _good("cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        tk.bcq_gemv(x, q, s, o, 32)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        tk.bcq_dequantize(q, s, o, 32, 64, F16)


@pytest.mark.gpu
@requires_gpu
def test_gpu_mixed_devices_raise():
    x, q, s, o = _good("cpu")
    with pytest.raises(ValueError, match="is on"):
        tk.bcq_gemv(x.cuda(), q, s, o, 32)


# ----------------------------------------------------------------------------------------- config
@pytest.mark.parametrize("n,k", LLAMA_SHAPES + [(12288, 4096), (22016, 4096)] + ODD_SHAPES)
@pytest.mark.parametrize("m", [1, 2, 3, 4, 8, 16])
@pytest.mark.parametrize("group_size", [-1, 128, 36])
def test_gemv_config(n, k, m, group_size):
    cfg = tk._gemv_config(m, n, k, 3, group_size)
    assert cfg == tk._gemv_config(m, n, k, 3, group_size)  # deterministic
    assert cfg["BLOCK_N"] == 32 * cfg["num_warps"]  # one output row per thread
    assert cfg["BLOCK_M"] <= 4 and cfg["BLOCK_W"] <= 4  # one <= 16 B vector per lookup / plane
    assert -(-k // 32) % cfg["BLOCK_W"] == 0  # whole tiles: no K masks
    assert cfg["SPLIT_K"] in (1, 2, 4, 8, 16)
    if group_size == 128 and k > 128:
        assert 128 % (32 * cfg["BLOCK_W"]) == 0  # a tile never straddles a group
    for key in ("BLOCK_M", "BLOCK_N", "BLOCK_W"):
        assert cfg[key] & (cfg[key] - 1) == 0  # powers of two (tl.arange)


# ----------------------------------------------------------------------------------------- GPU
@pytest.mark.parametrize("shape", LLAMA_SHAPES)
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group_size,m,dtype", [(128, 1, F16), (-1, 1, BF16), (128, 4, BF16),
                                                (36, 3, F16), (128, 16, F16), (-1, 8, F16)])
@pytest.mark.gpu
@requires_gpu
def test_gpu_gemv_llama_shapes(shape, bits, group_size, m, dtype):
    n, k = shape
    q, s, o = make_weights(n, k, bits, group_size, "cuda", seed=bits)
    check_gemv(make_x(m, k, dtype, "cuda", seed=m), q, s, o, group_size)


@pytest.mark.parametrize("shape", ODD_SHAPES)
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group_size", [-1, 128, 36])
@pytest.mark.parametrize("dtype", [F16, BF16])
@pytest.mark.gpu
@requires_gpu
def test_gpu_gemv_odd_shapes(shape, bits, group_size, dtype):
    n, k = shape
    q, s, o = make_weights(n, k, bits, group_size, "cuda", seed=bits)
    for m in (1, 2, 5, 16):
        check_gemv(make_x(m, k, dtype, "cuda", seed=m), q, s, o, group_size)


@pytest.mark.parametrize("shape", LLAMA_SHAPES + ODD_SHAPES)
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group_size", [-1, 128, 36])
@pytest.mark.gpu
@requires_gpu
def test_gpu_dequantize_exact(shape, bits, group_size):
    for dtype in (F16, BF16, F32):
        check_dequantize(*shape, bits, group_size, dtype, "cuda", seed=bits)


@pytest.mark.gpu
@requires_gpu
def test_gpu_gemv_cuda_graph():
    """The launch sequence (table, GEMV, split-K reduce) captures and replays in a CUDA graph."""
    n, k = 4096, 4096
    q, s, o = make_weights(n, k, 3, 128, "cuda", seed=0)
    x = make_x(1, k, F16, "cuda", seed=0)
    tk.bcq_gemv(x, q, s, o, 128)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        with torch.cuda.graph(graph, stream=stream):
            y = tk.bcq_gemv(x, q, s, o, 128)
    torch.cuda.current_stream().wait_stream(stream)
    for seed in (1, 2):
        x.copy_(make_x(1, k, F16, "cuda", seed=seed))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(y, tk.bcq_gemv(x, q, s, o, 128))
