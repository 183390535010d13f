"""``torch.library`` operators for the quantized formats, and the dispatcher behind them.

    torch.ops.gq.lut_matmul(x, qweight, codebook, in_features)                       -> y [..., N]
    torch.ops.gq.bcq_matmul(x, qweight, scales, offsets, group_size, in_features)    -> y [..., N]
    torch.ops.gq.lut_dequantize(qweight, codebook, in_features, dtype)               -> W [N, K]
    torch.ops.gq.bcq_dequantize(qweight, scales, offsets, group_size, in_features, dtype) -> W [N, K]

Being custom operators (with fake implementations for shape propagation), they are opaque to
``torch.compile`` and safe inside CUDA graph capture: dynamo does not trace into the Triton launch,
and the launches themselves are capturable (no host synchronisation, outputs come from the caching
allocator).

Which implementation runs is decided per call by :func:`choose_path`:
  * ``gemv``      CUDA, fp16/bf16 activations, 1..GEMV_MAX_ROWS rows: the Triton matrix-vector
                  kernel reading the packed weights (decode, the memory-bound case);
  * ``dequant``   CUDA otherwise (prefill, large batches, fp32): the Triton dequantize kernel writes
                  W_hat in the activation dtype, then a dense ``F.linear`` (compute-bound anyway);
  * ``reference`` any other device, or no Triton: ``kernels.*.reference`` (the specification).
All three compute ``x @ W_hat.to(x.dtype).T``; they differ only in summation order.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from kernels.bcq import reference as bcq_ref
from kernels.lut import reference as lut_ref

# Rows served by the GEMV kernels: one tl.dot tile of 16 rows costs about the same as 2..8 rows, and
# below 16 rows decode stays memory-bound, where reading packed weights once is the whole point.
GEMV_MAX_ROWS = 16
GEMV_DTYPES = (torch.float16, torch.bfloat16)
PATHS = ("gemv", "dequant", "reference")


@functools.cache
def triton_available() -> bool:
    """True when Triton imports (it ships with CUDA builds of torch; CPU builds usually lack it)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def kernels_serve(device: torch.device) -> bool:
    """True when the Triton kernels run on ``device`` (CUDA with Triton installed)."""
    return device.type == "cuda" and triton_available()


def choose_path(fmt: str, x: torch.Tensor, group_size: int = -1) -> str:
    """Which implementation serves ``x`` [..., K] for format ``fmt`` ("lut" or "bcq")."""
    if not kernels_serve(x.device):
        return "reference"
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    gemv_ok = fmt == "lut" or group_size == -1 or group_size % 4 == 0  # bcq tables cover 4 columns
    if x.dtype in GEMV_DTYPES and 1 <= rows <= GEMV_MAX_ROWS and gemv_ok:
        return "gemv"
    return "dequant"


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x [..., K] -> [M, K] with contiguous rows (a view when possible)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


# ----------------------------------------------------------------------------------------- lut
@torch.library.custom_op("gq::lut_dequantize", mutates_args=())
def lut_dequantize(qweight: torch.Tensor, codebook: torch.Tensor, in_features: int, dtype: torch.dtype) -> torch.Tensor:
    """W_hat [N, in_features] in ``dtype`` from int32 [bits, N, ceil(K/32)] + fp16 [N, 2^bits]."""
    if kernels_serve(qweight.device):
        from kernels.lut.triton_kernels import lut_dequantize as kernel

        return kernel(qweight, codebook, in_features, dtype)
    return lut_ref.dequantize_packed(qweight, codebook, in_features).to(dtype)


@lut_dequantize.register_fake
def _(qweight, codebook, in_features, dtype):
    return qweight.new_empty((qweight.shape[1], in_features), dtype=dtype)


@torch.library.custom_op("gq::lut_matmul", mutates_args=())
def lut_matmul(x: torch.Tensor, qweight: torch.Tensor, codebook: torch.Tensor, in_features: int) -> torch.Tensor:
    """``x @ W_hat.T`` for x [..., in_features] (any float dtype); returns [..., N] in x's dtype."""
    path = choose_path("lut", x)
    if path == "reference":
        return lut_ref.matmul(x, qweight, codebook, in_features)
    if path == "dequant":
        return F.linear(x, lut_dequantize(qweight, codebook, in_features, x.dtype))
    from kernels.lut.triton_kernels import lut_gemv

    return lut_gemv(_rows(x), qweight, codebook).reshape(*x.shape[:-1], qweight.shape[1])


@lut_matmul.register_fake
def _(x, qweight, codebook, in_features):
    return x.new_empty((*x.shape[:-1], qweight.shape[1]))


# ----------------------------------------------------------------------------------------- bcq
@torch.library.custom_op("gq::bcq_dequantize", mutates_args=())
def bcq_dequantize(qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor, group_size: int,
                   in_features: int, dtype: torch.dtype) -> torch.Tensor:
    """W_hat [N, in_features] in ``dtype``: ``s * q + o`` in fp32, then cast."""
    if kernels_serve(qweight.device):
        from kernels.bcq.triton_kernels import bcq_dequantize as kernel

        return kernel(qweight, scales, offsets, group_size, in_features, dtype)
    return bcq_ref.dequantize_packed(qweight, scales, offsets, group_size, in_features).to(dtype)


@bcq_dequantize.register_fake
def _(qweight, scales, offsets, group_size, in_features, dtype):
    return qweight.new_empty((qweight.shape[1], in_features), dtype=dtype)


@torch.library.custom_op("gq::bcq_matmul", mutates_args=())
def bcq_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor,
               group_size: int, in_features: int) -> torch.Tensor:
    """``x @ W_hat.T`` for x [..., in_features]; returns [..., N] in x's dtype."""
    path = choose_path("bcq", x, group_size)
    if path == "reference":
        return bcq_ref.matmul(x, qweight, scales, offsets, group_size, in_features)
    if path == "dequant":
        return F.linear(x, bcq_dequantize(qweight, scales, offsets, group_size, in_features, x.dtype))
    from kernels.bcq.triton_kernels import bcq_gemv

    return bcq_gemv(_rows(x), qweight, scales, offsets, group_size).reshape(*x.shape[:-1], qweight.shape[1])


@bcq_matmul.register_fake
def _(x, qweight, scales, offsets, group_size, in_features):
    return x.new_empty((*x.shape[:-1], qweight.shape[1]))
