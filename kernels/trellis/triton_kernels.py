"""Triton kernels for the ``trellis`` format: decode-and-multiply GEMV (1..8 activation rows) and
dequantize (prefill), both decoding the trellis states on the fly.

Format (:mod:`.reference` is the specification): ``trellis`` int16 [(m/16)(n/16), 16 BITS], one
circular bitstream of 256 BITS bits per 16x16 tile; state t of a tile is the 16-bit window at bit
offset t * KV (KV = BITS * V) and holds values t*V .. t*V+V-1 of the tile in row-major order.

Both kernels work in the rotated basis and in code units: they compute ``x~ @ W_code^T`` (GEMV) or
W_code (dequantize); the input transform ``x~ = (x * SU) R_n``, the output transform ``R_m^T`` and
``SV * Wscale`` are applied around them by :mod:`.ops`.

Decode of one weight (position p = 16 r + c of tile T): state index p // V, bit offset o = (p // V) KV,
word w = o // 16 and the next word (wrapping inside the tile: tail-biting), window
``((u[w] << 16 | u[w + 1]) >> (16 - o % 16)) & 0xFFFF`` (int32 arithmetic: the sign bits that an
arithmetic shift brings in never reach the 16 kept bits), then the code:
``hyb``: h = s (s + 1) mod 2^32, v = tlut[(h >> 6) & 511][p % 2], the first component negated when
bit 15 of h is set; ``1mad``: byte sum of 34038481 s + 76625530; ``3inst``: two fp16 halves of
(89226354 s + 64248484) & 0x8FFF8FFF ^ 0x3B603B60 added in fp16.

GEMV: program = 16 output rows (one row of tiles) x one of SPLIT column ranges; per step it decodes
a [16, 16 TPI] block (TPI tiles side by side) and accumulates ``x~[:, cols] * w`` for BLOCK_M <= 8
rows of x element-wise in fp32 registers ([BLOCK_M, 16, 16 TPI]: no cross-lane reduction inside
the loop, one after it); partial sums [SPLIT, M, m] are added in a fixed order afterwards
(deterministic).

Hadamard transform (``_rht_kernel``): one program per row (and output block), the [K, P] view in
registers, log2(P) butterfly stages by reshape/split/join, the K x K mix as one fp32 tl.dot (an
in-register product when P < 16); used for the input and output transforms around both kernels.

Only plain portable Triton (no inline PTX, no Hopper-only features): sm_80 and newer. The wrappers
run on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1`` (tests).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

CODE_IDS = {"hyb": 0, "1mad": 1, "3inst": 2}


@triton.jit
def _decode_block(words_ptr, tlut_ptr, row_tile, ct0, NT, BITS: tl.constexpr, V: tl.constexpr,
                  CODE: tl.constexpr, TPI: tl.constexpr):
    """Decoded values [16, 16 * TPI] (fp32) of tiles (row_tile, ct0 .. ct0 + TPI - 1); V=1 codes."""
    KV: tl.constexpr = BITS * V
    W: tl.constexpr = 16 * BITS
    r = tl.arange(0, 16)[:, None]
    j = tl.arange(0, 16 * TPI)[None, :]
    tile = row_tile * NT + ct0 + j // 16
    p = 16 * r + j % 16
    off = (p // V) * KV
    w0 = off // 16
    sh = off % 16
    w1 = (w0 + 1) % W
    base = words_ptr + tile.to(tl.int64) * W
    a = tl.load(base + w0).to(tl.int32) & 0xFFFF
    b = tl.load(base + w1).to(tl.int32) & 0xFFFF
    s = (((a << 16) | b) >> (16 - sh)) & 0xFFFF
    if CODE == 1:
        x = s * 34038481 + 76625530
        bsum = (x & 255) + ((x >> 8) & 255) + ((x >> 16) & 255) + ((x >> 24) & 255)
        v = (bsum - 510).to(tl.float32) / 147.800537109375
    else:
        x = s * 89226354 + 64248484
        y = (x & -1879076865) ^ 996162400  # 0x8FFF8FFF, 0x3B603B60 as int32
        hi = ((y >> 16) & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True)
        lo = (y & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True)
        v = (hi + lo).to(tl.float32)
    return v


@triton.jit
def _decode_pairs_hyb(words_ptr, tlut32_ptr, row_tile, ct0, NT, BITS: tl.constexpr, TPI: tl.constexpr):
    """HYB (V=2): the two values [16, 8 * TPI] each (columns 2q and 2q + 1 of state q) of tiles
    (row_tile, ct0 ..): one window, one product and one 32-bit LUT load per state; the first value's
    sign flipped with an XOR of its fp16 sign bit."""
    KV: tl.constexpr = 2 * BITS
    W: tl.constexpr = 16 * BITS
    r = tl.arange(0, 16)[:, None]
    j = tl.arange(0, 8 * TPI)[None, :]
    tile = row_tile * NT + ct0 + j // 8
    off = (8 * r + j % 8) * KV
    w0 = off // 16
    sh = off % 16
    w1 = (w0 + 1) % W
    base = words_ptr + tile.to(tl.int64) * W
    a = tl.load(base + w0).to(tl.int32) & 0xFFFF
    b = tl.load(base + w1).to(tl.int32) & 0xFFFF
    s = (((a << 16) | b) >> (16 - sh)) & 0xFFFF
    h = s * (s + 1)
    pair = tl.load(tlut32_ptr + ((h >> 6) & 511))  # int32: fp16 value 0 in the low half, value 1 high
    lo = (pair & 0xFFFF) ^ (h & 0x8000)
    v0 = lo.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    v1 = ((pair >> 16) & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    return v0, v1


@triton.jit
def _trellis_gemv_kernel(x_ptr, words_ptr, tlut_ptr, part_ptr, M, N_OUT, NT, TILES_PER_SPLIT,
                         BITS: tl.constexpr, V: tl.constexpr, CODE: tl.constexpr, TPI: tl.constexpr,
                         BLOCK_M: tl.constexpr):
    row_tile = tl.program_id(0)
    split = tl.program_id(1)
    K = NT * 16
    rm = tl.arange(0, BLOCK_M)
    cols = tl.arange(0, 16 * TPI)
    # Per-thread partial products; the cross-lane reduction happens once, after the loop.
    acc = tl.zeros((BLOCK_M, 16, 16 * TPI if CODE != 0 else 1), dtype=tl.float32)
    t_begin = split * TILES_PER_SPLIT
    t_end = tl.minimum(t_begin + TILES_PER_SPLIT, NT)
    if CODE == 0:
        acc2 = tl.zeros((BLOCK_M, 16, 8 * TPI), dtype=tl.float32)
        for ct0 in range(t_begin, t_end, TPI):
            v0, v1 = _decode_pairs_hyb(words_ptr, tlut_ptr, row_tile, ct0, NT, BITS, TPI)  # [16, 8 TPI] each
            c = ct0 * 16 + cols
            xv = tl.load(x_ptr + rm[:, None] * K + c[None, :], mask=rm[:, None] < M, other=0.0)
            xe, xo = tl.split(tl.reshape(xv, (BLOCK_M, 8 * TPI, 2)))
            acc2 += xe[:, None, :] * v0[None, :, :] + xo[:, None, :] * v1[None, :, :]
        res = tl.sum(acc2, axis=2)
    else:
        for ct0 in range(t_begin, t_end, TPI):
            w = _decode_block(words_ptr, tlut_ptr, row_tile, ct0, NT, BITS, V, CODE, TPI)  # [16, 16 TPI]
            c = ct0 * 16 + cols
            xv = tl.load(x_ptr + rm[:, None] * K + c[None, :], mask=rm[:, None] < M, other=0.0)
            acc += xv[:, None, :] * w[None, :, :]
        res = tl.sum(acc, axis=2)
    rows = row_tile * 16 + tl.arange(0, 16)
    out = part_ptr + split * M * N_OUT + rm[:, None] * N_OUT + rows[None, :]
    tl.store(out, res, mask=rm[:, None] < M)


@triton.jit
def _trellis_dequant_kernel(words_ptr, tlut_ptr, out_ptr, NT, BITS: tl.constexpr, V: tl.constexpr,
                            CODE: tl.constexpr, TPI: tl.constexpr):
    row_tile = tl.program_id(0)
    ct0 = tl.program_id(1) * TPI
    r = row_tile * 16 + tl.arange(0, 16)[:, None]
    if CODE == 0:
        v0, v1 = _decode_pairs_hyb(words_ptr, tlut_ptr, row_tile, ct0, NT, BITS, TPI)
        c = ct0 * 16 + 2 * tl.arange(0, 8 * TPI)[None, :]
        ptr = out_ptr + r.to(tl.int64) * (NT * 16) + c
        tl.store(ptr, v0.to(out_ptr.dtype.element_ty))
        tl.store(ptr + 1, v1.to(out_ptr.dtype.element_ty))
    else:
        w = _decode_block(words_ptr, tlut_ptr, row_tile, ct0, NT, BITS, V, CODE, TPI)
        c = ct0 * 16 + tl.arange(0, 16 * TPI)[None, :]
        tl.store(out_ptr + r.to(tl.int64) * (NT * 16) + c, w.to(out_ptr.dtype.element_ty))


def _tpi(nt: int) -> int:
    for t in (4, 2, 1):
        if nt % t == 0:
            return t
    return 1


def _tlut_arg(tlut: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """HYB: the LUT as int32 [512] (one load per state: value 0 in the low half, little endian)."""
    if tlut is None or tlut.numel() == 0:
        return torch.zeros(1, dtype=torch.int32, device=like.device)
    return tlut.contiguous().view(torch.int32).reshape(-1)


def trellis_dequantize_code(trellis: torch.Tensor, tlut: torch.Tensor | None, m: int, n: int, bits: int, code: str,
                            dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """W_code [m, n] (rotated basis, code units) in ``dtype``: equals reference.decode_weight exactly
    in fp32 (every code value is computed exactly as the reference does)."""
    V = 2 if code == "hyb" else 1
    nt = n // 16
    tpi = _tpi(nt)
    out = torch.empty(m, n, dtype=dtype, device=trellis.device)
    _trellis_dequant_kernel[(m // 16, nt // tpi)](trellis, _tlut_arg(tlut, trellis), out, nt, BITS=bits, V=V,
                                                   CODE=CODE_IDS[code], TPI=tpi)
    return out


def _splits(m: int, nt: int, tpi: int) -> int:
    """Column ranges per row of tiles: enough programs to fill a GPU (~4 per SM of a large card)."""
    want = max(1, 512 // max(1, m // 16))
    return max(1, min(want, nt // tpi))


def trellis_gemv_code(x_rot: torch.Tensor, trellis: torch.Tensor, tlut: torch.Tensor | None, m: int, bits: int,
                      code: str) -> torch.Tensor:
    """``x~ @ W_code^T`` for x~ fp32 [M, n], 1 <= M <= 8: fp32 [M, m]."""
    M, n = x_rot.shape
    if not 1 <= M <= 8:
        raise ValueError(f"the trellis GEMV serves 1..8 rows, got {M}")
    V = 2 if code == "hyb" else 1
    nt = n // 16
    tpi = _tpi(nt)
    split = _splits(m, nt, tpi)
    tiles_per_split = -(-(nt // tpi) // split) * tpi
    split = -(-nt // tiles_per_split)
    part = torch.empty(split, M, m, dtype=torch.float32, device=x_rot.device)
    block_m = 1 if M == 1 else (2 if M == 2 else (4 if M <= 4 else 8))
    _trellis_gemv_kernel[(m // 16, split)](x_rot.contiguous(), trellis, _tlut_arg(tlut, trellis), part, M, m, nt,
                                           tiles_per_split, BITS=bits, V=V, CODE=CODE_IDS[code], TPI=tpi,
                                           BLOCK_M=block_m)
    return part.sum(0) if split > 1 else part[0]


# ================================================================================ Hadamard transform
@triton.jit
def _rht_kernel(x_ptr, hk_ptr, out_ptr, NB, SCALE, K: tl.constexpr, KP: tl.constexpr, P: tl.constexpr,
                LOGP: tl.constexpr, TRANSPOSE: tl.constexpr):
    """One (row, block) of ``x @ R_nb`` (``x @ R_nb^T``): x viewed as [K, P] (index a P + b), a fast
    Walsh-Hadamard transform over P by LOGP butterfly stages on a [KP, P] register tile (rows past K
    masked), then the K axis mixed by H_K^T (H_K) with one fp32 tl.dot (K padded to KP >= 16)."""
    pid = tl.program_id(0)
    base = pid.to(tl.int64) * NB
    rk = tl.arange(0, KP)[:, None]
    cp = tl.arange(0, P)[None, :]
    mask = rk < K
    x = tl.load(x_ptr + base + rk * P + cp, mask=mask, other=0.0).to(tl.float32)
    for lv in tl.static_range(LOGP):
        y = tl.reshape(x, (KP, P // (2 << lv), 2, 1 << lv))
        y = tl.permute(y, (0, 1, 3, 2))
        a, b = tl.split(y)
        y = tl.join(a + b, a - b)
        y = tl.permute(y, (0, 1, 3, 2))
        x = tl.reshape(y, (KP, P))
    if K > 1:
        i = tl.arange(0, KP)[:, None]
        j = tl.arange(0, KP)[None, :]
        hm = (i < K) & (j < K)
        if TRANSPOSE:  # out[a] = sum_b H_K[a, b] in[b]
            hk = tl.load(hk_ptr + i * K + j, mask=hm, other=0.0)
        else:  # out[a] = sum_b H_K[b, a] in[b]
            hk = tl.load(hk_ptr + j * K + i, mask=hm, other=0.0)
        if P >= 16:
            x = tl.dot(hk, x, input_precision="ieee")
        else:  # tl.dot needs every side >= 16: a broadcast product and an in-register sum instead
            x = tl.sum(hk[:, :, None] * x[None, :, :], axis=1)
    tl.store(out_ptr + base + rk * P + cp, x * SCALE, mask=mask)


def hadamard_transform_triton(x: torch.Tensor, transpose: bool = False, blocks: int = 1) -> torch.Tensor:
    """:func:`gq_kernels.hadamard.hadamard_transform` as one Triton launch (fp32 out), for
    x [..., n] on CUDA (or the CPU under TRITON_INTERPRET=1)."""
    from gq_kernels.hadamard import hadamard_factor, hadamard_k

    n = x.shape[-1]
    nb = n // blocks
    K, P = hadamard_factor(nb)
    KP = 1 if K == 1 else max(16, triton.next_power_of_2(K))
    xc = x.reshape(-1, n).float().contiguous()
    out = torch.empty_like(xc)
    hk = hadamard_k(K, torch.float32, xc.device) if K > 1 else xc.new_zeros(1)
    _rht_kernel[(xc.shape[0] * blocks,)](xc, hk, out, nb, nb ** -0.5, K=K, KP=KP, P=P, LOGP=P.bit_length() - 1,
                                         TRANSPOSE=transpose, num_warps=4 if KP * P <= 4096 else 8)
    return out.reshape(x.shape)
