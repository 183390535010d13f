"""Triton device helpers shared by the ``lut`` and ``bcq`` kernels."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def bf16_rounded_bits(v):
    """fp32 ``v`` -> its int32 bits with the top 16 rounded to nearest-even bf16 (low 16: garbage).

    Rounding with integer ops instead of a cast: the Triton interpreter truncates fp32 -> bf16 casts
    (the GPU rounds to nearest even), so doing it by hand gives the same bits on both, which is what
    lets the CPU tests check bit-exactness. Not for NaN (callers that can see one handle it).
    """
    bits = v.to(tl.int32, bitcast=True)
    return bits + (0x7FFF + ((bits >> 16) & 1))


@triton.jit
def cast_out(v, DTYPE: tl.constexpr):
    """fp32 -> DTYPE with round-to-nearest-even, the same bits compiled and interpreted. NaN stays NaN."""
    if DTYPE == tl.bfloat16:
        out = (bf16_rounded_bits(v) >> 16).to(tl.int16).to(tl.bfloat16, bitcast=True)
        return tl.where(v != v, v.to(tl.bfloat16), out)
    else:
        return v.to(DTYPE)


@triton.jit
def pick_column(tile, idx, E: tl.constexpr):
    """Column E of a [P, E'] tile whose last axis sits whole in one thread (``idx`` = arange(E')):
    a select + in-thread sum that the compiler folds away (no shuffles)."""
    return tl.sum(tl.where(idx[None, :] == E, tile, 0), axis=1)
