"""Reference (PyTorch) implementation of the non-uniform ``lut`` format.

A ``lut`` weight of shape [out, in] is a per-output-channel codebook of 2^bits values plus one
code per weight. This module is the specification that the GPU kernels must reproduce.
"""
from __future__ import annotations

import torch

from gq_kernels.packing import pack_bitplanes, unpack_bitplanes

SUPPORTED_BITS = (2, 3, 4, 8)


def dequantize(codes: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Look every code up in its row's codebook.

    Args:
        codes: integer [out, in], values in [0, 2^bits).
        codebook: float16 (or any float) [out, 2^bits].
    Returns:
        float32 [out, in]: ``codebook[r, codes[r, c]]`` exactly (fp16 -> fp32 is exact).
    """
    return torch.gather(codebook.float(), 1, codes.long())


def unpack(qweight: torch.Tensor, in_features: int) -> torch.Tensor:
    """Packed bit planes int32 [bits, out, ceil(in/32)] -> codes uint8 [out, in] (see kernels.packing)."""
    return unpack_bitplanes(qweight, in_features)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes uint8 [out, in] -> packed bit planes int32 [bits, out, ceil(in/32)] (see kernels.packing)."""
    return pack_bitplanes(codes, bits)


def dequantize_packed(qweight: torch.Tensor, codebook: torch.Tensor, in_features: int) -> torch.Tensor:
    """W_hat float32 [out, in] straight from the checkpoint tensors (qweight int32, codebook fp16)."""
    bits = qweight.shape[0]
    if codebook.shape != (qweight.shape[1], 1 << bits):
        raise ValueError(
            f"lut: codebook must be [out={qweight.shape[1]}, 2^bits={1 << bits}] for qweight "
            f"{tuple(qweight.shape)}, got {tuple(codebook.shape)}"
        )
    return dequantize(unpack(qweight, in_features), codebook)


def matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    codebook: torch.Tensor,
    in_features: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference ``y = x @ W_hat.T (+ bias)``: dequantize, cast W_hat to x's dtype, dense matmul.

    Args:
        x: float [..., in_features].
        qweight: int32 [bits, out, ceil(in_features / 32)].
        codebook: float16 [out, 2^bits].
        bias: optional [out].
    Returns:
        [..., out] in x's dtype. This is the CPU path GPU kernels are checked against.
    """
    w = dequantize_packed(qweight, codebook, in_features).to(x.dtype)
    return torch.nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype))
