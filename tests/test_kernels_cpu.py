"""CPU kernels (kernels/cpu/, kernels/lut/cpu.py, kernels/bcq/cpu.py) against the formats' reference.

Every variant this CPU runs is forced by name (``<fmt>-cpu-avx512`` / ``-avx2`` / ``-portable``), for
every format, bit width and row count 1..8 (the GEMV) and above (the tiled path), on SmolLM2's
shapes (576x1536, 1536x576) and shapes that are not multiples of any SIMD width, with fresh random
codes, tables, scales and activations. Outputs are pre-filled with NaN, so an element a kernel
never writes shows. Dequantization is compared bit for bit.

Tolerance: the kernels multiply the very values the reference multiplies (W_hat rounded to the
activation dtype) and accumulate in fp32; only the summation order differs. Per output element
|y - y64| <= 1e-5 * (|x| @ |W|.T) (+ half an ulp of the output dtype), y64 the float64 product. One
wrong code in one column already moves an element by about 1/K of that scale (6e-4 at K=1536),
a wrong row or column by order 1.
"""
from __future__ import annotations

import threading

import pytest
import torch

from gq_kernels.cpu import build, features
from gq_kernels.cpu.kernel import GEMV_MAX_ROWS, TILE_BYTES, BitplaneCpuKernel
from gq_kernels.format import LinearSpec
from gq_kernels.registry import choose_kernel, get_format, kernels

VARIANTS = ("avx512", "avx2", "portable")
# Without a compiler (or off Linux) the kernels cannot exist: skip. With one, a failed build fails.
NO_TOOLCHAIN = build.find_compiler() is None or not build.sys.platform.startswith("linux")
pytestmark = pytest.mark.skipif(NO_TOOLCHAIN, reason="no C++ compiler on PATH (or not Linux): no CPU kernels")


def test_extension_builds_and_loads():
    ok, why = build.status()
    assert ok, why
    assert set(torch.ops.gq_cpu.built_variants()) == ({0, 1, 2} if features.is_x86_64() else {0})

SHAPES = [(576, 1536), (1536, 576), (37, 100), (5, 7)]  # (out, in); 100 and 7: partial words and chunks
ROWS = (1, 2, 3, 4, 5, 6, 7, 8, 9, 33)
CASES = [("lut", {}), ("bcq", {"group_size": -1}), ("bcq", {"group_size": 128}), ("bcq", {"group_size": 20})]
SUM_TOL = 1e-5
HALF_ULP = {torch.float32: 0.0, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def kernel_class(fmt: str, isa: str) -> type[BitplaneCpuKernel]:
    ok, why = features.isa_support(isa)
    if not ok:
        pytest.skip(why)
    (cls,) = [k for k in kernels() if k.name == f"{fmt}-cpu-{isa}"]
    return cls


def random_tensors(spec: LinearSpec, seed: int) -> dict[str, torch.Tensor]:
    """Checkpoint tensors of ``spec`` with random codes (any bit pattern) and fp16 values."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, s in spec.tensors().items():
        if s.dtype == torch.int32:
            t = torch.randint(-2**31, 2**31 - 1, s.shape, generator=g, dtype=torch.int64).to(torch.int32)
            # zero the padding bits past in_features, as pack_bitplanes writes them
            tail = spec.in_features % 32
            if tail:
                t[..., -1] &= (1 << tail) - 1
            out[name] = t
        elif name == "scales":
            out[name] = (torch.rand(s.shape, generator=g) * 0.1 + 0.01).half()
        else:
            out[name] = torch.randn(s.shape, generator=g).half()
    return out


def make(fmt, kw, bits, n, k, isa, dtype=torch.float32, seed=0):
    spec = LinearSpec(get_format(fmt).params(bits=bits, **kw), n, k)
    tensors = random_tensors(spec, seed)
    kern = kernel_class(fmt, isa)(spec, torch.device("cpu"), dtype)
    w = get_format(fmt).dequantize(tensors, spec.params, k).to(dtype)  # the reference's W_hat in x's dtype
    return spec, tensors, kern, kern.prepare(tensors), w


def check_close(y, x, w, dtype, what):
    y64 = x.double() @ w.double().T
    scale = x.double().abs() @ w.double().abs().T
    bound = SUM_TOL * scale + HALF_ULP[dtype] * y64.abs() + 1e-30
    err = (y.double() - y64).abs()
    assert not torch.isnan(y).any(), f"{what}: {int(torch.isnan(y).sum())} outputs never written (NaN poison)"
    worst = (err / bound).max().item()
    assert worst <= 1.0, f"{what}: error {worst:.2f}x the bound (max abs err {err.max().item():.3e})"


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}{c[1].get('group_size', '')}")
@pytest.mark.parametrize("isa", VARIANTS)
def test_matmul_matches_reference_fp32(isa, case, bits):
    fmt, kw = case
    for n, k in SHAPES:
        _, tensors, kern, prepared, w = make(fmt, kw, bits, n, k, isa, seed=n + k + bits)
        g = torch.Generator().manual_seed(k)
        for m in ROWS:
            x = torch.randn(m, k, generator=g)
            out = torch.full((m, n), float("nan"))
            y = kern.apply_out(prepared, x, out)
            check_close(y, x, w, torch.float32, f"{kern.name} bits={bits} {n}x{k} rows={m} {kern.path(x)}")
        # The module path (3-D activations, bias) as GQLinear calls it.
        x = torch.randn(2, 3, k, generator=g)
        bias = torch.randn(n, generator=g)
        y = kern.apply(prepared, x, bias)
        assert y.shape == (2, 3, n) and y.dtype == torch.float32
        check_close(y.reshape(-1, n) - bias, x.reshape(-1, k), w, torch.float32, f"{kern.name} apply 2x3 rows")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", CASES[:3], ids=lambda c: f"{c[0]}{c[1].get('group_size', '')}")
@pytest.mark.parametrize("isa", VARIANTS)
def test_matmul_matches_reference_half_activations(isa, case, dtype):
    """bf16 / fp16 activations: values rounded to x's dtype (the reference's W_hat.to(x.dtype))."""
    fmt, kw = case
    for bits in (2, 3, 4):
        for n, k in SHAPES[1:3]:
            _, tensors, kern, prepared, w = make(fmt, kw, bits, n, k, isa, dtype, seed=bits)
            for m in (1, 5, 8, 12):
                x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(dtype)
                y = kern.apply(prepared, x)
                assert y.dtype == dtype
                check_close(y.float(), x.float(), w.float(), dtype, f"{kern.name} {dtype} bits={bits} {n}x{k} rows={m}")
                if m == 1 and bits == 2:  # the reference op itself meets the same bound
                    ref = get_format(fmt).matmul(x, tensors, kern.layer.params, k)
                    check_close(ref.float(), x.float(), w.float(), dtype, "reference")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("isa", VARIANTS)
def test_dequantize_is_bit_exact(isa, dtype):
    for fmt, kw in CASES:
        for bits in (2, 3, 4):
            for n, k in SHAPES:
                _, tensors, kern, prepared, w = make(fmt, kw, bits, n, k, isa, dtype, seed=bits * k)
                got = kern.dequantize(prepared, torch.full((n, k), float("nan")))
                assert torch.equal(got, w.float()), f"{kern.name} {dtype} bits={bits} {n}x{k}: not bit-exact"


@pytest.mark.parametrize("isa", VARIANTS)
def test_tiled_path_spans_several_bounded_tiles(isa):
    """Above 8 rows: tiles of at most TILE_BYTES of fp32 weights (here 64 rows of K=16384: 3 tiles)."""
    n, k = 150, 16384
    assert TILE_BYTES // (4 * k) < n
    for fmt, kw in (("lut", {}), ("bcq", {"group_size": 128})):
        _, _, kern, prepared, w = make(fmt, kw, 3, n, k, isa, seed=7)
        x = torch.randn(GEMV_MAX_ROWS + 4, k, generator=torch.Generator().manual_seed(1))
        y = kern.apply_out(prepared, x, torch.full((x.shape[0], n), float("nan")))
        assert kern.path(x).endswith(":tiled")
        check_close(y, x, w, torch.float32, f"{kern.name} tiled {n}x{k}")


def test_variants_agree_and_threads_do_not_change_results():
    """Output rows are split over threads, never the sum of one element: 1 or 2 threads give the same
    bits. The variants accumulate in the same order per lane group only within one ISA width, so
    across variants the results agree to the summation bound."""
    runnable = [isa for isa in VARIANTS if features.isa_support(isa)[0]]
    n, k = 1536, 576
    ys = {}
    for isa in runnable:
        _, _, kern, prepared, w = make("lut", {}, 3, n, k, isa, seed=3)
        x = torch.randn(4, k, generator=torch.Generator().manual_seed(2))
        threads = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            one = kern.apply(prepared, x)
            torch.set_num_threads(2)
            two = kern.apply(prepared, x)
        finally:
            torch.set_num_threads(threads)
        assert torch.equal(one, two), isa
        ys[isa] = one
        check_close(one, x, w, torch.float32, isa)


def test_gqlinear_on_the_cpu_keeps_only_packed_weights():
    """The best variant serves, reading the checkpoint tensors in place: no dense weight, no copy."""
    from gq_serve.quant_linear import GQLinear

    best = next(isa for isa in VARIANTS if features.isa_support(isa)[0])
    for fmt, kw in (("lut", {}), ("bcq", {"group_size": 128})):
        layer = GQLinear(576, 1536, get_format(fmt).params(bits=3, **kw), bias=True)
        for name, t in random_tensors(layer.spec, 0).items():
            getattr(layer, name).copy_(t)
        x = torch.randn(1, 5, 576)
        y = layer(x)
        assert layer.kernel.name == f"{fmt}-cpu-{best}"
        assert "weight" not in layer._runtime
        assert layer._runtime["qweight"].data_ptr() == layer.qweight.data_ptr()
        want = torch.nn.functional.linear(x, layer.dequantize(), layer.bias)
        check_close(y.reshape(-1, 1536) - layer.bias, x.reshape(-1, 576), layer.dequantize(), torch.float32, fmt)
        assert torch.allclose(y, want, rtol=1e-4, atol=1e-4)


def test_compiles_as_one_opaque_op():
    """torch.compile(fullgraph=True) traces through apply: the op's fake implementation gives shapes."""
    from gq_serve.quant_linear import GQLinear

    layer = GQLinear(100, 37, get_format("lut").params(bits=4))
    for name, t in random_tensors(layer.spec, 1).items():
        getattr(layer, name).copy_(t)
    x = torch.randn(3, 100)
    eager = layer(x)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x), eager)


def test_can_implement_says_why_not(monkeypatch):
    lut3 = LinearSpec(get_format("lut").params(bits=3), 24, 40)
    cls = kernel_class("lut", "portable")
    assert cls.can_implement(lut3, torch.device("cpu"), torch.float32) == (True, None)
    assert cls.can_implement(lut3, torch.device("cuda"), torch.float16) == (False, "needs the CPU, got cuda")
    ok, why = cls.can_implement(LinearSpec(get_format("lut").params(bits=8), 24, 40), torch.device("cpu"), torch.float32)
    assert not ok and "serves 1..4 bits" in why and "got 8" in why
    ok, why = cls.can_implement(LinearSpec(get_format("bcq").params(bits=3), 24, 40), torch.device("cpu"), torch.float32)
    assert not ok and "serves formats ['lut']" in why
    assert cls.can_implement(lut3, torch.device("cpu"), torch.int8)[0] is False
    # A CPU without AVX-512 BW: the avx512 variant names the flag and avx2 serves.
    flags = features.cpu_flags()
    if features.is_x86_64() and {"avx2", "fma", "f16c"} <= flags:
        monkeypatch.setattr(features, "cpu_flags", lambda: flags - {"avx512bw"})
        ok, why = kernel_class("lut", "avx2").can_implement(lut3, torch.device("cpu"), torch.float32)
        assert ok
        (avx512,) = [k for k in kernels() if k.name == "lut-cpu-avx512"]
        ok, why = avx512.can_implement(lut3, torch.device("cpu"), torch.float32)
        assert not ok and "lacks avx512bw" in why
        assert choose_kernel(lut3, "cpu", torch.float32).name == "lut-cpu-avx2"
    # No extension (no compiler): every CPU kernel says so and the dense kernel serves.
    monkeypatch.setattr(build, "status", lambda: (False, "no C++ compiler on PATH (looked for g++ and c++)"))
    ok, why = cls.can_implement(lut3, torch.device("cpu"), torch.float32)
    assert not ok and "no C++ compiler" in why
    assert choose_kernel(lut3, "cpu", torch.float32).name == "dense"


def test_build_without_a_compiler_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(build.shutil, "which", lambda name: None)
    with pytest.raises(build.ExtensionUnavailable, match="no C.. compiler on PATH"):
        build.library_path()


def test_build_cache_is_keyed_locked_and_atomic(monkeypatch, tmp_path):
    """Two builders of one key: one compiles, the other waits and reuses; the directory appears
    whole (renamed from a temporary one); a changed flag is another key; a failed build leaves nothing."""
    monkeypatch.setenv("GQ_CACHE", str(tmp_path))
    calls, gate = [], threading.Event()

    def fake_compile(plan, out_dir):
        calls.append(out_dir)
        gate.wait(10)
        (out_dir / build.LIBRARY).write_bytes(b"lib")

    monkeypatch.setattr(build, "_compile", fake_compile)
    results = []
    workers = [threading.Thread(target=lambda: results.append(build.library_path())) for _ in range(2)]
    for t in workers:
        t.start()
    while not calls:
        threading.Event().wait(0.01)
    assert not any(p.name.startswith("gq_cpu-") and p.is_dir() for p in (tmp_path / "ext").iterdir())  # not yet
    gate.set()
    for t in workers:
        t.join(30)
    assert len(calls) == 1 and len(results) == 2 and results[0] == results[1] and results[0].read_bytes() == b"lib"
    assert calls[0].name.startswith(".gq_cpu-") and not calls[0].exists()  # built aside, then renamed
    assert "seconds" in (results[0].parent / "build.json").read_text()
    monkeypatch.setattr(build, "ISA_COMMON", (*build.ISA_COMMON, "-g"))
    other = build.library_path()
    assert other != results[0] and len(calls) == 2

    def broken(plan, out_dir):
        raise build.ExtensionUnavailable("compiling the CPU kernels (ops) failed")

    monkeypatch.setattr(build, "_compile", broken)
    monkeypatch.setattr(build, "ISA_COMMON", (*build.ISA_COMMON, "-g0"))
    with pytest.raises(build.ExtensionUnavailable, match="failed"):
        build.library_path()
    assert sorted(p.name for p in (tmp_path / "ext").iterdir() if p.is_dir()) == sorted(
        [results[0].parent.name, other.parent.name])


@pytest.mark.parametrize("isa", VARIANTS)
def test_shared_call_equals_each_layer_side_by_side(isa):
    # q/k/v-like weights of different formats and widths, one input: the one-call path must write
    # exactly what separate calls do (same kernel per output row), for the GEMV and the tiled path.
    k = 100
    parts = [make("lut", {}, 3, 48, k, isa, seed=1), make("bcq", {"group_size": 20}, 2, 17, k, isa, seed=2),
             make("lut", {}, 4, 33, k, isa, seed=3)]
    members = [(kern, prepared) for _, _, kern, prepared, _ in parts]
    g = torch.Generator().manual_seed(0)
    for shape in ((1, k), (3, k), (2, 5, k)):  # 1 and 3 rows: the GEMV; 10 rows: the tiled path
        x = torch.randn(shape, generator=g)
        y = type(members[0][0]).shared(members)(x)
        assert y.shape == (*shape[:-1], 48 + 17 + 33)
        assert torch.equal(y, torch.cat([kern.apply(p, x) for kern, p in members], dim=-1))
    # Kernels it cannot combine (another variant or dtype): None, so the caller applies each.
    other = make("lut", {}, 3, 8, k, isa, dtype=torch.bfloat16)[2:4]
    assert type(members[0][0]).shared([members[0], other]) is None
