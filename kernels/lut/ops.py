"""``lut`` on the GPU: ``torch.library`` operators over the Triton kernels, and the kernel class
that serves ``lut`` layers with them.

    torch.ops.gq.lut_matmul(x, qweight, codebook, in_features)          -> y [..., N]
    torch.ops.gq.lut_dequantize(qweight, codebook, in_features, dtype)  -> W [N, K]

Being custom operators (with fake implementations for shape propagation), they are opaque to
``torch.compile`` and safe inside CUDA graph capture: dynamo does not trace into the Triton launch,
and the launches themselves are capturable (no host synchronisation, outputs come from the caching
allocator).

Per call, :func:`choose_path` picks ``gemv`` (CUDA, fp16/bf16, 1..GEMV_MAX_ROWS rows: the Triton
matrix-vector kernel reading the packed weights, the memory-bound decode case), ``dequant`` (CUDA
otherwise: the Triton dequantize kernel writes W_hat in the activation dtype, then a dense
``F.linear``) or ``reference`` (no Triton or not CUDA: :mod:`.reference`). All three compute
``x @ W_hat.to(x.dtype).T``; they differ only in summation order.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from gq_kernels.kernel import TritonKernel, kernels_serve, n_rows, rows_2d
from gq_kernels.lut import reference as ref
from gq_kernels.lut.format import NAME

# Rows served by the GEMV kernels: one tl.dot tile of 16 rows costs about the same as 2..8 rows, and
# below 16 rows decode stays memory-bound, where reading packed weights once is the whole point.
GEMV_MAX_ROWS = 16
GEMV_DTYPES = (torch.float16, torch.bfloat16)


def choose_path(x: torch.Tensor) -> str:
    """Which implementation serves ``x`` [..., K]: "gemv", "dequant" or "reference"."""
    if not kernels_serve(x.device):
        return "reference"
    if x.dtype in GEMV_DTYPES and 1 <= n_rows(x) <= GEMV_MAX_ROWS:
        return "gemv"
    return "dequant"


@torch.library.custom_op("gq::lut_dequantize", mutates_args=())
def lut_dequantize(qweight: torch.Tensor, codebook: torch.Tensor, in_features: int, dtype: torch.dtype) -> torch.Tensor:
    """W_hat [N, in_features] in ``dtype`` from int32 [bits, N, ceil(K/32)] + fp16 [N, 2^bits]."""
    if kernels_serve(qweight.device):
        from gq_kernels.lut.triton_kernels import lut_dequantize as kernel

        return kernel(qweight, codebook, in_features, dtype)
    return ref.dequantize_packed(qweight, codebook, in_features).to(dtype)


@lut_dequantize.register_fake
def _(qweight, codebook, in_features, dtype):
    return qweight.new_empty((qweight.shape[1], in_features), dtype=dtype)


@torch.library.custom_op("gq::lut_matmul", mutates_args=())
def lut_matmul(x: torch.Tensor, qweight: torch.Tensor, codebook: torch.Tensor, in_features: int) -> torch.Tensor:
    """``x @ W_hat.T`` for x [..., in_features] (any float dtype); returns [..., N] in x's dtype."""
    path = choose_path(x)
    if path == "reference":
        return ref.matmul(x, qweight, codebook, in_features)
    if path == "dequant":
        return F.linear(x, lut_dequantize(qweight, codebook, in_features, x.dtype))
    from gq_kernels.lut.triton_kernels import lut_gemv

    return lut_gemv(rows_2d(x), qweight, codebook).reshape(*x.shape[:-1], qweight.shape[1])


@lut_matmul.register_fake
def _(x, qweight, codebook, in_features):
    return x.new_empty((*x.shape[:-1], qweight.shape[1]))


class LutTritonKernel(TritonKernel):
    """Packed ``lut`` weights on a CUDA GPU: the Triton GEMV for decode, dequantize + dense matmul
    for prefill (see :func:`choose_path`). No dense copy of the weight is kept."""

    name = "lut-triton"
    formats = (NAME,)

    def path(self, x):
        return f"{self.name}:{choose_path(x)}"

    def apply(self, tensors, x, bias=None):
        y = torch.ops.gq.lut_matmul(x, tensors["qweight"], tensors["codebook"], self.layer.in_features)
        return y if bias is None else y + bias.to(y.dtype)
