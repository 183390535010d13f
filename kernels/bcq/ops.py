"""``bcq`` on the GPU: ``torch.library`` operators over the Triton kernels, and the kernel class
that serves ``bcq`` layers with them.

    torch.ops.gq.bcq_matmul(x, qweight, scales, offsets, group_size, in_features)          -> y [..., N]
    torch.ops.gq.bcq_dequantize(qweight, scales, offsets, group_size, in_features, dtype)  -> W [N, K]

Opaque custom operators with fake implementations, as in :mod:`gq_kernels.lut.ops`; the same per-call
paths (``gemv`` / ``dequant`` / ``reference``), except that the GEMV needs ``group_size`` -1 or a
multiple of 4 (its partial-sum tables span 4 columns).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from gq_kernels.bcq import reference as ref
from gq_kernels.bcq.format import NAME
from gq_kernels.kernel import TritonKernel, kernels_serve, n_rows, rows_2d

GEMV_MAX_ROWS = 16
GEMV_DTYPES = (torch.float16, torch.bfloat16)


def choose_path(x: torch.Tensor, group_size: int = -1) -> str:
    """Which implementation serves ``x`` [..., K]: "gemv", "dequant" or "reference"."""
    if not kernels_serve(x.device):
        return "reference"
    gemv_ok = group_size == -1 or group_size % 4 == 0  # tables cover 4 columns
    if x.dtype in GEMV_DTYPES and 1 <= n_rows(x) <= GEMV_MAX_ROWS and gemv_ok:
        return "gemv"
    return "dequant"


@torch.library.custom_op("gq::bcq_dequantize", mutates_args=())
def bcq_dequantize(qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor, group_size: int,
                   in_features: int, dtype: torch.dtype) -> torch.Tensor:
    """W_hat [N, in_features] in ``dtype``: ``s * q + o`` in fp32, then cast."""
    if kernels_serve(qweight.device):
        from gq_kernels.bcq.triton_kernels import bcq_dequantize as kernel

        return kernel(qweight, scales, offsets, group_size, in_features, dtype)
    return ref.dequantize_packed(qweight, scales, offsets, group_size, in_features).to(dtype)


@bcq_dequantize.register_fake
def _(qweight, scales, offsets, group_size, in_features, dtype):
    return qweight.new_empty((qweight.shape[1], in_features), dtype=dtype)


@torch.library.custom_op("gq::bcq_matmul", mutates_args=())
def bcq_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor,
               group_size: int, in_features: int) -> torch.Tensor:
    """``x @ W_hat.T`` for x [..., in_features]; returns [..., N] in x's dtype."""
    path = choose_path(x, group_size)
    if path == "reference":
        return ref.matmul(x, qweight, scales, offsets, group_size, in_features)
    if path == "dequant":
        return F.linear(x, bcq_dequantize(qweight, scales, offsets, group_size, in_features, x.dtype))
    from gq_kernels.bcq.triton_kernels import bcq_gemv

    return bcq_gemv(rows_2d(x), qweight, scales, offsets, group_size).reshape(*x.shape[:-1], qweight.shape[1])


@bcq_matmul.register_fake
def _(x, qweight, scales, offsets, group_size, in_features):
    return x.new_empty((*x.shape[:-1], qweight.shape[1]))


class BcqTritonKernel(TritonKernel):
    """Packed ``bcq`` weights on a CUDA GPU: the LUT-GEMM-style Triton GEMV for decode, dequantize +
    dense matmul otherwise (see :func:`choose_path`). No dense copy of the weight is kept."""

    name = "bcq-triton"
    formats = (NAME,)

    def path(self, x):
        return f"{self.name}:{choose_path(x, self.layer.params.group_size)}"

    def apply(self, tensors, x, bias=None):
        y = torch.ops.gq.bcq_matmul(x, tensors["qweight"], tensors["scales"], tensors["offsets"],
                                    self.layer.params.group_size, self.layer.in_features)
        return y if bias is None else y + bias.to(y.dtype)
