"""Reference (PyTorch) implementation of the uniform / binary-coded ``bcq`` format.

A ``bcq`` weight of shape [out, in] stores one unsigned code q in [0, 2^bits) per weight and, per
output channel and group of ``group_size`` consecutive inputs, a scale s and an offset o:
``w = s * q + o`` (computed in float32). Since q = sum_i 2^i b_i with bits b_i in {0, 1}, this is
the binary-coded form ``w = sum_i (s 2^(i-1)) (2 b_i - 1) + (o + s (2^bits - 1) / 2)`` that
LUT-GEMM kernels consume. This module is the specification the GPU kernels must reproduce.
"""
from __future__ import annotations

import torch

from gq_kernels.packing import pack_bitplanes, unpack_bitplanes

SUPPORTED_BITS = (2, 3, 4)


def expand_groups(per_group: torch.Tensor, in_features: int, group_size: int) -> torch.Tensor:
    """[out, n_groups] -> [out, in_features] float32, each group value repeated ``group_size`` times.

    ``group_size == -1`` means one group spanning the whole row (per-channel).
    """
    per_group = per_group.float()
    if group_size == -1:
        return per_group[:, :1].expand(-1, in_features)
    return per_group.repeat_interleave(group_size, dim=1)[:, :in_features]


def dequantize(codes: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor, group_size: int) -> torch.Tensor:
    """``w = s * q + o`` in float32.

    Args:
        codes: integer [out, in], values in [0, 2^bits).
        scales, offsets: float16 [out, n_groups], n_groups = ceil(in / group_size) (1 if group_size == -1).
        group_size: inputs per group, or -1 for one group per output channel.
    Returns:
        float32 [out, in].
    """
    in_features = codes.shape[1]
    s = expand_groups(scales, in_features, group_size)
    o = expand_groups(offsets, in_features, group_size)
    return codes.float() * s + o


def n_groups(in_features: int, group_size: int) -> int:
    """Scale / offset columns per row: 1 for per-channel (-1), else ceil(in_features / group_size)."""
    if group_size == -1:
        return 1
    if group_size < 1:
        raise ValueError(f"bcq: group_size must be -1 (per channel) or >= 1, got {group_size}")
    return (in_features + group_size - 1) // group_size


def unpack(qweight: torch.Tensor, in_features: int) -> torch.Tensor:
    """Packed bit planes int32 [bits, out, ceil(in/32)] -> codes uint8 [out, in] (see kernels.packing)."""
    return unpack_bitplanes(qweight, in_features)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes uint8 [out, in] -> packed bit planes int32 [bits, out, ceil(in/32)] (see kernels.packing)."""
    return pack_bitplanes(codes, bits)


def dequantize_packed(
    qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor, group_size: int, in_features: int
) -> torch.Tensor:
    """W_hat float32 [out, in] straight from the checkpoint tensors (qweight int32, scales/offsets fp16)."""
    want = (qweight.shape[1], n_groups(in_features, group_size))
    for name, t in (("scales", scales), ("offsets", offsets)):
        if tuple(t.shape) != want:
            raise ValueError(
                f"bcq: {name} must be [out, n_groups]={list(want)} for qweight {tuple(qweight.shape)} "
                f"and group_size={group_size}, got {tuple(t.shape)}"
            )
    return dequantize(unpack(qweight, in_features), scales, offsets, group_size)


def matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    offsets: torch.Tensor,
    group_size: int,
    in_features: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference ``y = x @ W_hat.T (+ bias)``: dequantize, cast W_hat to x's dtype, dense matmul.

    Args:
        x: float [..., in_features].
        qweight: int32 [bits, out, ceil(in_features / 32)].
        scales, offsets: float16 [out, n_groups(in_features, group_size)].
        bias: optional [out].
    Returns:
        [..., out] in x's dtype. This is the CPU path GPU kernels are checked against.
    """
    w = dequantize_packed(qweight, scales, offsets, group_size, in_features).to(x.dtype)
    return torch.nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype))
