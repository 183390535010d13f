"""The int8-activation CPU kernel (kernels/cpu/q8.py, csrc/bitplane_q8_isa.cpp, ``lut-cpu-q8``).

Two checks per case. Against its specification (``q8_matmul_reference``: x rounded per 64-column
block to int8, each row's table to uint8, integer block sums): the kernel differs only in fp32
summation order across blocks, bounded by 1e-5 of the magnitude sum as in test_kernels_cpu. Against
the exact product x @ W_hat.T: the two roundings cost about 0.5% of the output's norm on Gaussian
data; a wrong code, block or scale costs tens of percent, so a 2% bound separates them.
"""
from __future__ import annotations

import pytest
import torch

from gq_kernels.cpu import build, features
from gq_kernels.cpu.kernel import GEMV_MAX_ROWS
from gq_kernels.cpu.q8 import BLOCK, quantize_activations, q8_matmul_reference, table_q8
from gq_kernels.format import LinearSpec
from gq_kernels.registry import choose_kernel, get_format, kernels
from test_kernels_cpu import NO_TOOLCHAIN, random_tensors

pytestmark = pytest.mark.skipif(NO_TOOLCHAIN, reason="no C++ compiler on PATH (or not Linux): no CPU kernels")

SHAPES = [(576, 1536), (1536, 576), (37, 100), (5, 7), (3, 64), (4, 96), (6, 160)]  # odd words, half blocks
SUM_TOL = 1e-5


def q8_class():
    ok, why = features.isa_support("avx512vnni")
    if not ok:
        pytest.skip(why)
    ok, why = build.status()
    assert ok, why
    (cls,) = [k for k in kernels() if k.name == "lut-cpu-q8"]
    return cls


def make(bits, n, k, dtype=torch.float32, seed=0):
    spec = LinearSpec(get_format("lut").params(bits=bits), n, k)
    tensors = random_tensors(spec, seed)
    kern = q8_class()(spec, torch.device("cpu"), dtype)
    w = get_format("lut").dequantize(tensors, spec.params, k).to(dtype).float()
    return kern, kern.prepare(tensors), w


def reference(prepared, x, k):
    return q8_matmul_reference(x, prepared["qweight"], prepared["table_q8"], prepared["tscale"], prepared["tmin"], k)


def check_spec(y, x, prepared, k, what):
    ref = reference(prepared, x, k).double()
    codes_w = prepared["tmin"][:, None].double() + prepared["tscale"][:, None].double() * torch.gather(
        prepared["table_q8"].double(), 1, get_codes(prepared, k))
    bound = SUM_TOL * (x.double().abs() @ codes_w.abs().T) + 1e-30
    assert torch.isfinite(y).all(), f"{what}: non-finite outputs"
    worst = ((y.double() - ref).abs() / bound).max().item()
    assert worst <= 1.0, f"{what}: {worst:.2f}x the bound"


def get_codes(prepared, k):
    from gq_kernels.packing import unpack_bitplanes

    return unpack_bitplanes(prepared["qweight"], k).long()


def test_activation_rounding_is_the_reference_bit_for_bit():
    q8_class()
    g = torch.Generator().manual_seed(0)
    for m, k in ((1, 1), (3, 64), (2, 100), (8, 1536)):
        x = torch.randn(m, k, generator=g) * 3
        x[0, : min(k, BLOCK)] = 0  # a zero block: scale 0, codes 0
        if k > 2:
            x[-1, 1] = 0.5 * x[-1].abs().max() / 127 * 3  # ties round to even in both
        xq, xs, xsum = torch.ops.gq_cpu.quantize_q8(x)
        rq, rs, rsum = quantize_activations(x)
        assert xq.shape == (m, -(-k // BLOCK) * BLOCK) and torch.equal(xq, rq) and torch.equal(xs, rs)
        assert torch.allclose(xsum, rsum, rtol=1e-6, atol=1e-6)
        assert (xq[:, k:] == 0).all() and xs[0, 0] == 0


def test_table_rounding_keeps_the_ends_and_half_a_step():
    values = torch.randn(50, 8)
    values[3] = 1.5  # one value: tscale 0, every entry exact
    table, tscale, tmin = table_q8(values)
    back = tmin[:, None] + tscale[:, None] * table[:, :8].float()
    assert table.shape == (50, 16) and table.dtype == torch.uint8 and (table[:, 8:] == 0).all()
    spread = values.amax(1) - values.amin(1)
    assert torch.equal(tmin, values.amin(1)) and ((back.amax(1) - values.amax(1)).abs() <= 1e-6 * spread).all()
    assert ((back - values).abs() <= tscale[:, None] * 0.5 + 1e-6).all()
    assert tscale[3] == 0 and torch.equal(back[3], values[3])


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_gemv_matches_its_specification_and_stays_near_the_exact_product(bits):
    for n, k in SHAPES:
        kern, prepared, w = make(bits, n, k, seed=n + k + bits)
        g = torch.Generator().manual_seed(k)
        for m in range(1, GEMV_MAX_ROWS + 1):
            x = torch.randn(m, k, generator=g)
            y = kern.apply(prepared, x)
            assert kern.path(x) == "lut-cpu-q8:gemv-q8" and y.shape == (m, n)
            check_spec(y, x, prepared, k, f"bits={bits} {n}x{k} rows={m}")
            exact = x @ w.T
            if k >= 64:
                rel = ((y - exact).norm() / exact.norm()).item()
                assert rel < 0.02, f"bits={bits} {n}x{k} rows={m}: {rel:.4f} of the exact product's norm"


def test_prefill_rows_run_the_exact_fp32_kernel():
    kern, prepared, _ = make(3, 37, 100)
    (fp32,) = [k for k in kernels() if k.name == "lut-cpu-avx512"]
    exact = fp32(kern.layer, torch.device("cpu"), torch.float32)
    x = torch.randn(2, 5, 100)  # 10 rows
    assert kern.path(x) == "lut-cpu-q8:tiled"
    assert torch.equal(kern.apply(prepared, x), exact.apply(exact.prepare(random_tensors(kern.layer, 0)), x))


def test_every_row_in_int8_when_asked(monkeypatch):
    # The perplexity measurement of the decode numerics (scripts/q8_quality.py): 8 rows per pass.
    kern, prepared, _ = make(3, 37, 100)
    monkeypatch.setattr(type(kern), "q8_max_rows", None)
    x = torch.randn(2, 11, 100)
    assert kern.path(x) == "lut-cpu-q8:gemv-q8"
    check_spec(kern.apply(prepared, x).reshape(22, 37), x.reshape(22, 100), prepared, 100, "22 rows")


def test_half_activations_and_bias():
    kern, prepared, _ = make(4, 33, 100, dtype=torch.bfloat16)
    x = torch.randn(1, 100).bfloat16()
    bias = torch.randn(33).bfloat16()
    y = kern.apply(prepared, x, bias)
    assert y.dtype == torch.bfloat16
    ref = reference(prepared, x.float(), 100) + bias.float()
    assert torch.allclose(y.float(), ref, rtol=2**-7, atol=1e-2)


def test_shared_call_equals_each_layer_side_by_side():
    k = 160
    parts = [make(3, 48, k, seed=1), make(2, 17, k, seed=2), make(4, 33, k, seed=3)]
    members = [(kern, prepared) for kern, prepared, _ in parts]
    fn = type(members[0][0]).shared(members)
    for shape in ((1, k), (3, k), (2, 5, k)):  # GEMV rows, then the exact tiled path
        x = torch.randn(shape)
        assert torch.equal(fn(x), torch.cat([kern.apply(p, x) for kern, p in members], dim=-1))
    (fp32,) = [c for c in kernels() if c.name == "lut-cpu-avx512"]
    other = fp32(members[0][0].layer, torch.device("cpu"), torch.float32)
    assert type(members[0][0]).shared([members[0], (other, other.prepare(random_tensors(other.layer, 1)))]) is None


def test_chosen_by_name_only_and_says_which_flags_it_lacks(monkeypatch):
    cls = q8_class()
    lut3 = LinearSpec(get_format("lut").params(bits=3), 24, 64)
    assert choose_kernel(lut3, "cpu", torch.float32).name != "lut-cpu-q8"
    assert choose_kernel(lut3, "cpu", torch.float32, prefer="lut-cpu-q8").name == "lut-cpu-q8"
    monkeypatch.setattr(features, "cpu_flags", lambda: features._cpuinfo()[0] - {"avx512_vnni"})
    ok, why = cls.can_implement(lut3, torch.device("cpu"), torch.float32)
    assert not ok and "lacks avx512_vnni" in why
    with pytest.raises(ValueError, match="lut-cpu-q8: this CPU lacks avx512_vnni"):
        choose_kernel(lut3, "cpu", torch.float32, prefer="lut-cpu-q8")


def test_operator_rejects_bad_input():
    kern, prepared, _ = make(3, 8, 64)
    op = torch.ops.gq_cpu.bitplane_q8_matmul_multi
    parts = [[prepared[n]] for n in ("qweight", "table_q8", "tscale", "tmin")]
    with pytest.raises(RuntimeError, match="table must be contiguous uint8"):
        op(torch.randn(1, 64), parts[0], [prepared["table_q8"][:, :8].contiguous()], parts[2], parts[3], 64)
    with pytest.raises(RuntimeError, match="words per row"):
        op(torch.randn(1, 100), *parts, 100)
    assert build.status()[0]


def test_dense_rows_match_their_specification():
    from gq_kernels.cpu.q8 import dense_q8, dense_q8_matmul, dense_q8_reference
    from gq_kernels.cpu.rowint8 import dequantize_rows, quantize_rows

    q8_class()
    g = torch.Generator().manual_seed(0)
    for n, k in ((576, 1536), (1536, 576), (37, 100), (5, 7), (3, 64)):
        q, s = quantize_rows(torch.randn(n, k, generator=g))
        u, tscale, tmin = dense_q8(q, s)
        assert u.shape == (n, -(-k // BLOCK) * BLOCK) and (u[:, k:] == 0).all()
        exact_w = dequantize_rows(q, s)
        for m in (1, 2, 5, 8):
            x = torch.randn(m, k, generator=g)
            y = dense_q8_matmul(x, u, tscale, tmin, k)
            ref = dense_q8_reference(x, u, tscale, tmin, k).double()
            bound = SUM_TOL * (x.double().abs() @ exact_w.double().abs().T) + 1e-6
            assert ((y.double() - ref).abs() <= bound).all(), (n, k, m)
            if k >= 64:
                assert ((y - x @ exact_w.T).norm() / (x @ exact_w.T).norm()) < 0.02
        x = torch.randn(3, 4, k, generator=g)  # 12 rows: exact
        torch.testing.assert_close(dense_q8_matmul(x, u, tscale, tmin, k), x @ exact_w.T, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="padded to a multiple of 64"):
        torch.ops.gq_cpu.dense_q8_matmul(torch.randn(1, 7), u[:, :7].contiguous(), tscale, tmin, 7)
