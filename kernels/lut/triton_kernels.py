"""Triton kernels for the non-uniform ``lut`` format: bit-plane GEMV and dequantize.

Format (``kernels.packing``): ``qweight`` int32 [bits, N, KW = ceil(K/32)], plane ``b`` holds bit
``b`` of every code, input column ``c`` sits in word ``c // 32`` at bit ``c % 32``; ``codebook``
fp16 [N, 2^bits]. ``kernels.lut.reference`` is the specification: ``y = x @ W_hat.to(x.dtype).T``
with ``W_hat[r, c] = codebook[r, code[r, c]]``.

GEMV design, 1..4 rows of x: one output row per warp, lanes along K
------------------------------------------------------------------
Why not one row per *thread* (the ``kernels.bcq`` mapping): a codebook gather per weight then sends
the 32 lanes of a warp to 32 different rows' codebooks, ~32 L1 wavefronts per gather instruction
(L1 serves ~1 per clock and SM), i.e. ~1 weight per clock and SM: hopeless. bcq avoids it because
its lanes share one x-table chunk; a lut codebook is per row. Here a warp owns ONE row, so every
gather of the warp lands in that row's 2^bits fp32 entries (one 64 B line at <= 4 bits: one
wavefront per 32 weights), and the lanes split K.

1. ``_lut_prep_kernel`` (one small launch) writes x in fp32, zero padded and permuted into the
   order the GEMV reads it (each lane's next 4 columns, or 1 column x BLOCK_M rows, are one 16 B
   vector and a warp reads 512 consecutive bytes), and, at <= 4 bits, the codebook in fp32 after
   rounding it to x's dtype (the reference's ``W_hat.to(x.dtype)``; bf16 by integer
   round-to-nearest-even, which the interpreter reproduces). At 8 bits the fp16 codebook (bf16:
   ``codebook.to(bf16)``) is gathered directly and widened in the kernel: 256 fp32 entries per row
   would cost real traffic.
2. ``_lut_gemv_kernel``: program = BLOCK_R = num_warps rows x BLOCK_M rows of x; per chunk of
   32 * NL * BW words (NL = 32 lanes, BW = 1..4 consecutive words per lane, one vector load per
   plane; ``_gemv_config`` picks BW so that padding K wastes <= ~3%, e.g. K = 11008 -> BW = 1),
   each lane rebuilds codes SWAR style: plane b of a word gives ``(plane >> t) & 0x11111111``
   shifted to bit b, OR-ed into code word t (t = 0..3), so nibble i of code word t is the code of
   column 4i + t (~0.25 instructions per plane and weight; 8 bits use a second set of code words
   for planes 4..7). Per weight: nibble shift/mask, 64-bit gather address (LEA + LEA.HI.X), LDG
   (L1 hit), FFMA per x row; x arrives as 16 B vectors (0.25 LDG per weight at M = 1) whose
   elements are picked with a select that folds away (``pick_column``). Lanes keep private fp32 sums;
   one cross-lane reduction per row at the end. Padding columns (past K, up to the chunk) read
   code 0 and x = 0, adding ``codebook[r, 0] * 0`` (so a non-finite code-0 entry would leak NaN
   into its row; quantizers never produce one). No split-K: one row per warp is already N warps
   (4096..22016), every output is written once (rows past N are clamped for loads, masked for the
   store), deterministic. The (warp, lane) pairs are one flat axis of BLOCK_R * 32 slots, never a
   [rows, lanes] pair: a gather address has no contiguity along either, so which one got the
   threads was Triton's tie-breaking, and 3.6 broke the tie the other way (4 rows x 8 lanes per
   warp, a shared-memory layout conversion in the K loop). Flat, every load's layout follows from
   real contiguity (words and x elements along the minor axis of [slots, BW] / [slots, VE]).
   GEMV, 5..16 rows of x: ``_lut_gemv_dot_kernel`` (the earlier design): decode a
   [BLOCK_N, 32 * BLOCK_W] tile, ``tl.dot`` with x padded to 16 rows (tensor cores); its decode
   is shuffle-heavy (~15-22 instructions per weight) but shared by all x rows, which from 5 rows
   on beats repeating the lane kernel per 4 rows.

Static instruction counts per weight (offline sm_90 SASS, ``benchmarks/kernel_sass.py``) and the
issue budget they are compared with are in docs/results.md, "Static instruction counts". Per
weight at batch 1 the loop spends a nibble shift, a 64-bit gather address (two LEA), a gather
and an FFMA. What would remove most of that, none of it expressible in portable Triton: a register
codebook (the row's 4..16 values packed in registers and selected with PRMT byte permutes via
inline PTX) drops the address and the gather; a 32-bit shared-memory address instead of a 64-bit
global one drops one LEA. Multilinear x-tables (bcq-style 4-column partial sums, 3 lookups per 4
columns at 2 bits) need one row per thread and would only pay at 2 bits.

Dequantize: the decode over a 2-D grid of tiles, storing W_hat in fp16/bf16/fp32, for prefill and
large batches (dense matmul afterwards); bit-exact with the reference.

Only plain portable Triton (no inline PTX, no Hopper-only features): sm_80 and newer.
The wrappers run on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1`` (tests).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from gq_kernels.packing import packed_words
from gq_kernels.triton_common import bf16_rounded_bits, cast_out, pick_column

SUPPORTED_BITS = (2, 3, 4, 8)
MAX_GEMV_ROWS = 16
_ACT_DTYPES = (torch.float16, torch.bfloat16)
_DEQUANT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_PREP_BLOCK = 1024


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
def _lut_prep_kernel(x_ptr, cb_ptr, xf_ptr, cbf_ptr, M, K, stride_xm, n_x, n_cb,
                     NCH: tl.constexpr, NL: tl.constexpr, BW: tl.constexpr, BLOCK_M: tl.constexpr,
                     PREP_CB: tl.constexpr, ROUND_BF16: tl.constexpr, BLOCK: tl.constexpr):
    """x -> fp32 in the GEMV's read order (zero padded); codebook -> fp32 rounded to x's dtype.

    ``xf[mb, ch, w, t, iq, L, e]`` (flat) holds x[m, c] for column
    ``c = 32 * ((ch * NL + L) * BW + w) + 4 * i + t`` with slot ``i = 4 * iq + e``, ``m = mb`` when
    BLOCK_M == 1, else ``i = iq``, ``m = mb * BLOCK_M + e``: the 4 (or BLOCK_M) values a lane needs
    at once are one 16-byte vector and the 32 lanes of a warp read 512 consecutive bytes.
    ``cbf = codebook`` rounded to bf16 when ROUND_BF16 (integer round-to-nearest-even: the
    interpreter truncates casts to bf16), kept in fp32 so the GEMV gathers need no conversion.
    """
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    VE: tl.constexpr = 4 if BLOCK_M == 1 else BLOCK_M
    NIQ: tl.constexpr = 2 if BLOCK_M == 1 else 8
    e = offs % VE
    r = offs // VE
    lane = r % NL
    r = r // NL
    iq = r % NIQ
    r = r // NIQ
    t = r % 4
    r = r // 4
    w = r % BW
    r = r // BW
    ch = r % NCH
    mb = r // NCH
    if BLOCK_M == 1:
        slot = iq * 4 + e
        m = mb
    else:
        slot = iq
        m = mb * BLOCK_M + e
    col = 32 * ((ch * NL + lane) * BW + w) + 4 * slot + t
    ok = (offs < n_x) & (m < M) & (col < K)
    xv = tl.load(x_ptr + m * stride_xm + col, mask=ok, other=0.0).to(tl.float32)
    tl.store(xf_ptr + offs, xv, mask=offs < n_x)
    if PREP_CB:
        c = tl.load(cb_ptr + offs, mask=offs < n_cb, other=0.0).to(tl.float32)
        if ROUND_BF16:
            c = (bf16_rounded_bits(c) & -65536).to(tl.float32, bitcast=True)
        tl.store(cbf_ptr + offs, c, mask=offs < n_cb)


@triton.jit
def _nibble_codes(codes, plane, B: tl.constexpr):
    """Merge bit-plane B into 4 SWAR code words: bit 4i + t of ``plane`` -> bit 4i + (B % 4) of
    ``codes[t]``, i.e. nibble i of code word t is the code of column 4i + t of the 32-column word.
    One shift + one mask-or per plane and code word (8 codes). Arithmetic shifts are harmless: the
    mask keeps bits that came from inside the word."""
    c0, c1, c2, c3 = codes
    SH: tl.constexpr = B % 4
    c0 |= (plane & 0x11111111) << SH
    c1 |= ((plane >> 1) & 0x11111111) << SH
    c2 |= ((plane >> 2) & 0x11111111) << SH
    c3 |= ((plane >> 3) & 0x11111111) << SH
    return c0, c1, c2, c3


@triton.jit
def _lut_gemv_kernel(xf_ptr, q_ptr, cb_ptr, y_ptr, M, N, stride_ym,
                     KW: tl.constexpr, BITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
                     NL: tl.constexpr, BW: tl.constexpr, NCH: tl.constexpr):
    """y[m, r] = sum_c x[m, c] * cb[r, code[r, c]] (see the module docstring).

    xf_ptr: fp32 x in the order ``_lut_prep_kernel`` writes; q_ptr: int32 [BITS, N, KW];
    cb_ptr: [N, 2^BITS] fp32 (or fp16 / bf16 at 8 bits), already in x's rounding; y_ptr: x's dtype.
    Grid: (cdiv(M, BLOCK_M), cdiv(N, BLOCK_R)). Program = BLOCK_R output rows, one per warp; lane L
    owns words (ch * NL + L) * BW .. + BW - 1 of its row in chunk ch.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    NC: tl.constexpr = 1 << BITS
    VE: tl.constexpr = 4 if BLOCK_M == 1 else BLOCK_M  # fp32 x values per lane and vector load
    NIQ: tl.constexpr = 2 if BLOCK_M == 1 else 8  # x vectors per code word
    LO: tl.constexpr = 4 if BITS > 4 else BITS
    # One flat axis of P = BLOCK_R * NL (warp, lane) slots instead of a [BLOCK_R, NL] pair: a
    # gather's address has no contiguity along rows or lanes, and which of two such axes gets the
    # threads is tie-breaking that differs between Triton versions (3.6 put 4 rows in a warp and
    # converted through shared memory every step). Flat, every layout follows from contiguity.
    P: tl.constexpr = BLOCK_R * NL
    slot = tl.arange(0, P)
    lane = slot % NL
    rows_c = tl.minimum(pid_n * BLOCK_R + slot // NL, N - 1)  # clamped: loads stay in bounds
    w_lane = tl.arange(0, BW)
    e_lane = tl.arange(0, VE)
    # [P, BW]: each lane reads BW consecutive words of its row (one vector per plane).
    word_in_chunk = (lane * BW)[:, None] + w_lane[None, :]
    q_ptrs = q_ptr + (rows_c * KW)[:, None] + word_in_chunk
    plane_stride = N * KW
    # [P, VE]: x does not depend on the row; lanes read consecutive 16 B vectors.
    x_ptrs = xf_ptr + pid_m * (NCH * BW * 4 * NIQ * NL * VE) + (lane * VE)[:, None] + e_lane[None, :]
    cb_rows = cb_ptr + rows_c * NC  # [P]: a warp gathers inside one row's codebook
    if BLOCK_M == 1:
        acc = tl.zeros((P,), dtype=tl.float32)
    else:
        acc = tl.zeros((P, VE), dtype=tl.float32)
    for ch in range(NCH):
        w_ok = (ch * (NL * BW) + word_in_chunk) < KW
        q_ch = q_ptrs + ch * (NL * BW)
        zero = tl.zeros((P, BW), dtype=tl.int32)
        lo = (zero, zero, zero, zero)
        for b in tl.static_range(LO):
            lo = _nibble_codes(lo, tl.load(q_ch + b * plane_stride, mask=w_ok, other=0), b)
        hi = (zero, zero, zero, zero)
        if BITS > 4:
            for b in tl.static_range(4, BITS):
                hi = _nibble_codes(hi, tl.load(q_ch + b * plane_stride, mask=w_ok, other=0), b)
        for w in tl.static_range(BW):
            for t in tl.static_range(4):
                cw = pick_column(lo[t], w_lane, w)  # [P]
                if BITS > 4:
                    cw_hi = pick_column(hi[t], w_lane, w)
                for iq in tl.static_range(NIQ):
                    x_off = (((ch * BW + w) * 4 + t) * NIQ + iq) * (NL * VE)
                    xv = tl.load(x_ptrs + x_off)  # [P, VE] fp32
                    if BLOCK_M == 1:
                        xi = xv.to(tl.int32, bitcast=True)
                        for e in tl.static_range(4):
                            code = (cw >> (16 * iq + 4 * e)) & 15  # slot 4 iq + e
                            if BITS > 4:
                                code |= ((cw_hi >> (16 * iq + 4 * e)) & 15) << 4
                            wgt = tl.load(cb_rows + code).to(tl.float32)
                            acc += wgt * pick_column(xi, e_lane, e).to(tl.float32, bitcast=True)
                    else:
                        code = (cw >> (4 * iq)) & 15
                        if BITS > 4:
                            code |= ((cw_hi >> (4 * iq)) & 15) << 4
                        wgt = tl.load(cb_rows + code).to(tl.float32)
                        acc += wgt[:, None] * xv
    # The lanes' partial sums, once per row: [BR] or [BR, BLOCK_M].
    if BLOCK_M == 1:
        y = tl.sum(tl.reshape(acc, (BLOCK_R, NL)), axis=1)[:, None]
    else:
        y = tl.sum(tl.reshape(acc, (BLOCK_R, NL, VE)), axis=1)
    rows = pid_n * BLOCK_R + tl.arange(0, BLOCK_R)
    ms = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask = (rows < N)[:, None] & (ms < M)[None, :]
    tl.store(y_ptr + ms[None, :] * stride_ym + rows[:, None], cast_out(y, y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _lut_gemv_dot_kernel(x_ptr, qweight_ptr, codebook_ptr, out_ptr, M, N, K, KW, stride_xm, stride_om,
                         BITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_W: tl.constexpr):
    """5..16 rows of x: decode a [BLOCK_N, 32 * BLOCK_W] tile, tl.dot with x padded to 16 rows."""
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
        acc += tl.dot(xt, tl.trans(w))
    tl.store(out_ptr + ms[:, None] * stride_om + rows[None, :], cast_out(acc, out_ptr.dtype.element_ty),
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
    """Launch parameters of the GEMV for x [m, k] and an [n, k] weight; a table, not autotuning
    (deterministic and CUDA-graph friendly).

    Returns BLOCK_M (x rows per program: 1, 2 or 4, one 16 B vector of x per slot), BLOCK_R
    (output rows per program = num_warps, one per warp), NL (lanes along K = 32), BW (words per lane
    per chunk: 4 for 16 B plane loads unless padding K to a multiple of 32 * NL * BW would waste
    more than ~3%, e.g. K = 11008 -> 344 words -> BW = 1), num_warps, num_stages.
    No split-K: one row per warp already gives N warps (4096..22016 on Llama-2-7B).
    """
    if m > 4:
        # tl.dot on tensor cores, x padded to 16 rows: fewer instructions per weight and x row from
        # 5 rows on (see the module docstring's table).
        return dict(PATH="dot", BLOCK_M=16, BLOCK_N=32, BLOCK_W=4, num_warps=4, num_stages=3)
    kw = packed_words(k)
    block_m = 1 if m == 1 else (2 if m == 2 else 4)
    nl = 32
    bw = 1
    for cand in (4, 2):
        padded = -(-kw // (nl * cand)) * nl * cand
        if padded * 32 <= kw * 33:
            bw = cand
            break
    num_warps = 4
    return dict(PATH="lanes", BLOCK_M=block_m, BLOCK_R=num_warps, NL=nl, BW=bw, num_warps=num_warps,
                num_stages=1)


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
    if cfg["PATH"] == "dot":
        _lut_gemv_dot_kernel[(triton.cdiv(n, cfg["BLOCK_N"]),)](
            x, qweight, codebook, out, m, n, k, kw, x.stride(0), out.stride(0), BITS=bits,
            BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_W=cfg["BLOCK_W"],
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
        return out
    block_m, nl, bw = cfg["BLOCK_M"], cfg["NL"], cfg["BW"]
    nch = triton.cdiv(kw, nl * bw)
    n_mb = triton.cdiv(m, block_m)
    n_x = n_mb * nch * nl * bw * 32 * block_m
    xf = torch.empty(n_x, dtype=torch.float32, device=x.device)
    prep_cb = bits <= 4  # 8 bits: 256 fp32 entries per row would cost real traffic; convert in-kernel
    if prep_cb:
        cb = torch.empty((n, 1 << bits), dtype=torch.float32, device=x.device)
    else:
        cb = codebook if x.dtype == torch.float16 else codebook.to(x.dtype)  # torch rounds to nearest even
    n_cb = n * (1 << bits) if prep_cb else 0
    _lut_prep_kernel[(triton.cdiv(max(n_x, n_cb), _PREP_BLOCK),)](
        x, codebook, xf, cb, m, k, x.stride(0), n_x, n_cb, NCH=nch, NL=nl, BW=bw, BLOCK_M=block_m,
        PREP_CB=prep_cb, ROUND_BF16=x.dtype == torch.bfloat16, BLOCK=_PREP_BLOCK, num_warps=4)
    # The interpreter runs programs one after another and pays per op, not per element: give it
    # 256 rows per program (the result does not depend on BLOCK_R; compiled, it is one row per warp).
    block_r = 256 if x.device.type == "cpu" else cfg["BLOCK_R"]
    grid = (n_mb, triton.cdiv(n, block_r))
    _lut_gemv_kernel[grid](xf, qweight, cb, out, m, n, out.stride(0), KW=kw, BITS=bits, BLOCK_M=block_m,
                           BLOCK_R=block_r, NL=nl, BW=bw, NCH=nch,
                           num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
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
