"""Triton ``trellis`` kernels (kernels/trellis/triton_kernels.py, ops.py) against the reference.

Without a GPU they run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1); the
``gpu`` test repeats the check compiled on CUDA with a Llama-2-7B shape.
"""
from __future__ import annotations

import itertools
import os

import pytest
import torch

triton = pytest.importorskip("triton", reason="Triton is not installed (pip install triton)")

CUDA = torch.cuda.is_available()
if not CUDA and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA: set TRITON_INTERPRET=1 to run the Triton kernels in the interpreter",
                allow_module_level=True)

from gq_kernels.registry import get_format  # noqa: E402
from gq_kernels.trellis import reference as ref  # noqa: E402
from gq_kernels.hadamard import hadamard_transform  # noqa: E402
from gq_kernels.trellis.triton_kernels import trellis_dequantize_code, trellis_gemv_code  # noqa: E402

DEV = "cuda" if CUDA else "cpu"

from conftest import trellis_random_layer  # noqa: E402


def random_layer(m, n, bits, code, seed=0, blocks=1):
    return trellis_random_layer(m, n, bits, code, seed, blocks, DEV)


@pytest.mark.parametrize("bits,code", list(itertools.product((2, 3, 4), ("hyb", "1mad", "3inst"))))
def test_dequantize_kernel_decodes_exactly(bits, code):
    m, n = 32, 64
    t, p = random_layer(m, n, bits, code)
    got = trellis_dequantize_code(t["trellis"], t.get("tlut"), m, n, bits, code)
    want = ref.decode_weight(t["trellis"].cpu(), code, bits, m, n, t["tlut"].cpu() if "tlut" in t else None)
    assert torch.equal(got.cpu(), want)


@pytest.mark.parametrize("rows", [1, 3, 8])
@pytest.mark.parametrize("bits,code", [(2, "hyb"), (3, "1mad"), (4, "3inst")])
def test_gemv_kernel_equals_the_reference_product(rows, bits, code):
    m, n = 48, 96
    t, p = random_layer(m, n, bits, code, seed=rows)
    x = torch.randn(rows, n, device=DEV)
    wc = ref.decode_weight(t["trellis"].cpu(), code, bits, m, n, t["tlut"].cpu() if "tlut" in t else None)
    got = trellis_gemv_code(x, t["trellis"], t.get("tlut"), m, bits, code)
    want = x.cpu() @ wc.t()
    assert torch.allclose(got.cpu(), want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("n,blocks", [(48, 1), (576, 1), (1536, 4), (4096, 1), (11008, 1), (192, 4)])
@pytest.mark.parametrize("transpose", [False, True])
def test_hadamard_kernel_equals_the_torch_transform(n, blocks, transpose):
    from gq_kernels.trellis.triton_kernels import hadamard_transform_triton

    x = torch.randn(3, n, device=DEV)
    got = hadamard_transform_triton(x, transpose, blocks)
    want = hadamard_transform(x.cpu(), transpose, blocks)
    assert torch.allclose(got.cpu(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rows", [1, 5, 12])
def test_op_and_kernel_class_compute_the_reference(rows, monkeypatch):
    """The whole op (transforms + kernel) on every path it can take here, against the format's
    reference matmul; with out_rht_blocks=3 (GuidedQuant's exact per-group transform)."""
    from gq_kernels.trellis import ops

    if not CUDA:  # interpreter: pretend the device serves the kernels
        monkeypatch.setattr(ops, "kernels_serve", lambda device: True)
    m, n = 96, 64
    t, p = random_layer(m, n, 2, "hyb", seed=7, blocks=3)
    x = torch.randn(rows, n, device=DEV)
    fmt = get_format("trellis")
    want = fmt.matmul(x.cpu(), {k: v.cpu() for k, v in t.items()}, p, n)
    got = ops.trellis_matmul(x, t["trellis"], t["SU"], t["SV"], t["Wscale"], t["tlut"], 2, "hyb", 3)
    assert got.shape == (rows, m)
    assert torch.allclose(got.cpu(), want, rtol=1e-4, atol=1e-5)
    dense = x.cpu() @ fmt.dequantize({k: v.cpu() for k, v in t.items()}, p, n).t()
    assert torch.allclose(got.cpu(), dense, rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_gemv_on_gpu_llama_shape():
    from gq_kernels.trellis import ops

    m, n = 4096, 11008
    t, p = random_layer(m, n, 2, "hyb")
    x = torch.randn(1, n, device="cuda", dtype=torch.float16)
    got = ops.trellis_matmul(x, t["trellis"], t["SU"], t["SV"], t["Wscale"], t["tlut"], 2, "hyb", 1)
    want = x.float() @ get_format("trellis").dequantize(t, p, n).t()
    assert (got.float() - want).norm() / want.norm() < 4 * 2.0**-11
