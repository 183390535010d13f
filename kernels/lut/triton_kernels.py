"""Triton kernels for the non-uniform ``lut`` format: bit-plane GEMV and dequantize.

Format (``kernels.packing``): ``qweight`` int32 [bits, N, KW = ceil(K/32)], plane ``b`` holds bit
``b`` of every code, input column ``c`` sits in word ``c // 32`` at bit ``c % 32``; ``codebook``
fp16 [N, 2^bits]. ``kernels.lut.reference`` is the specification: ``y = x @ W_hat.to(x.dtype).T``
with ``W_hat[r, c] = codebook[r, code[r, c]]``.

Design (Any-Precision LLM style; untuned: no GPU was available when this was written):
- GEMV (1..16 activation rows). One program owns ``BLOCK_N`` output rows and walks the whole input
  dimension in tiles of ``BLOCK_W`` words (32 * BLOCK_W columns). Per tile it loads ``bits`` plane
  tiles [BLOCK_N, BLOCK_W] (each row reads BLOCK_W consecutive int32, so loads are coalesced along
  the packed dimension), rebuilds the codes with shifts, looks each code up in its row's codebook
  with a pointer gather (the codebook tile is BLOCK_N * 2^bits fp16 and stays in L1), casts to the
  activation dtype (the rounding the reference applies to W_hat) and accumulates in fp32.
  One row: broadcast multiply + row sum on the CUDA cores. Two or more rows: ``tl.dot`` with the
  rows padded to 16 (tensor cores), so rows 2..16 cost about the same as 2.
  No split-K: every output element is written by exactly one program (no atomics, no zero-fill
  launch, deterministic); occupancy comes from small BLOCK_N and ``num_stages`` load pipelining.
- Dequantize: the same decode over a 2-D grid of tiles, storing W_hat in fp16/bf16/fp32, for
  prefill and large batches (dense matmul afterwards).
Per weight the decode costs ~3 integer ops per bit plane, one L1 gather and one FMA; at 2-3 bits
that is more than a memory-bound GEMV can hide on an H100, so the first things to tune on the GPU
are BLOCK_N/BLOCK_W/num_warps in ``_gemv_config`` and the code rebuild (decode 8 codes per word
with SWAR tricks), in that order; ``benchmarks/kernels.py`` measures it.

Only plain portable Triton (no inline PTX, no Hopper-only features): sm_80 and newer.
The wrappers run on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1`` (tests).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.packing import packed_words

SUPPORTED_BITS = (2, 3, 4, 8)
MAX_GEMV_ROWS = 16
_ACT_DTYPES = (torch.float16, torch.bfloat16)
_DEQUANT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _decode_tile(qweight_ptr, codebook_ptr, rows, word0, N, KW,
                 BITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr):
    """Codebook values fp16 [BLOCK_N, BLOCK_W * 32] of ``rows`` for columns 32*word0 ...

    Rows >= N and words >= KW read code 0 of row 0's codebook slot range (masked to 0.0).
    """
    words = word0 + tl.arange(0, BLOCK_W)
    row_ok = rows < N
    mask = row_ok[:, None] & (words < KW)[None, :]
    offs = rows[:, None] * KW + words[None, :]
    bit_pos = tl.arange(0, 32)
    codes = tl.zeros((BLOCK_N, BLOCK_W, 32), dtype=tl.int32)
    for b in tl.static_range(BITS):
        plane = tl.load(qweight_ptr + b * N * KW + offs, mask=mask, other=0)
        # Arithmetic shift of a negative word still leaves bit j in position 0.
        codes |= ((plane[:, :, None] >> bit_pos[None, None, :]) & 1) << b
    codes = tl.reshape(codes, (BLOCK_N, BLOCK_W * 32))
    return tl.load(codebook_ptr + rows[:, None] * (1 << BITS) + codes, mask=row_ok[:, None], other=0.0)


@triton.jit
def _lut_gemv_kernel(x_ptr, qweight_ptr, codebook_ptr, out_ptr, M, N, K, KW, stride_xm, stride_om,
                     BITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_W: tl.constexpr, USE_DOT: tl.constexpr):
    BLOCK_K: tl.constexpr = BLOCK_W * 32
    act = x_ptr.dtype.element_ty
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    ms = tl.arange(0, BLOCK_M)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for word0 in range(0, KW, BLOCK_W):
        # Cast to the activation dtype first: the reference multiplies x by W_hat.to(x.dtype).
        w = _decode_tile(qweight_ptr, codebook_ptr, rows, word0, N, KW, BITS, BLOCK_N, BLOCK_W).to(act)
        cols = word0 * 32 + tl.arange(0, BLOCK_K)
        xt = tl.load(x_ptr + ms[:, None] * stride_xm + cols[None, :],
                     mask=(ms < M)[:, None] & (cols < K)[None, :], other=0.0)
        if USE_DOT:
            acc += tl.dot(xt, tl.trans(w))
        else:
            acc += tl.sum(xt.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
    tl.store(out_ptr + ms[:, None] * stride_om + rows[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=(ms < M)[:, None] & (rows < N)[None, :])


@triton.jit
def _lut_dequant_kernel(qweight_ptr, codebook_ptr, out_ptr, N, K, KW,
                        BITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr):
    BLOCK_K: tl.constexpr = BLOCK_W * 32
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    word0 = tl.program_id(1) * BLOCK_W
    w = _decode_tile(qweight_ptr, codebook_ptr, rows, word0, N, KW, BITS, BLOCK_N, BLOCK_W)
    cols = word0 * 32 + tl.arange(0, BLOCK_K)
    tl.store(out_ptr + rows[:, None] * K + cols[None, :], w.to(out_ptr.dtype.element_ty),
             mask=(rows < N)[:, None] & (cols < K)[None, :])


def _gemv_config(m: int, n: int, k: int, bits: int) -> dict:
    """Tile sizes for the GEMV. A table, not autotuning: deterministic and CUDA-graph friendly.

    One row: 16 output rows x 512 columns per step (8K weights, 64 per thread at 4 warps).
    Several rows: tl.dot needs every dimension >= 16; 32 rows x 128 columns keeps the decoded
    fp16 tile (and the registers for it) the same size as the one-row case.
    """
    if m == 1:
        return dict(BLOCK_M=1, BLOCK_N=16, BLOCK_W=16, USE_DOT=False, num_warps=4, num_stages=3)
    return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_W=4, USE_DOT=True, num_warps=4, num_stages=3)


def _check_packed(qweight: torch.Tensor, codebook: torch.Tensor, in_features: int) -> int:
    """Validate the packed tensors; return bits."""
    if qweight.dtype != torch.int32 or qweight.dim() != 3 or not qweight.is_contiguous():
        raise ValueError(f"lut kernel: qweight must be contiguous int32 [bits, out, words], "
                         f"got {qweight.dtype} {tuple(qweight.shape)}")
    bits, n, kw = qweight.shape
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"lut kernel: bits must be one of {SUPPORTED_BITS}, got {bits}")
    if kw != packed_words(in_features):
        raise ValueError(f"lut kernel: qweight has {kw} words per row; in_features={in_features} "
                         f"needs {packed_words(in_features)}")
    if codebook.dtype != torch.float16 or tuple(codebook.shape) != (n, 1 << bits) or not codebook.is_contiguous():
        raise ValueError(f"lut kernel: codebook must be contiguous float16 [{n}, {1 << bits}], "
                         f"got {codebook.dtype} {tuple(codebook.shape)}")
    if codebook.device != qweight.device:
        raise ValueError(f"lut kernel: qweight on {qweight.device} but codebook on {codebook.device}")
    return bits


def lut_gemv(x: torch.Tensor, qweight: torch.Tensor, codebook: torch.Tensor,
             out: torch.Tensor | None = None) -> torch.Tensor:
    """``y = x @ W_hat.T`` for a few activation rows.

    Args:
        x: fp16 or bf16 [M, K], 1 <= M <= 16, rows contiguous (stride(1) == 1).
        qweight: int32 [bits, N, ceil(K / 32)]; codebook: fp16 [N, 2^bits]; same device as x.
        out: optional [M, N] in x's dtype to write into (tests pass it poisoned).
    Returns:
        [M, N] in x's dtype (fp32 accumulation).
    """
    if x.dim() != 2 or x.dtype not in _ACT_DTYPES or x.stride(1) != 1:
        raise ValueError(f"lut_gemv: x must be fp16/bf16 [M, K] with contiguous rows, got {x.dtype} "
                         f"{tuple(x.shape)} strides {x.stride()}")
    m, k = x.shape
    if not 1 <= m <= MAX_GEMV_ROWS:
        raise ValueError(f"lut_gemv: serves 1..{MAX_GEMV_ROWS} rows, got {m}; use lut_dequantize + a dense matmul")
    bits = _check_packed(qweight, codebook, k)
    if x.device != qweight.device:
        raise ValueError(f"lut_gemv: x on {x.device} but qweight on {qweight.device}")
    n, kw = qweight.shape[1], qweight.shape[2]
    if out is None:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    elif out.shape != (m, n) or out.dtype != x.dtype or out.stride(1) != 1:
        raise ValueError(f"lut_gemv: out must be {x.dtype} [{m}, {n}] with contiguous rows")
    cfg = _gemv_config(m, n, k, bits)
    grid = (triton.cdiv(n, cfg["BLOCK_N"]),)
    _lut_gemv_kernel[grid](x, qweight, codebook, out, m, n, k, kw, x.stride(0), out.stride(0), BITS=bits, **cfg)
    return out


def lut_dequantize(qweight: torch.Tensor, codebook: torch.Tensor, in_features: int,
                   dtype: torch.dtype = torch.float16, out: torch.Tensor | None = None) -> torch.Tensor:
    """W_hat [N, in_features] in ``dtype`` (fp16, bf16 or fp32), equal to the reference's cast."""
    if dtype not in _DEQUANT_DTYPES:
        raise ValueError(f"lut_dequantize: dtype must be one of {_DEQUANT_DTYPES}, got {dtype}")
    bits = _check_packed(qweight, codebook, in_features)
    n, kw = qweight.shape[1], qweight.shape[2]
    if out is None:
        out = torch.empty((n, in_features), dtype=dtype, device=qweight.device)
    elif out.shape != (n, in_features) or out.dtype != dtype or not out.is_contiguous():
        raise ValueError(f"lut_dequantize: out must be contiguous {dtype} [{n}, {in_features}]")
    block_n, block_w = 32, 4
    grid = (triton.cdiv(n, block_n), triton.cdiv(kw, block_w))
    _lut_dequant_kernel[grid](qweight, codebook, out, n, in_features, kw,
                              BITS=bits, BLOCK_N=block_n, BLOCK_W=block_w, num_warps=4)
    return out
