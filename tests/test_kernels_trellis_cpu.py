"""The CPU ``trellis`` kernel (kernels/trellis/cpu.py, csrc/trellis_isa.cpp) against the reference.

Every variant this CPU runs, forced by name, for every code and bit width, 1..8 activation rows (the
GEMV) and more (the block-wise dequantize + at::mm path), on SmolLM2's shapes and small ones, with
random streams (any bit pattern is a valid circular chain). The op multiplies exactly the values
the reference decodes and accumulates in fp32: per element |y - y64| <= 1e-5 * (|x| @ |W_code|.T)
with y64 the float64 product; one wrong state moves an element by the order of one weight.
"""
from __future__ import annotations

import itertools

import pytest
import torch

from gq_kernels.cpu import build, features
from gq_kernels.format import LinearSpec
from gq_kernels.hadamard import random_signs
from gq_kernels.registry import choose_kernel, get_format, kernels
from gq_kernels.trellis import reference as ref
from gq_kernels.trellis.codes import VALUES_PER_STATE, code_table
from gq_kernels.trellis.cpu import CODE_IDS

NO_TOOLCHAIN = build.find_compiler() is None or not build.sys.platform.startswith("linux")
pytestmark = pytest.mark.skipif(NO_TOOLCHAIN, reason="no C++ compiler on PATH (or not Linux): no CPU kernels")

ISAS = {"portable": 0, "avx2": 1, "avx512": 2}
CODES = ("hyb", "1mad", "3inst")


def kernel_class(isa: str):
    ok, why = features.isa_support(isa)
    if not ok:
        pytest.skip(why)
    (cls,) = [k for k in kernels() if k.name == f"trellis-cpu-{isa}"]
    return cls


from conftest import trellis_random_layer as random_layer  # noqa: E402


def op(x, t, code, bits, m, isa, code_id=None):
    assert build.status()[0]
    tlut = t["tlut"].contiguous().view(torch.int32).reshape(-1) if code == "hyb" else None
    table = code_table(code, t.get("tlut")).contiguous()
    code_id = CODE_IDS[code] if code_id is None else code_id
    return torch.ops.gq_cpu.trellis_matmul(x, t["trellis"], table, tlut, bits * VALUES_PER_STATE[code], code_id, m,
                                           ISAS[isa])


def assert_product(y, x, wc):
    want = x.double() @ wc.double().t()
    bound = 1e-5 * (x.double().abs() @ wc.double().abs().t())
    assert y.shape == want.shape
    assert ((y.double() - want).abs() <= bound).all(), float(((y.double() - want).abs() - bound).max())


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("code,bits", list(itertools.product(CODES, (2, 3, 4))))
@pytest.mark.parametrize("m,n", [(576, 1536), (1536, 576), (48, 80)])
def test_op_is_the_decoded_product(isa, code, bits, m, n):
    kernel_class(isa)
    t, _ = random_layer(m, n, bits, code, seed=bits)
    wc = ref.decode_weight(t["trellis"], code, bits, m, n, t.get("tlut"))
    for rows in (1, 2, 5, 8, 9, 40):
        x = torch.randn(rows, n)
        assert_product(op(x, t, code, bits, m, isa), x, wc)
    x = torch.randn(3, n)  # the state table, the path of a code without a decoder of its own
    assert_product(op(x, t, code, bits, m, isa, code_id=0), x, wc)


def test_op_refuses_bad_input():
    t, _ = random_layer(32, 48, 2, "hyb")
    x = torch.randn(1, 48)
    with pytest.raises(RuntimeError, match=r"trellis words must be contiguous int16 \[6, 32\]"):
        op(x, {**t, "trellis": t["trellis"][:, :16].contiguous()}, "hyb", 2, 32, "portable")
    with pytest.raises(RuntimeError, match="multiples of 16"):
        op(torch.randn(1, 40), t, "hyb", 2, 32, "portable")
    table = code_table("hyb", t["tlut"]).contiguous()
    with pytest.raises(RuntimeError, match=r"needs its LUT"):
        torch.ops.gq_cpu.trellis_matmul(x, t["trellis"], table, None, 4, 1, 32, 0)
    with pytest.raises(RuntimeError, match=r"does not fit a table of V=2"):
        torch.ops.gq_cpu.trellis_matmul(x, t["trellis"], table, None, 4, 2, 32, 0)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_class_computes_the_format_reference(isa, dtype):
    """The whole kernel (signs, both transforms with 3 output blocks, scale, bias) against the
    format's reference matmul, through the GEMV and the block path."""
    cls = kernel_class(isa)
    m, n = 96, 64
    t, params = random_layer(m, n, 3, "hyb", seed=7, blocks=3)
    spec = LinearSpec(params, m, n)
    kern = cls(spec, torch.device("cpu"), dtype)
    prepared = kern.prepare(t)
    bias = torch.randn(m).to(dtype)
    fmt = get_format("trellis")
    for rows in (1, 6, 12):
        x = torch.randn(rows, n).to(dtype)
        got = kern.apply(prepared, x, bias)
        want = fmt.matmul(x.float(), t, params, n) + bias.float()
        assert got.dtype == dtype and got.shape == (rows, m)
        tol = 1e-4 if dtype == torch.float32 else 1e-2
        assert torch.allclose(got.float(), want, rtol=tol, atol=tol)
        assert kern.path(x).endswith("gemv" if rows <= 8 else "tiled")


def test_registry_serves_trellis_on_the_cpu_with_the_packed_kernel():
    spec = LinearSpec(get_format("trellis").params(bits=2), 64, 64)
    best = next(isa for isa in ("avx512", "avx2", "portable") if features.isa_support(isa)[0])
    assert choose_kernel(spec, "cpu", torch.float32).name == f"trellis-cpu-{best}"
    ok, why = kernel_class("portable").can_implement(spec, torch.device("cuda"), torch.float16)
    assert not ok and "needs the CPU" in why


@pytest.mark.parametrize("n,blocks", [(48, 1), (576, 1), (1536, 4), (4096, 1), (192, 4), (64, 2)])
@pytest.mark.parametrize("transpose", [False, True])
def test_hadamard_op_is_the_torch_transform(n, blocks, transpose):
    from gq_kernels.hadamard import hadamard_factor, hadamard_k, hadamard_transform

    assert build.status()[0]
    g = torch.Generator().manual_seed(n)
    x = torch.randn(3, n, generator=g)
    signs = random_signs(n, g).float()
    scale = torch.rand(n, generator=g)
    K, _ = hadamard_factor(n // blocks)
    hk = hadamard_k(K) if K > 1 else None
    got = torch.ops.gq_cpu.hadamard(x, signs, hk, blocks, transpose, scale)
    want = hadamard_transform(x * signs, transpose, blocks) * scale
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError, match="Hadamard blocks do not divide"):
        torch.ops.gq_cpu.hadamard(x, None, hk, 5, transpose, None)
