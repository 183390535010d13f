"""Triton ``w4a4`` kernels (kernels/w4a4/triton_kernels.py) against the reference.

Without a GPU they run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1); the
``gpu`` tests repeat the checks compiled on CUDA on Llama-2-7B shapes.
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

from gq_kernels.format import LinearSpec  # noqa: E402
from gq_kernels.registry import choose_kernel, get_format  # noqa: E402
from gq_kernels.w4a4 import reference as ref  # noqa: E402
from gq_kernels.w4a4.ops import W4A4TritonKernel  # noqa: E402
from gq_kernels.w4a4.triton_kernels import gemm_config, quantize_act, w4a4_gemm  # noqa: E402

DEVICE = "cuda" if CUDA else "cpu"
FMT = get_format("w4a4")
# The kernel's fp32 epilogue (s_x * (acc - z r) * s_w, summed over groups) and the reference's
# fp32 matmul of dequantized operands differ only in float rounding order: a few fp32 ulps of the
# largest output (~1e-7 relative seen). In fp16 / bf16 the cast then rounds both the same way except
# at a rounding boundary: one ulp of the output dtype.
ATOL_FP32 = 1e-5
OUT_ULP = {torch.float32: 0.0, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


def _weight(n, k, group, seed, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8)
    scale = (torch.rand(n, generator=g) * 0.004 + 0.002).half()
    gsz = k if group == 0 else group
    sums = codes.to(torch.int32).reshape(n, -1, gsz).sum(-1, dtype=torch.int32).contiguous()
    return codes, scale, ref.pack_int4(codes).to(device), sums.to(device)


def _close(got, want, dtype):
    got, want = got.float().cpu(), want.float().cpu()
    tol = ATOL_FP32 * float(want.abs().max()) + OUT_ULP[dtype] * want.abs()
    bad = (got - want).abs() > tol
    assert not bad.any(), f"{int(bad.sum())} outputs off; max err {float((got - want).abs().max()):.3e}"


# ------------------------------------------------------------------------------- quantization
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m,k,group", [(1, 64, 0), (5, 96, 32), (33, 128, 0), (3, 2100, 0)])
def test_activation_codes_equal_the_reference(m, k, group, dtype, bits):
    """Codes, scales and zero points bit for bit (2100 columns: two chunks of 1024 plus a tail)."""
    x = (torch.randn(m, k, generator=torch.Generator().manual_seed(m + k)) * 3).to(dtype)
    x[0, :3] = torch.tensor([0.0, -0.0, 1e-3])
    codes, s, z = quantize_act(x.to(DEVICE), bits, group, clip=0.9)
    rc, rs, rz = ref.quantize_act(x, bits, group, clip=0.9)
    shift = 128 if bits == 8 else 0
    assert codes.dtype == torch.int8 and codes.shape == (m, k)
    assert torch.equal((codes.cpu().to(torch.int16) + shift).reshape(rc.shape), rc.to(torch.int16))
    assert torch.equal(s.cpu(), rs[..., 0]) and torch.equal(z.cpu(), rz[..., 0])


def test_rounding_ties_go_to_even_like_torch_round():
    """A group whose scale is exactly 1 (range [-6.5, 8.5], 15 steps): zero = round(6.5) = 6 and
    x / s lands on .5 ties, which torch.round sends to the even neighbour."""
    row = torch.tensor([-6.5, 8.5, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5, -3.5, 4.5, 0.49999997, 2.5000002, 0.0,
                        5.5, -5.5])
    x = row.repeat(2, 2)
    codes, s, z = quantize_act(x.to(DEVICE), 4, 0)
    rc, rs, rz = ref.quantize_act(x, 4, 0)
    assert float(rs[0, 0, 0]) == 1.0 and float(rz[0, 0, 0]) == 6.0
    assert torch.equal(codes.cpu().reshape(rc.shape), rc.to(torch.int8))
    assert torch.equal(s.cpu(), rs[..., 0]) and torch.equal(z.cpu(), rz[..., 0])
    assert codes[0, 2:5].tolist() == [6, 8, 8]  # 0.5 -> 0, 1.5 -> 2, 2.5 -> 2, plus the zero point 6


# ------------------------------------------------------------------------------------------ GEMM
CASES = [  # (m, k, n, group): per token (even / ragged K), one K step per group, several per group
    (1, 64, 16, 0), (5, 96, 40, 0), (33, 128, 40, 0), (5, 96, 16, 32), (33, 128, 40, 32), (1, 128, 40, 64),
    (5, 192, 16, 96),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m,k,n,group", CASES)
def test_gemm_matches_the_reference(m, k, n, group, dtype):
    codes, scale, qweight, sums = _weight(n, k, group, seed=m * 31 + k + n)
    g = torch.Generator().manual_seed(m + n)
    x = torch.randn(m, k, generator=g).to(dtype)
    bias = torch.randn(n, generator=g).to(dtype)
    for bits in (4, 8):
        cx, sx, zx = quantize_act(x.to(DEVICE), bits, group)
        out = torch.full((m, n), float("nan"), dtype=dtype, device=DEVICE)  # every element must be written
        y = w4a4_gemm(cx, sx, zx, qweight, scale.float().to(DEVICE), sums, bits, group, bias.to(DEVICE), dtype, out=out)
        assert y.data_ptr() == out.data_ptr() and not torch.isnan(y).any()
        _close(y, ref.matmul(x, codes, scale, bits, group, False, 1.0, bias), dtype)


WGROUP_CASES = [  # (m, k, n, activation group, weight group): GEMM groups of one or several K steps
    (5, 96, 16, 0, 32), (5, 128, 40, 32, 64), (1, 128, 40, 64, 32), (5, 192, 16, 0, 96), (33, 256, 40, 128, 64),
    (5, 64, 16, 0, 64), (5, 96, 16, 32, 96),  # one weight group spanning the row
]


@pytest.mark.parametrize("m,k,n,group,wgroup", WGROUP_CASES)
def test_gemm_with_weight_groups_matches_the_reference(m, k, n, group, wgroup):
    g = torch.Generator().manual_seed(m + k + n + wgroup)
    codes = torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8)
    w_scale = (torch.rand(n, k // wgroup, generator=g) * 0.004 + 0.002).half()
    gemm = ref.gemm_group_size(k, group, wgroup)
    sums = codes.to(torch.int32).reshape(n, -1, gemm or k).sum(-1, dtype=torch.int32).contiguous()
    x = torch.randn(m, k, generator=g).half()
    for bits in (4, 8):
        cx, sx, zx = quantize_act(x.to(DEVICE), bits, group)
        y = w4a4_gemm(cx, sx, zx, ref.pack_int4(codes).to(DEVICE), w_scale.float().to(DEVICE), sums.to(DEVICE), bits,
                      group, None, torch.float16)
        _close(y, ref.matmul(x, codes, w_scale, bits, group, False, 1.0), torch.float16)
    if sums.shape[1] > 1:  # row sums over fewer groups than the scales ask for
        with pytest.raises(ValueError, match="row_sums"):
            w4a4_gemm(cx, sx, zx, ref.pack_int4(codes).to(DEVICE), w_scale.float().to(DEVICE),
                      sums[:, :1].contiguous().to(DEVICE), 8, group)


def test_gemm_modes_cover_the_group_layouts():
    assert gemm_config(5, 16, 96, 0)["MODE"] == 0 and not gemm_config(5, 16, 96, 0)["EVEN_K"]
    assert gemm_config(5, 16, 128, 32)["MODE"] == 1 and gemm_config(5, 16, 4096, 128)["BLOCK_K"] == 128
    assert gemm_config(5, 16, 192, 96) == {**gemm_config(5, 16, 192, 96), "MODE": 2, "BLOCK_K": 32}
    with pytest.raises(ValueError, match="multiple of 32"):
        gemm_config(5, 16, 96, 48)


def test_the_accumulator_is_exact_against_integer_arithmetic():
    """With s_w = 1: y = s_x * (q_x - z) @ q_w^T, computed in float64 from the integers."""
    n, k, m = 24, 256, 7
    codes, _, qweight, sums = _weight(n, k, 0, seed=3)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(4))
    cx, sx, zx = quantize_act(x.to(DEVICE), 4, 0)
    y = w4a4_gemm(cx, sx, zx, qweight, torch.ones(n, device=DEVICE), sums, 4, 0).cpu().double()
    exact = (cx.cpu().double() - zx.cpu().double()) @ codes.double().t() * sx.cpu().double()
    torch.testing.assert_close(y, exact, rtol=1e-6, atol=1e-6 * float(exact.abs().max()))


# ---------------------------------------------------------------------------------- kernel class
@pytest.mark.parametrize("own_clip", [None, 0.7])
def test_kernel_class_serves_layers_through_the_custom_op(own_clip):
    """prepare keeps the packed qweight (no int8 copy); apply (custom op, input Hadamard, bias, the
    linear's own clip ratio when it has one) matches the format's reference. Instantiated directly:
    on the CPU can_implement says CUDA."""
    params = FMT.params(bits=4, per_linear_act_clip=own_clip is not None)
    for (k, n, had, group) in ((64, 40, 1, 0), (128, 16, 0, 32)):
        t = FMT.example_tensors(params, n, k, torch.Generator().manual_seed(k))
        t["layout"] = torch.tensor([had, group], dtype=torch.int32)
        if own_clip is not None:
            t["act_clip"] = torch.tensor([own_clip])
        kern = W4A4TritonKernel(LinearSpec(params, n, k), torch.device(DEVICE), torch.float16)
        rt = kern.prepare({name: v.to(DEVICE) for name, v in t.items()})
        assert rt["qweight"].dtype == torch.uint8 and rt["qweight"].shape == (n, k // 2)
        assert all(v.dtype != torch.int8 for v in rt.values())
        x = torch.randn(2, 3, k, generator=torch.Generator().manual_seed(1)).half()
        bias = torch.randn(n, generator=torch.Generator().manual_seed(2)).half()
        y = kern.apply(rt, x.to(DEVICE), bias.to(DEVICE))
        assert y.shape == (2, 3, n) and y.dtype == torch.float16
        _close(y, FMT.matmul(x, t, params, k, bias), torch.float16)


def test_groups_the_gemm_cannot_step_through_fall_back_to_the_int_path():
    params = FMT.params(bits=4, per_linear_act_clip=True)
    t = FMT.example_tensors(params, 16, 48, torch.Generator().manual_seed(0))
    t["layout"] = torch.tensor([0, 16], dtype=torch.int32)
    t["act_clip"] = torch.tensor([0.7])
    kern = W4A4TritonKernel(LinearSpec(params, 16, 48), torch.device(DEVICE), torch.float32)
    rt = kern.prepare({name: v.to(DEVICE) for name, v in t.items()})
    assert "codes" in rt
    x = torch.randn(3, 48, generator=torch.Generator().manual_seed(1))
    _close(kern.apply(rt, x.to(DEVICE)), FMT.matmul(x, t, params, 48), torch.float32)


@pytest.mark.parametrize("wgroup,packed", [(32, True), (16, False)])
def test_kernel_class_serves_weight_groups(wgroup, packed):
    """Weight groups of 32 stay on the Triton GEMM (packed weights); of 16 the GEMM cannot step
    through, and the w4a4-int path (int8 codes) serves them."""
    params = FMT.params(bits=4, weight_group_size=wgroup)
    for (k, n, had, group) in ((64, 40, 1, 0), (128, 16, 0, 64)):
        t = FMT.example_tensors(params, n, k, torch.Generator().manual_seed(k + wgroup))
        t["layout"] = torch.tensor([had, group], dtype=torch.int32)
        kern = W4A4TritonKernel(LinearSpec(params, n, k), torch.device(DEVICE), torch.float16)
        rt = kern.prepare({name: v.to(DEVICE) for name, v in t.items()})
        assert ("qweight" in rt) == packed and ("codes" in rt) == (not packed)
        x = torch.randn(3, k, generator=torch.Generator().manual_seed(1)).half()
        _close(kern.apply(rt, x.to(DEVICE)), FMT.matmul(x, t, params, k), torch.float16)


def test_the_registry_prefers_triton_on_cuda_and_integer_kernels_elsewhere():
    spec = LinearSpec(FMT.params(bits=4), 16, 64)
    assert choose_kernel(spec, "cpu", torch.float16).name in {"w4a4-int", "w4a4-cpu-avx512vnni", "w4a4-cpu-avx512", "w4a4-cpu-avx2"}
    ok, why = W4A4TritonKernel.can_implement(spec, torch.device("cpu"), torch.float16)
    assert not ok and "CUDA" in why
    ok, why = W4A4TritonKernel.can_implement(LinearSpec(FMT.params(bits=4, act_bits=16), 16, 64),
                                             torch.device("cuda"), torch.float16)
    assert not ok
    if CUDA:
        assert choose_kernel(spec, "cuda", torch.float16).name == "w4a4-triton"


# ---------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("rows", [1, 2048])
def test_gpu_triton_kernel_with_weight_groups_on_llama_shapes(rows):
    """Compiled on CUDA: weight groups of 128 with per-token activations (11008x4096) and with
    activation groups of 64 (4096x4096)."""
    g = torch.Generator(device="cuda").manual_seed(rows)
    params = FMT.params(bits=4, weight_group_size=128)
    for (in_f, out_f), group in (((4096, 11008), 0), ((4096, 4096), 64)):
        t = FMT.example_tensors(params, out_f, in_f, g)
        t["layout"] = torch.tensor([0, group], dtype=torch.int32, device="cuda")
        kernel = choose_kernel(LinearSpec(params, out_f, in_f), "cuda", torch.float16)
        assert kernel.name == "w4a4-triton"
        x = torch.randn(rows, in_f, device="cuda", generator=g).half()
        got = kernel.apply(kernel.prepare(t), x).float()
        want = FMT.matmul(x.float(), t, params, in_f)
        assert float((got - want).norm() / want.norm()) < 2 * OUT_ULP[torch.float16]


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("rows", [1, 16, 2048])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_triton_kernel_matches_the_reference_on_llama_shapes(rows, dtype):
    """Compiled on CUDA: per-token (gate/up 11008x4096), input Hadamard (down 4096x11008) and
    per-head groups of 128 (o_proj 4096x4096), against the fake-quant reference in fp32."""
    g = torch.Generator(device="cuda").manual_seed(rows)
    params = FMT.params(bits=4)
    for (in_f, out_f), had, group in (((4096, 11008), 0, 0), ((11008, 4096), 1, 0), ((4096, 4096), 0, 128)):
        t = FMT.example_tensors(params, out_f, in_f, g)
        t["layout"] = torch.tensor([had, group], dtype=torch.int32, device="cuda")
        kernel = choose_kernel(LinearSpec(params, out_f, in_f), "cuda", dtype)
        assert kernel.name == "w4a4-triton"
        x = torch.randn(rows, in_f, device="cuda", generator=g).to(dtype)
        bias = torch.randn(out_f, device="cuda", generator=g).to(dtype)
        got = kernel.apply(kernel.prepare(t), x, bias).float()
        want = FMT.matmul(x.float(), t, params, in_f, bias.float())
        assert torch.isfinite(got).all()
        # x is rounded to the same codes (bit-exact quantization); the output's rounding to the dtype dominates.
        assert float((got - want).norm() / want.norm()) < 2 * OUT_ULP[dtype]
        # codes and scales of the compiled quantization kernel are the reference's, bit for bit
        xr = ref.prepare_input(x, bool(had))
        codes, s, z = quantize_act(xr, 4, group)
        rc, rs, rz = ref.quantize_act(xr, 4, group)
        assert torch.equal(codes.reshape(rc.shape), rc.to(torch.int8))
        assert torch.equal(s, rs[..., 0]) and torch.equal(z, rz[..., 0])


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_gpu_triton_and_int_kernels_agree():
    """The two CUDA paths on one layer: same codes, both exact integer GEMMs, fp32 epilogues."""
    g = torch.Generator(device="cuda").manual_seed(0)
    params = FMT.params(bits=4)
    t = FMT.example_tensors(params, 4096, 4096, g)
    t["layout"] = torch.tensor([0, 128], dtype=torch.int32, device="cuda")
    x = torch.randn(64, 4096, device="cuda", generator=g).half()
    spec = LinearSpec(params, 4096, 4096)
    a, b = (choose_kernel(spec, "cuda", torch.float16, prefer=name) for name in ("w4a4-triton", "w4a4-int"))
    ya, yb = a.apply(a.prepare(t), x).float(), b.apply(b.prepare(t), x).float()
    assert float((ya - yb).norm() / yb.norm()) < 2 * OUT_ULP[torch.float16]
