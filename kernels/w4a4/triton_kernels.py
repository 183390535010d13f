"""Triton kernels of the ``w4a4`` format: activation quantization and the int8 x int4 -> int32 GEMM.

The specification is :mod:`.reference`; these kernels compute its exact identity

    y[t, n] = s_w[n] * sum_g s_x[t, g] * (acc_g[t, n] - z_x[t, g] * r[n, g]),
    acc_g[t, n] = sum_{k in g} q_x[t, k] q_w[n, k],   r[n, g] = sum_{k in g} q_w[n, k]

(with weight groups s_w[n, g] moves inside the sum; g then runs over the finer of the activation
and weight groups, the "GEMM groups", and each picks its activation and weight scale)

with an exact integer accumulator and an fp32 epilogue (the same arithmetic as
:func:`gq_kernels.w4a4.ops.quantized_matmul`; against the fake-quant reference only the order of
the float operations differs).

1. ``_w4a4_quant_kernel`` (grid: rows x activation groups): one program reads one (token, group)
   in chunks of up to 1024 columns, twice (min/max, then codes; the second pass hits L2), in
   fp16/bf16/fp32, and writes int8 codes ``q_x - SHIFT`` (SHIFT = 128 at 8 bits, where codes up to
   255 do not fit int8; 0 at 4 bits), the fp32 scale and the fp32 zero point (unshifted, as the
   reference returns it). Bit-exact with :func:`.reference.quantize_act`: the divisions are IEEE
   ``div.rn`` (``tl.math.div_rn``; Triton's ``/`` on fp32 is the approximate ``div.full``), and
   rounding is round-half-to-even like ``torch.round``, written with floor/compare/select so the
   compiled kernel and the interpreter agree (no ``libdevice.rint`` in the interpreter).
   FMA contraction is off for this kernel (``enable_fp_fusion=False``): ``hi - lo`` must round
   ``lo = min * clip`` first, as torch does, not fuse it into one FMA.
   Code rows are padded to a multiple of 16 bytes so every GEMM row load is aligned.
2. ``_w4a4_gemm_kernel`` (grid: output tiles, grouped along M for L2 reuse): a [BLOCK_M, BLOCK_K]
   int8 tile of activation codes and a [BLOCK_N, BLOCK_K / 2] uint8 tile of the checkpoint's
   packed ``qweight`` per step; the weights are unpacked in registers (low nibble = even column:
   ``(b << 4) >> 4`` and ``b >> 4`` as int8 arithmetic shifts, two's complement, joined and
   interleaved with ``tl.join`` + ``reshape``) and multiplied with ``tl.dot`` into int32 (IMMA
   int8 tensor cores, m16n8k32). The weight is read packed: no int8 copy is ever made. The
   epilogue is fused per activation group; three constexpr modes keep the K loop flat where they
   can, so the software pipeliner sees one loop:

   - ``MODE 0`` (per-token, one group): accumulate all of K in int32, epilogue once;
   - ``MODE 1`` (GEMM group == BLOCK_K, e.g. o_proj with head_dim 128 or 64): every K step is
     one group: ``y += s_x * (dot - z_x r)`` (times s_w[:, g] with weight groups) in fp32 each step;
   - ``MODE 2`` (GEMM group a multiple of BLOCK_K > BLOCK_K): an outer loop over groups and an
     inner K loop in int32, one fp32 partial per group.

   Then ``y *= s_w`` (without weight groups), ``+ bias``, stored in the activation dtype (bf16 by integer
   round-to-nearest-even, :func:`gq_kernels.triton_common.cast_out`). K steps never cross a
   group: BLOCK_K is the largest of 128 / 64 / 32 dividing the group size (a group size that is
   not a multiple of 32 is refused). Rows past M / N are clamped for loads (no masks in the loop)
   and masked at the store; columns past K (per-token mode with K % BLOCK_K != 0) are masked.

Block sizes (:func:`gemm_config`, a table, not autotuning: deterministic and CUDA-graph friendly):
BLOCK_M 16 / 32 / 64 / 128 by rows (decode pads to 16, the tensor-core minimum), BLOCK_N 32 at
<= 16 rows (4096 / 32 = 128 programs for a 132-SM H100/H200: decode is memory-bound and needs
every SM streaming weights), 64 at <= 64 rows, 128 above; 8 warps for 128 x 128 tiles, else 4;
3 stages. Exactness of the accumulator: |q_x q_w| <= 128 * 8 at 8-bit activations (shifted) and
K < 2^21 keeps int32 far from overflow; ``acc - z r`` is converted to fp32 exactly while it stays
below 2^24 (4-bit activations: 15 * 8 * K, K < 139,000).

Only portable Triton (no inline PTX): sm_80 and newer. The wrappers run on CUDA tensors, and on
CPU tensors under ``TRITON_INTERPRET=1`` (tests).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from gq_kernels.triton_common import cast_out

ACT_BITS = (4, 8)
_ACT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_QUANT_BLOCK = 1024
_ROW_ALIGN = 16  # code rows padded to 16 bytes: aligned vector loads in the GEMM


def _check_device(device: torch.device) -> None:
    if device.type == "cuda":
        return
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return
    raise ValueError(f"w4a4 triton: tensors on {device} need CUDA, or TRITON_INTERPRET=1 (set before importing "
                     "this module) to run in Triton's interpreter")


# --------------------------------------------------------------------------- activation quantization
@triton.jit
def _round_half_even(v):
    """``torch.round`` of fp32 v (round half to even), exact for |v| < 2^23 (every value here)."""
    f = tl.floor(v)
    d = v - f  # exact: f and v share the exponent range
    odd = (f - 2.0 * tl.floor(f * 0.5)) == 1.0
    up = (d > 0.5) | ((d == 0.5) & odd)
    return tl.where(up, f + 1.0, f)


@triton.jit
def _w4a4_quant_kernel(x_ptr, q_ptr, s_ptr, z_ptr, G, GS, stride_xm, stride_qm, clip,
                       MAXQ: tl.constexpr, SHIFT: tl.constexpr, BLOCK: tl.constexpr):
    """Codes of row ``program_id(0)``, group ``program_id(1)`` (GS columns from g * GS).

    lo = min(min x, 0) * clip, hi = max(max x, 0) * clip, s = (hi - lo) / MAXQ (1 where 0),
    z = round(-lo / s), q = clamp(round(x / s) + z, 0, MAXQ); stores q - SHIFT (int8), s, z.
    """
    m = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1)
    x_row = x_ptr + m * stride_xm + g * GS
    q_row = q_ptr + m * stride_qm + g * GS
    offs = tl.arange(0, BLOCK)
    # Starting from 0 is the reference's clamp of the range to hold 0 (and masked columns read 0).
    vmin = tl.zeros((BLOCK,), dtype=tl.float32)
    vmax = tl.zeros((BLOCK,), dtype=tl.float32)
    for k0 in range(0, GS, BLOCK):
        v = tl.load(x_row + k0 + offs, mask=k0 + offs < GS, other=0.0).to(tl.float32)
        vmin = tl.minimum(vmin, v)
        vmax = tl.maximum(vmax, v)
    lo = tl.min(vmin, axis=0) * clip
    hi = tl.max(vmax, axis=0) * clip
    s = tl.math.div_rn(hi - lo, tl.full((), MAXQ, tl.float32))
    s = tl.where(s > 0, s, 1.0)
    z = _round_half_even(tl.math.div_rn(-lo, s))
    for k0 in range(0, GS, BLOCK):
        mask = k0 + offs < GS
        v = tl.load(x_row + k0 + offs, mask=mask, other=0.0).to(tl.float32)
        q = _round_half_even(tl.math.div_rn(v, tl.broadcast_to(s, (BLOCK,)))) + z
        q = tl.minimum(tl.maximum(q, 0.0), MAXQ)
        tl.store(q_row + k0 + offs, (q.to(tl.int32) - SHIFT).to(tl.int8), mask=mask)
    tl.store(s_ptr + m * G + g, s)
    tl.store(z_ptr + m * G + g, z)


def quantize_act(x: torch.Tensor, bits: int, group_size: int = 0, clip: float = 1.0
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token (per-group) asymmetric codes of x [M, K] (fp16 / bf16 / fp32, rows contiguous).

    Returns:
        codes int8 [M, K] (a view of rows padded to 16 bytes): ``q_x - shift`` with shift 128 at
        8 bits, 0 at 4 bits; scale float32 [M, G]; zero float32 [M, G] (the reference's zero point,
        not shifted). Equal to :func:`.reference.quantize_act` (codes, scale and zero bit for bit).
    """
    if bits not in ACT_BITS:
        raise ValueError(f"w4a4 triton: activation bits must be one of {ACT_BITS}, got {bits}")
    if x.dim() != 2 or x.dtype not in _ACT_DTYPES or (x.shape[1] > 1 and x.stride(1) != 1):
        raise ValueError(f"w4a4 triton: x must be fp16/bf16/fp32 [M, K] with contiguous rows, got {x.dtype} "
                         f"{tuple(x.shape)} strides {x.stride()}")
    _check_device(x.device)
    m, k = x.shape
    gs = k if group_size in (0, -1) else group_size
    if gs <= 0 or k % gs:
        raise ValueError(f"w4a4 triton: activation group size {gs} does not divide the input size {k}")
    n_groups = k // gs
    kp = -(-k // _ROW_ALIGN) * _ROW_ALIGN
    codes = torch.empty((m, kp), dtype=torch.int8, device=x.device)[:, :k]
    scale = torch.empty((m, n_groups), dtype=torch.float32, device=x.device)
    zero = torch.empty((m, n_groups), dtype=torch.float32, device=x.device)
    if m:
        block = min(_QUANT_BLOCK, triton.next_power_of_2(gs))
        _w4a4_quant_kernel[(m, n_groups)](x, codes, scale, zero, n_groups, gs, x.stride(0), kp, float(clip),
                                          MAXQ=(1 << bits) - 1, SHIFT=128 if bits == 8 else 0, BLOCK=block,
                                          num_warps=4 if block >= 512 else (2 if block >= 128 else 1),
                                          enable_fp_fusion=False)
    return codes, scale, zero


# ------------------------------------------------------------------------------------------- GEMM
@triton.jit
def _unpacked_tile(w_ptrs, kb0, kmask, MASKED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """int8 weight codes [BLOCK_N, BLOCK_K] from packed bytes [BLOCK_N, BLOCK_K / 2] at byte kb0."""
    if MASKED:
        b = tl.load(w_ptrs + kb0, mask=kmask, other=0)
    else:
        b = tl.load(w_ptrs + kb0)
    b = b.to(tl.int8, bitcast=True)
    lo = (b << 4) >> 4  # arithmetic shifts of int8: the sign-extended low nibble (even column)
    hi = b >> 4  # the high nibble (odd column)
    return tl.reshape(tl.join(lo, hi), (BLOCK_N, BLOCK_K))


@triton.jit
def _group_epilogue(acc, g, rm_c, rn_c, sx_ptr, zx_ptr, rs_ptr, sw_ptr, G, GA, PER_A, GW, PER_W,
                    SHIFT: tl.constexpr, W_GROUPED: tl.constexpr):
    """GEMM group g's fp32 term ``s_x (acc - z_x r)`` (times s_w[:, g's weight group] when W_GROUPED)."""
    ga = g // PER_A
    zx = tl.load(zx_ptr + rm_c * GA + ga) - SHIFT
    r = tl.load(rs_ptr + rn_c * G + g).to(tl.float32)
    part = tl.load(sx_ptr + rm_c * GA + ga)[:, None] * (acc.to(tl.float32) - zx[:, None] * r[None, :])
    if W_GROUPED:
        part = part * tl.load(sw_ptr + rn_c * GW + g // PER_W)[None, :]
    return part


@triton.jit
def _w4a4_gemm_kernel(a_ptr, w_ptr, sx_ptr, zx_ptr, rs_ptr, sw_ptr, bias_ptr, y_ptr,
                      M, N, K, G, GS, GA, PER_A, GW, PER_W, stride_am, stride_wn, stride_ym,
                      SHIFT: tl.constexpr, MODE: tl.constexpr, EVEN_K: tl.constexpr, HAS_BIAS: tl.constexpr,
                      W_GROUPED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      GROUP_M: tl.constexpr):
    """y [M, N] = the w4a4 identity for int8 codes a [M, K] and packed int4 weights w [N, ceil(K/2)].

    G GEMM groups of GS columns; sx / zx: fp32 [M, GA] activation scales / zero points (zx
    unshifted), GEMM group g in activation group g // PER_A; rs: int32 [N, G] weight row sums per
    GEMM group; sw: fp32 [N], or [N, GW] when W_GROUPED (group g // PER_W); bias: [N] (any float
    dtype) when HAS_BIAS. MODE: see the module docstring (0 one group, 1 one K step per group,
    2 several K steps per group).
    """
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    group_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % group_m
    pid_n = (pid % width) // group_m

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm_c = tl.minimum(rm, M - 1).to(tl.int64)  # clamped: loads stay in bounds, stores are masked
    rn_c = tl.minimum(rn, N - 1).to(tl.int64)
    rk = tl.arange(0, BLOCK_K)
    rkb = tl.arange(0, BLOCK_K // 2)
    a_ptrs = a_ptr + rm_c[:, None] * stride_am + rk[None, :]
    w_ptrs = w_ptr + rn_c[:, None] * stride_wn + rkb[None, :]
    KB = (K + 1) // 2
    MASKED: tl.constexpr = not EVEN_K

    y = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if MODE == 0:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        for k0 in range(0, K, BLOCK_K):
            if MASKED:
                a = tl.load(a_ptrs + k0, mask=(k0 + rk)[None, :] < K, other=0)
            else:
                a = tl.load(a_ptrs + k0)
            w = _unpacked_tile(w_ptrs, k0 // 2, (k0 // 2 + rkb)[None, :] < KB, MASKED, BLOCK_N, BLOCK_K)
            acc = tl.dot(a, tl.trans(w), acc, out_dtype=tl.int32)
        zx = tl.load(zx_ptr + rm_c) - SHIFT
        r = tl.load(rs_ptr + rn_c).to(tl.float32)
        y = tl.load(sx_ptr + rm_c)[:, None] * (acc.to(tl.float32) - zx[:, None] * r[None, :])
    elif MODE == 1:
        for g in range(0, G):
            k0 = g * BLOCK_K
            a = tl.load(a_ptrs + k0)
            w = _unpacked_tile(w_ptrs, k0 // 2, None, False, BLOCK_N, BLOCK_K)
            acc = tl.dot(a, tl.trans(w), out_dtype=tl.int32)
            y += _group_epilogue(acc, g, rm_c, rn_c, sx_ptr, zx_ptr, rs_ptr, sw_ptr, G, GA, PER_A, GW, PER_W,
                                 SHIFT, W_GROUPED)
    else:
        for g in range(0, G):
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
            for kk in range(0, GS, BLOCK_K):
                k0 = g * GS + kk
                a = tl.load(a_ptrs + k0)
                w = _unpacked_tile(w_ptrs, k0 // 2, None, False, BLOCK_N, BLOCK_K)
                acc = tl.dot(a, tl.trans(w), acc, out_dtype=tl.int32)
            y += _group_epilogue(acc, g, rm_c, rn_c, sx_ptr, zx_ptr, rs_ptr, sw_ptr, G, GA, PER_A, GW, PER_W,
                                 SHIFT, W_GROUPED)
    if not W_GROUPED:
        y = y * tl.load(sw_ptr + rn_c)[None, :]
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + rn_c).to(tl.float32)[None, :]
    mask = (rm < M)[:, None] & (rn < N)[None, :]
    tl.store(y_ptr + rm.to(tl.int64)[:, None] * stride_ym + rn[None, :], cast_out(y, y_ptr.dtype.element_ty),
             mask=mask)


def block_k_for(k: int, group_size: int) -> int:
    """The K step: never crossing a GEMM group (the largest of 128 / 64 / 32 dividing the group
    size), or for one group per row 128 (32 / 64 for K below that)."""
    if group_size in (0, -1) or group_size == k:
        return min(128, max(32, triton.next_power_of_2(k)))
    for bk in (128, 64, 32):
        if group_size % bk == 0:
            return bk
    raise ValueError(f"w4a4 triton: GEMM group size {group_size} (activation or weight groups) is not a "
                     "multiple of 32")


def gemm_config(m: int, n: int, k: int, group_size: int) -> dict:
    """Launch parameters of the GEMM (see the module docstring)."""
    bk = block_k_for(k, group_size)
    per_token = group_size in (0, -1) or group_size == k
    mode = 0 if per_token else (1 if group_size == bk else 2)
    if m <= 16:
        bm, bn = 16, 32
    elif m <= 32:
        bm, bn = 32, 64
    elif m <= 64:
        bm, bn = 64, 64
    else:
        bm, bn = 128, 128
    return dict(MODE=mode, EVEN_K=k % bk == 0, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8,
                num_warps=8 if bm * bn >= 128 * 128 else 4, num_stages=3)


def w4a4_gemm(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qweight: torch.Tensor,
              w_scale: torch.Tensor, row_sums: torch.Tensor, act_bits: int, group_size: int,
              bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float32,
              out: torch.Tensor | None = None) -> torch.Tensor:
    """y [M, N] in ``out_dtype`` from :func:`quantize_act`'s output and the packed weight.

    Args:
        codes: int8 [M, K], rows contiguous (``q_x - shift``); scale, zero: fp32 [M, Ga].
        qweight: uint8 [N, ceil(K/2)], the checkpoint's packing; w_scale: fp32 [N], or [N, Gw]
        (weight groups); row_sums: int32 [N, G], the sum of the weight codes of each GEMM group
        (:func:`gq_kernels.w4a4.reference.gemm_group_size`: G is a multiple of Ga and of Gw).
        act_bits: 4 or 8 (8: codes are shifted by 128); group_size: the activation groups' columns
        (0: per token). bias: optional [N]; out: optional [M, N] to write into (tests pass it poisoned).
    """
    m, k = codes.shape
    n = qweight.shape[0]
    if codes.dtype != torch.int8 or (k > 1 and codes.stride(1) != 1):
        raise ValueError(f"w4a4_gemm: codes must be int8 [M, K] with contiguous rows, got {codes.dtype}")
    if qweight.dtype != torch.uint8 or qweight.shape != (n, (k + 1) // 2) or qweight.stride(1) != 1:
        raise ValueError(f"w4a4_gemm: qweight must be uint8 [N, {(k + 1) // 2}] with contiguous rows, got "
                         f"{qweight.dtype} {tuple(qweight.shape)}")
    ga = 1 if group_size in (0, -1) else k // group_size
    if ga * (k if ga == 1 else group_size) != k:
        raise ValueError(f"w4a4_gemm: activation group size {group_size} does not divide {k}")
    if w_scale.dim() == 2 and w_scale.shape[1] == 1:
        w_scale = w_scale.reshape(-1)  # one weight group spanning the row: the per-channel epilogue
    g = row_sums.shape[1] if row_sums.dim() == 2 else 0
    gw = w_scale.shape[1] if w_scale.dim() == 2 else 1
    if not g or k % g or g % ga or g % gw:
        raise ValueError(f"w4a4_gemm: row_sums [N, G] must have G dividing K = {k} and a multiple of the "
                         f"{ga} activation and {gw} weight groups, got {tuple(row_sums.shape)}")
    for name, t, shape, dt in (("scale", scale, (m, ga), torch.float32), ("zero", zero, (m, ga), torch.float32),
                               ("row_sums", row_sums, (n, g), torch.int32),
                               ("w_scale", w_scale, (n,) if w_scale.dim() == 1 else (n, gw), torch.float32)):
        if t.dtype != dt or tuple(t.shape) != shape or not t.is_contiguous():
            raise ValueError(f"w4a4_gemm: {name} must be contiguous {dt} {list(shape)}, got {t.dtype} {tuple(t.shape)}")
    if act_bits not in ACT_BITS:
        raise ValueError(f"w4a4_gemm: activation bits must be one of {ACT_BITS}, got {act_bits}")
    if bias is not None and (bias.shape != (n,) or not bias.is_contiguous()):
        raise ValueError(f"w4a4_gemm: bias must be contiguous [{n}]")
    _check_device(codes.device)
    if out is None:
        out = torch.empty((m, n), dtype=out_dtype, device=codes.device)
    elif out.shape != (m, n) or out.dtype != out_dtype or (n > 1 and out.stride(1) != 1):
        raise ValueError(f"w4a4_gemm: out must be {out_dtype} [{m}, {n}] with contiguous rows")
    if m == 0 or n == 0:
        return out
    gs = k // g
    cfg = gemm_config(m, n, k, 0 if g == 1 else gs)
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
    _w4a4_gemm_kernel[grid](codes, qweight, scale, zero, row_sums, w_scale, w_scale if bias is None else bias, out,
                            m, n, k, g, gs, ga, g // ga, gw, g // gw, codes.stride(0), qweight.stride(0),
                            out.stride(0), SHIFT=128 if act_bits == 8 else 0, MODE=cfg["MODE"],
                            EVEN_K=cfg["EVEN_K"], HAS_BIAS=bias is not None, W_GROUPED=w_scale.dim() == 2,
                            BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
                            GROUP_M=cfg["GROUP_M"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out


def w4a4_linear(x: torch.Tensor, qweight: torch.Tensor, w_scale: torch.Tensor, row_sums: torch.Tensor,
                act_bits: int, group_size: int, act_clip: float = 1.0, bias: torch.Tensor | None = None,
                out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Quantize x [M, K] (already rotated when the layer has an input Hadamard) and multiply: [M, N]."""
    codes, s_x, z_x = quantize_act(x, act_bits, group_size, act_clip)
    return w4a4_gemm(codes, s_x, z_x, qweight, w_scale, row_sums, act_bits, group_size, bias,
                     out_dtype or x.dtype)
