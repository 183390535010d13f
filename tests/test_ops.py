"""torch.library operators and per-call paths (kernels/{lut,bcq}/ops.py), the Triton kernel
classes, and their use by GQLinear."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from gq_kernels import kernel as kernel_mod
from gq_kernels.bcq import ops as bcq_ops
from gq_kernels.bcq import reference as bcq_ref
from gq_kernels.cpu import build as cpu_build
from gq_kernels.format import LinearSpec
from gq_kernels.lut import ops as lut_ops
from gq_kernels.lut import reference as lut_ref
from gq_kernels.registry import choose_kernel, get_format

CUDA = torch.cuda.is_available()


def lut_weight(n, k, bits, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (n, k), generator=g, dtype=torch.uint8)
    return lut_ref.pack(codes, bits).to(device), torch.randn(n, 1 << bits, generator=g).half().to(device)


def bcq_weight(n, k, bits, group_size, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (n, k), generator=g, dtype=torch.uint8)
    ng = bcq_ref.n_groups(k, group_size)
    scales = (torch.rand(n, ng, generator=g) * 0.1 + 0.01).half()
    offsets = (torch.randn(n, ng, generator=g) * 0.1).half()
    return bcq_ref.pack(codes, bits).to(device), scales.to(device), offsets.to(device)


# ----------------------------------------------------------------------------- CPU: reference path
@pytest.mark.parametrize("shape", [(5, 40), (2, 3, 40), (0, 40)])
def test_cpu_ops_are_the_reference(shape):
    x = torch.randn(*shape)
    qw, cb = lut_weight(24, 40, 3)
    torch.testing.assert_close(torch.ops.gq.lut_matmul(x, qw, cb, 40), lut_ref.matmul(x, qw, cb, 40), rtol=0, atol=0)
    qw, s, o = bcq_weight(24, 40, 4, 8)
    torch.testing.assert_close(torch.ops.gq.bcq_matmul(x, qw, s, o, 8, 40),
                               bcq_ref.matmul(x, qw, s, o, 8, 40), rtol=0, atol=0)
    assert torch.equal(torch.ops.gq.bcq_dequantize(qw, s, o, 8, 40, torch.float16),
                       bcq_ref.dequantize_packed(qw, s, o, 8, 40).half())


def test_opcheck_schemas_and_fake_impls():
    """torch.library's own checks: schema, fake (meta) implementation, dispatch registration."""
    qw, cb = lut_weight(16, 40, 2)
    x = torch.randn(3, 40)
    torch.library.opcheck(torch.ops.gq.lut_matmul.default, (x, qw, cb, 40))
    torch.library.opcheck(torch.ops.gq.lut_dequantize.default, (qw, cb, 40, torch.float16))
    qw, s, o = bcq_weight(16, 40, 3, -1)
    torch.library.opcheck(torch.ops.gq.bcq_matmul.default, (x, qw, s, o, -1, 40))
    torch.library.opcheck(torch.ops.gq.bcq_dequantize.default, (qw, s, o, -1, 40, torch.bfloat16))


def test_torch_compile_fullgraph_through_ops():
    """dynamo treats the ops as opaque nodes with fake shapes: no graph break."""
    qw, cb = lut_weight(16, 40, 4)
    qb, s, o = bcq_weight(16, 40, 2, 8)

    def f(x):
        return torch.ops.gq.lut_matmul(x, qw, cb, 40).relu() + torch.ops.gq.bcq_matmul(x, qb, s, o, 8, 40)

    x = torch.randn(2, 40)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), f(x))


def _fake(device: str, dtype=torch.float16, shape=(1, 4096)):
    t = torch.empty(shape, dtype=dtype, device="meta")
    return SimpleNamespace(device=torch.device(device), dtype=dtype, shape=t.shape, numel=t.numel)


def test_choose_path_rules(monkeypatch):
    monkeypatch.setattr(kernel_mod, "triton_available", lambda: True)
    assert lut_ops.choose_path(_fake("cpu")) == "reference"
    assert lut_ops.choose_path(_fake("cuda")) == "gemv"
    assert lut_ops.choose_path(_fake("cuda", torch.bfloat16, (2, 8, 4096))) == "gemv"  # 16 rows
    assert lut_ops.choose_path(_fake("cuda", shape=(17, 4096))) == "dequant"  # prefill
    assert lut_ops.choose_path(_fake("cuda", torch.float32)) == "dequant"
    assert lut_ops.choose_path(_fake("cuda", shape=(0, 4096))) == "dequant"
    assert bcq_ops.choose_path(_fake("cuda"), group_size=128) == "gemv"
    assert bcq_ops.choose_path(_fake("cuda"), group_size=-1) == "gemv"
    assert bcq_ops.choose_path(_fake("cuda"), group_size=6) == "dequant"  # tables span 4 columns
    monkeypatch.setattr(kernel_mod, "triton_available", lambda: False)
    assert lut_ops.choose_path(_fake("cuda")) == "reference"


def _spec(fmt, bits, n=24, k=40, **kw):
    return LinearSpec(get_format(fmt).params(bits=bits, **kw), n, k)


def test_gqlinear_routes_cuda_to_the_ops(monkeypatch):
    """On CUDA with Triton each format gets its Triton kernel; on the CPU its packed CPU kernel
    (dense when the CPU kernels' extension cannot be built); on CUDA without Triton the dense one."""
    monkeypatch.setattr(kernel_mod, "triton_available", lambda: True)
    assert type(choose_kernel(_spec("lut", 3), "cuda", torch.float16)) is lut_ops.LutTritonKernel
    assert type(choose_kernel(_spec("bcq", 3, group_size=8), "cuda", torch.bfloat16)) is bcq_ops.BcqTritonKernel
    cpu_ok = cpu_build.status()[0]
    assert choose_kernel(_spec("lut", 3), "cpu", torch.float32).name.startswith("lut-cpu-" if cpu_ok else "dense")
    monkeypatch.setattr(kernel_mod, "triton_available", lambda: False)
    assert choose_kernel(_spec("lut", 3), "cuda", torch.float16).name == "dense"


def test_gqlinear_cuda_route_math_on_cpu_tensors():
    """The Triton kernel classes (ops + bias) give the cached-dense CPU forward's result."""
    from gq_serve.quant_linear import GQLinear

    lut = GQLinear(40, 24, get_format("lut").params(bits=3), bias=True)
    lut.qweight.copy_(lut_weight(24, 40, 3)[0])
    lut.codebook.copy_(lut_weight(24, 40, 3)[1])
    lut.bias.data.normal_()
    bcq = GQLinear(40, 24, get_format("bcq").params(bits=2, group_size=8))
    qw, s, o = bcq_weight(24, 40, 2, 8)
    bcq.qweight.copy_(qw), bcq.scales.copy_(s), bcq.offsets.copy_(o)
    x = torch.randn(3, 40)
    lut_k = lut_ops.LutTritonKernel(lut.spec, torch.device("cpu"), torch.float32)
    bcq_k = bcq_ops.BcqTritonKernel(bcq.spec, torch.device("cpu"), torch.float32)
    torch.testing.assert_close(lut_k.apply(lut.packed_tensors(), x, lut.bias), lut(x))
    torch.testing.assert_close(bcq_k.apply(bcq.packed_tensors(), x, None), bcq(x))


# ----------------------------------------------------------------------------- GPU


@pytest.mark.parametrize("rows", [1, 4, 16, 17, 64])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_gpu_every_path_matches_reference(rows, dtype):
    n, k = 1536, 576
    x = torch.randn(rows, k, device="cuda", dtype=dtype)
    want_path = "dequant" if dtype == torch.float32 or rows > lut_ops.GEMV_MAX_ROWS else "gemv"
    assert lut_ops.choose_path(x) == want_path
    bound = {torch.float16: 4 * 2.0**-11, torch.bfloat16: 4 * 2.0**-8, torch.float32: 1e-3}[dtype]
    for bits in (2, 3, 4):
        qw, cb = lut_weight(n, k, bits, "cuda", seed=bits)
        w = lut_ref.dequantize_packed(qw, cb, k).to(dtype).float()
        y_ref = x.float() @ w.T
        y = torch.ops.gq.lut_matmul(x, qw, cb, k)
        assert ((y.float() - y_ref).norm() / y_ref.norm()) < bound
        qw, s, o = bcq_weight(n, k, bits, 128, "cuda", seed=bits)
        w = bcq_ref.dequantize_packed(qw, s, o, 128, k).to(dtype).float()
        y_ref = x.float() @ w.T
        y = torch.ops.gq.bcq_matmul(x, qw, s, o, 128, k)
        assert ((y.float() - y_ref).norm() / y_ref.norm()) < 2 * bound


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_gpu_cuda_graph_capture_and_compile_through_gqlinear():
    """A GQLinear stack captures into a CUDA graph (torch.compile reduce-overhead) and replays
    the eager result; the ops read packed weights, so no dense weight gets cached."""
    from gq_serve.quant_linear import GQLinear

    layers = []
    for i, fmt in enumerate(("lut", "bcq")):
        params = get_format(fmt).params(bits=3, **({"group_size": 128} if fmt == "bcq" else {}))
        m = GQLinear(576, 576, params, dtype=torch.float16, device="cuda")
        if fmt == "lut":
            m.qweight.copy_(lut_weight(576, 576, 3, "cuda", i)[0]); m.codebook.copy_(lut_weight(576, 576, 3, "cuda", i)[1])
        else:
            qw, s, o = bcq_weight(576, 576, 3, 128, "cuda", i)
            m.qweight.copy_(qw); m.scales.copy_(s); m.offsets.copy_(o)
        layers.append(m)
    model = torch.nn.Sequential(*layers)
    x = torch.randn(1, 576, device="cuda", dtype=torch.float16)
    with torch.inference_mode():
        eager = model(x)
        compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
        for _ in range(3):  # warmup, record, replay
            y = compiled(x)
    torch.testing.assert_close(y, eager)
    assert all(m.kernel.name != "dense" and "weight" not in m._runtime for m in layers)
