"""Triton kernels for the uniform / binary-coded ``bcq`` format: LUT-GEMM GEMV and dequantize.

Format (``kernels.packing``, spec in ``kernels.bcq.reference``): ``qweight`` int32
[bits, N, KW = ceil(K/32)], plane ``b`` holds bit ``b`` of every code ``q`` and input column ``c``
sits in word ``c // 32`` at bit ``c % 32``; ``scales`` / ``offsets`` fp16 [N, n_groups], one pair
per output row and group of ``group_size`` consecutive inputs (``-1``: one group per row).
``W_hat = s * q + o`` in fp32; the reference matmul is ``F.linear(x, W_hat.to(x.dtype))``.

GEMV design (LUT-GEMM, Park et al.; written without a GPU, so untuned)
-----------------------------------------------------------------------
With ``q = sum_b 2^b beta_b`` (bit planes ``beta_b`` in {0, 1})::

    y[m, r] = sum_g  s_g[r] * sum_b 2^b * sum_{c in g} x[m, c] beta_b[r, c]  +  o_g[r] * sum_{c in g} x[m, c]

1. ``_bcq_table_kernel`` (one launch) builds, for every chunk of MU = 4 consecutive input columns,
   the 16 partial sums ``T[chunk, p] = sum_{i<4} x[4 chunk + i] * bit_i(p)`` in fp32, laid out
   [n_mblocks, KW * 8, 16, BLOCK_M] with the x row innermost (64 B per chunk and x row: 64 KiB
   per x row at K = 4096, L2-resident; a program's slice stays in L1). ``T[.., 15]`` is the
   chunk's plain sum of x. It also writes the per-tile sums of x [n_mblocks, n_tiles, BLOCK_M]
   for the offset term. Rows of x past M and columns past K are zeros.
2. ``_bcq_gemv_kernel``: program (m-block, n-block, k-split) owns BLOCK_M (<= 4) rows of x and
   BLOCK_N = 32 * num_warps output rows, ONE OUTPUT ROW PER THREAD, and walks its share of the K
   tiles (BLOCK_W <= 4 words = 32 * BLOCK_W columns, BLOCK_W | KW so no masks). Per tile each
   thread loads its row's BLOCK_W words of every plane (one aligned vector per plane: KW is a
   constexpr, so even K = 11008 gives 16 B loads; prefetched two tiles ahead in registers, since
   Triton does not pipeline a loop without tl.dot), then, unrolled over words w and nibbles j,
   cuts nibble ``(word >> 4j) & 15`` (the 4 bits of chunk ``8 w + j``) of each plane and loads
   ``T[chunk, nibble, 0:BLOCK_M]`` (one 4..16 B vector serving all x rows), summing
   ``part = sum_b 2^b T_b`` (exact weights). All lanes of a warp look up the same chunk at the
   same time, so a warp-wide gather stays inside one chunk's 16 * BLOCK_M entries (one or two L1
   lines): the LUT-GEMM "threads over rows" mapping. Every load's layout follows from real
   contiguity (output rows for gathers and scales, words for planes, x rows for the table), never
   from Triton's tie-breaking, which differs between 3.6 and 3.9: checked on offline sm_80 /
   86 / 89 / 90 / 120 compiles with both (lanes on rows, vector gathers, no shuffles, barriers or
   shared memory in the loop, no spills). Group modes (constexpr):
     0: group_size % 32 != 0 (e.g. 36): ``acc += s * part + o * T[.., 15]`` per chunk, s / o
        loaded per chunk (the slow path: ~2x the instructions of mode 1);
     1: the tile lies inside one group (``_gemv_config`` makes BLOCK_W divide group_size / 32):
        ``acc += s * tile_sum + o * tile_x_sum`` with s / o loaded once per tile;
     2: one group per row (-1, or group_size >= K): s / o applied once, after the K loop.
   Beyond BLOCK_M rows of x a grid axis (the fastest-varying one, so programs reading the same
   weight tile run together and share it through L2) takes the next block of rows.
   Split-K: with one row per thread, N = 4096 is only 128 warps, so K is split until ~2048 warps
   (``_TARGET_WARPS``) are in flight; each split writes fp32 partials [SPLIT_K, M, N] and
   ``_bcq_splitk_reduce_kernel`` sums them in a fixed order (deterministic, no atomics, no
   zero-fill). Every output element is written exactly once (rows >= N are clamped for loads and
   masked for stores).

Per weight and table lookup the loop spends a nibble cut (SHF + LOP3/SGXT), a 64-bit gather
address (LEA + LEA.HI.X; the chunk offset folds into the immediate), the gather and an FFMA / FADD
per x row; instructions and bytes per weight both scale with bits, so at batch 1 the kernel is
issue-bound at a fixed fraction of the memory roofline for every width. Static counts and that
fraction: docs/results.md, "Static instruction counts". The per-tile s / o loads are uncoalesced
(one row per lane), a small cost next to the gathers.

What to tune on the GPU (``benchmarks/kernels.py``; nothing could be timed when this was written):
  * ``_TARGET_WARPS`` / SPLIT_K (occupancy vs. the reduce launch and its [SPLIT_K, M, N] traffic);
  * the prefetch distance (two tiles) and num_warps (BLOCK_N): 4 vs. 1-2 warp programs at the
    same total warp count;
  * BLOCK_M = 8 (two 16 B gathers per lookup) for batches 8..16 instead of a second m-block;
  * check ``l1tex__data_pipe_lsu_wavefronts`` / ``l1tex__t_requests`` ~ 1-2 for the gathers in
    Nsight Compute, and re-check the loop SASS (no SHFL / BAR / STS) after a Triton upgrade.

Dequantize: grid over (row tiles, column tiles); each tile rebuilds codes from its plane words
and stores ``(s * q + o)`` (fp32, then cast), bit-identical to the reference: ``s * q`` is exact in
fp32 (fp16/bf16 scale times a 4-bit code), so FMA contraction cannot change the rounding. ~15
instructions per weight at 3 bits, 16 B stores; scales per word when group_size % 32 == 0.

Only plain portable Triton (no inline PTX, no gather on register tensors, no Hopper-only
features): sm_80 and newer. The wrappers run on CUDA tensors, and on CPU tensors under
``TRITON_INTERPRET=1`` (which must be set before this module is imported).
"""
from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

from gq_kernels.packing import packed_words
from gq_kernels.triton_common import cast_out, pick_column

SUPPORTED_BITS = (2, 3, 4)
MAX_GEMV_ROWS = 16
MU = 4  # input columns per lookup table (16 entries)
_ACT_DTYPES = (torch.float16, torch.bfloat16)
_DEQUANT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# fp16 / bf16 scales keep ``s * q`` exact in fp32 (<= 11 + 4 significant bits), which is what makes
# the dequantize kernel bit-identical to the reference even where the compiler fuses it into an FMA.
_SCALE_DTYPES = (torch.float16, torch.bfloat16)
# Warps the GEMV grid aims for: ~16 per SM on a 132-SM H100, enough loads in flight to cover DRAM
# latency; smaller GPUs (RTX, 30..170 SMs) just queue more programs per SM.
_TARGET_WARPS = 2048
_TABLE_BLOCK_C = 64  # chunks per table-kernel program (at least one GEMV tile)
_REDUCE_BLOCK = 1024


# ----------------------------------------------------------------------------------------- kernels
@triton.jit
def _bcq_table_kernel(x_ptr, t_ptr, xs_ptr, M, K, stride_xm, n_chunks, n_tiles,
                      BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, TILE_C: tl.constexpr):
    """x [M, K] fp16/bf16 (unit column stride) -> T fp32 [n_mblocks, n_chunks, 16, BLOCK_M] and
    xs fp32 [n_mblocks, n_tiles, BLOCK_M].

    ``T[mb, c, p, i] = sum_{l<4} x[mb * BLOCK_M + i, 4c + l] * ((p >> l) & 1)``; ``xs[mb, t, i]`` = sum
    of that row of x over the TILE_C chunks of GEMV tile t. The x row index is innermost so one
    vector load gathers an entry for all BLOCK_M rows of x. Columns >= K and rows >= M count as 0.
    BLOCK_C is a multiple of TILE_C. Grid: (n_mblocks, cdiv(n_chunks, BLOCK_C)).
    """
    pid_mb = tl.program_id(0)
    pid_c = tl.program_id(1)
    chunks = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    lane = tl.arange(0, 4)
    pattern = tl.arange(0, 16)
    cols = chunks[:, None] * 4 + lane[None, :]  # [C, 4]
    select = ((pattern[None, :] >> lane[:, None]) & 1).to(tl.float32)  # [4, 16]
    tiles = pid_c * (BLOCK_C // TILE_C) + tl.arange(0, BLOCK_C // TILE_C)
    tile_cols = tiles[:, None] * (TILE_C * 4) + tl.arange(0, TILE_C * 4)[None, :]
    t_offs = pid_mb * (n_chunks * 16 * BLOCK_M) + (chunks[:, None] * 16 + pattern[None, :]) * BLOCK_M
    for i in tl.static_range(BLOCK_M):
        m = pid_mb * BLOCK_M + i
        x_row = x_ptr + m * stride_xm
        k_row = tl.where(m < M, K, 0)  # padding rows of x read nothing
        xv = tl.load(x_row + cols, mask=cols < k_row, other=0.0).to(tl.float32)
        table = tl.sum(xv[:, :, None] * select[None, :, :], axis=1)  # [C, 16]
        tl.store(t_ptr + t_offs + i, table, mask=chunks[:, None] < n_chunks)
        xt = tl.load(x_row + tile_cols, mask=tile_cols < k_row, other=0.0).to(tl.float32)
        tl.store(xs_ptr + pid_mb * (n_tiles * BLOCK_M) + tiles * BLOCK_M + i, tl.sum(xt, axis=1),
                 mask=tiles < n_tiles)


@triton.jit
def _lookup(t_chunk_ptr, word, m_lane, J: tl.constexpr, BLOCK_M: tl.constexpr):
    """[BLOCK_N, BLOCK_M] table entries of nibble J of each row's word, for every x row of the block.

    The address varies along x rows by 1 (contiguous: one vector load per thread) and along output
    rows by the looked-up pattern, so the lanes of a warp go to output rows and a warp-wide load
    reads inside one chunk's 16 * BLOCK_M entries (64 B per x row). Arithmetic shift of a negative
    word still leaves the nibble in the low 4 bits.
    """
    pat = (word >> (4 * J)) & 15  # [BN]
    return tl.load(t_chunk_ptr + (pat * BLOCK_M)[:, None] + m_lane[None, :])


@triton.jit
def _load_planes(plane_ptrs, plane_stride, w0, BITS: tl.constexpr):
    """The [BLOCK_N, BLOCK_W] words at word offset w0 of planes 0..3; absent planes repeat plane 0
    (no load). Each thread reads its own row's words: one vector per plane."""
    p0 = tl.load(plane_ptrs + w0)
    p1 = tl.load(plane_ptrs + plane_stride + w0)
    p2 = p0
    p3 = p0
    if BITS >= 3:
        p2 = tl.load(plane_ptrs + 2 * plane_stride + w0)
    if BITS >= 4:
        p3 = tl.load(plane_ptrs + 3 * plane_stride + w0)
    return p0, p1, p2, p3


@triton.jit
def _bcq_gemv_kernel(t_ptr, xs_ptr, q_ptr, s_ptr, o_ptr, y_ptr,
                     M, N, n_groups, n_tiles, tiles_per_split,
                     KW: tl.constexpr, GROUP_SIZE: tl.constexpr, BITS: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr,
                     GROUP_MODE: tl.constexpr, SPLIT_K: tl.constexpr):
    """y[m, r] = sum_c x[m, c] * (s * q + o)[r, c] from the tables (see module docstring).

    t_ptr: fp32 [n_mblocks, KW * 8, 16, BLOCK_M]; xs_ptr: fp32 [n_mblocks, n_tiles, BLOCK_M];
    q_ptr: int32 [BITS, N, KW]; s_ptr / o_ptr: [N, n_groups];
    y_ptr: [M, N] in x's dtype when SPLIT_K == 1, else fp32 [SPLIT_K, M, N] partial sums.
    Grid: (cdiv(M, BLOCK_M), cdiv(N, BLOCK_N), SPLIT_K). BLOCK_W divides KW (no K masks).
    KW and GROUP_SIZE are constexpr: row starts then have a known alignment (vector plane loads
    even for K = 11008) and group indices divide by a constant.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Clamped rows keep every load in bounds without masks; the store mask drops the duplicates.
    rows_c = tl.minimum(rows, N - 1)
    m_lane = tl.arange(0, BLOCK_M)
    w_lane = tl.arange(0, BLOCK_W)
    t_blk = t_ptr + pid_m * (KW * 8 * 16 * BLOCK_M)
    xs_blk = xs_ptr + pid_m * (n_tiles * BLOCK_M)
    plane_ptrs = q_ptr + (rows_c * KW)[:, None] + w_lane[None, :]  # [BN, BW]
    plane_stride = N * KW
    so_row = rows_c * n_groups  # [BN]
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    x_acc = tl.zeros((1, BLOCK_M), dtype=tl.float32)  # group mode 2 only: sum of x

    tile_start = pid_k * tiles_per_split  # the wrapper never makes an empty split
    tile_end = tl.minimum(tile_start + tiles_per_split, n_tiles)
    last = tile_end - 1
    # Plane words are loaded two tiles ahead into registers: Triton's pipeliner left this dot-free
    # loop alone (no shared memory at num_stages=3 in the offline compiles), and ptxas may issue a
    # load late in the body, so one tile ahead would hide little DRAM latency. Past the split's
    # end its last tile is reloaded (an L1 hit) instead of reading out of bounds.
    c0, c1, c2, c3 = _load_planes(plane_ptrs, plane_stride, tile_start * BLOCK_W, BITS)
    n0, n1, n2, n3 = _load_planes(plane_ptrs, plane_stride, tl.minimum(tile_start + 1, last) * BLOCK_W,
                                  BITS)
    for tile in range(tile_start, tile_end):
        w0 = tile * BLOCK_W
        p0, p1, p2, p3 = c0, c1, c2, c3
        c0, c1, c2, c3 = n0, n1, n2, n3
        w_ahead = tl.minimum(tile + 2, last) * BLOCK_W
        n0, n1, n2, n3 = _load_planes(plane_ptrs, plane_stride, w_ahead, BITS)
        tile_sum = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        for w in tl.static_range(BLOCK_W):
            q0 = pick_column(p0, w_lane, w)
            q1 = pick_column(p1, w_lane, w)
            if BITS >= 3:
                q2 = pick_column(p2, w_lane, w)
            if BITS >= 4:
                q3 = pick_column(p3, w_lane, w)
            for j in tl.static_range(8):
                chunk = (w0 + w) * 8 + j
                t_chunk = t_blk + chunk * (16 * BLOCK_M)
                # sum_b 2^b T[chunk, nibble_b]: the chunk's contribution before scale / offset.
                part = _lookup(t_chunk, q0, m_lane, j, BLOCK_M)
                part += 2.0 * _lookup(t_chunk, q1, m_lane, j, BLOCK_M)
                if BITS >= 3:
                    part += 4.0 * _lookup(t_chunk, q2, m_lane, j, BLOCK_M)
                if BITS >= 4:
                    part += 8.0 * _lookup(t_chunk, q3, m_lane, j, BLOCK_M)
                if GROUP_MODE == 0:
                    # Columns past K (zero table entries) may index past the last group: clamp.
                    grp = tl.minimum((chunk * 4) // GROUP_SIZE, n_groups - 1)
                    s = tl.load(s_ptr + so_row + grp).to(tl.float32)[:, None]
                    o = tl.load(o_ptr + so_row + grp).to(tl.float32)[:, None]
                    x_sum = tl.load(t_chunk + 15 * BLOCK_M + m_lane)[None, :]  # the chunk's sum of x
                    acc += s * part + o * x_sum
                else:
                    tile_sum += part
        if GROUP_MODE == 1:
            # The tile lies inside one group (BLOCK_W divides GROUP_SIZE / 32).
            grp = tl.minimum((w0 * 32) // GROUP_SIZE, n_groups - 1)
            s = tl.load(s_ptr + so_row + grp).to(tl.float32)[:, None]
            o = tl.load(o_ptr + so_row + grp).to(tl.float32)[:, None]
            acc += s * tile_sum + o * tl.load(xs_blk + tile * BLOCK_M + m_lane)[None, :]
        elif GROUP_MODE == 2:
            acc += tile_sum
            x_acc += tl.load(xs_blk + tile * BLOCK_M + m_lane)[None, :]

    if GROUP_MODE == 2:
        s = tl.load(s_ptr + so_row).to(tl.float32)[:, None]
        o = tl.load(o_ptr + so_row).to(tl.float32)[:, None]
        y = s * acc + o * x_acc  # [BN, BM]
    else:
        y = acc

    ms = pid_m * BLOCK_M + m_lane
    mask = (rows < N)[:, None] & (ms < M)[None, :]
    offs = rows[:, None] + ms[None, :] * N
    if SPLIT_K == 1:
        tl.store(y_ptr + offs, cast_out(y, y_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(y_ptr + pid_k * (M * N) + offs, y, mask=mask)


@triton.jit
def _bcq_splitk_reduce_kernel(ws_ptr, y_ptr, MN, SPLIT_K: tl.constexpr, BLOCK: tl.constexpr):
    """y [M, N] (x's dtype) = sum over k of ws fp32 [SPLIT_K, M, N], in a fixed order."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    total = tl.zeros((BLOCK,), dtype=tl.float32)
    for k in tl.static_range(SPLIT_K):
        total += tl.load(ws_ptr + k * MN + offs, mask=mask, other=0.0)
    tl.store(y_ptr + offs, cast_out(total, y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bcq_dequant_kernel(q_ptr, s_ptr, o_ptr, w_ptr, N, K, KW, n_groups, group_size,
                        BITS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr,
                        GROUP_MODE: tl.constexpr):
    """W [N, K] (w_ptr's dtype) = (s * q + o) in fp32, then cast.

    q_ptr: int32 [BITS, N, KW]; s_ptr / o_ptr: [N, n_groups]. Grid: (cdiv(N, BLOCK_R), cdiv(KW, BLOCK_W)).
    GROUP_MODE: 0 = scales looked up per column (any group_size), 1 = per word (group_size % 32 == 0),
    2 = one group per row. Tiles are [BLOCK_R, BLOCK_W, 32]: the last axis is the bit / column in a word.
    """
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    words = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    bit = tl.arange(0, 32)
    rows_c = tl.minimum(rows, N - 1)
    q_offs = rows_c[:, None] * KW + words[None, :]  # [BR, BW]
    codes = tl.zeros((BLOCK_R, BLOCK_W, 32), dtype=tl.int32)
    for b in tl.static_range(BITS):
        plane = tl.load(q_ptr + b * N * KW + q_offs, mask=(words < KW)[None, :], other=0)
        codes |= ((plane[:, :, None] >> bit[None, None, :]) & 1) << b
    cols = words[None, :, None] * 32 + bit[None, None, :]  # [1, BW, 32]
    if GROUP_MODE == 0:
        so = rows_c[:, None, None] * n_groups + tl.minimum(cols // group_size, n_groups - 1)
        s = tl.load(s_ptr + so).to(tl.float32)
        o = tl.load(o_ptr + so).to(tl.float32)
    elif GROUP_MODE == 1:
        so = rows_c[:, None] * n_groups + tl.minimum((words * 32) // group_size, n_groups - 1)[None, :]
        s = tl.load(s_ptr + so).to(tl.float32)[:, :, None]
        o = tl.load(o_ptr + so).to(tl.float32)[:, :, None]
    else:
        s = tl.load(s_ptr + rows_c * n_groups).to(tl.float32)[:, None, None]
        o = tl.load(o_ptr + rows_c * n_groups).to(tl.float32)[:, None, None]
    w = codes.to(tl.float32) * s + o
    mask = (rows < N)[:, None, None] & (cols < K)
    w_offs = rows.to(tl.int64)[:, None, None] * K + cols
    tl.store(w_ptr + w_offs, cast_out(w, w_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------- config
def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _gemv_config(M: int, N: int, K: int, bits: int, group_size: int = -1) -> dict:
    """Launch parameters of the GEMV for x [M, K] and a [N, K] weight; deterministic (no autotune).

    Returns BLOCK_M, BLOCK_N, BLOCK_W, SPLIT_K, num_warps, num_stages.
      * BLOCK_N = 32 * num_warps: one output row per thread (see ``_bcq_gemv_kernel``).
      * BLOCK_M <= 4 x rows per program: one 16 B table load serves 4 rows of x.
      * BLOCK_W (words per tile, <= 4: one 16 B vector per plane, which Triton keeps inside one
        thread) divides KW, so tiles need no mask, and divides group_size / 32 when groups end on
        words, so a tile lies in one group (group mode 1: scales loaded once per tile).
      * SPLIT_K doubles until ~_TARGET_WARPS warps are in flight, keeping >= 2 tiles per split:
        with one row per thread, N = 4096 is only 128 warps of rows.
    ``bits`` does not change the tile (planes are walked one after another), only the work per tile.
    """
    kw = packed_words(K)
    block_m = min(_next_pow2(M), 4)
    block_w = min(4, kw & -kw)  # largest power of two dividing KW, at most 4
    if group_size != -1 and group_size % 32 == 0 and group_size < K:
        words_per_group = group_size // 32
        block_w = min(block_w, words_per_group & -words_per_group)
    num_warps = max(1, min(4, _next_pow2(N) // 32))
    block_n = 32 * num_warps
    n_tiles = kw // block_w
    programs = triton.cdiv(M, block_m) * triton.cdiv(N, block_n)
    split_k = 1
    while programs * split_k * num_warps < _TARGET_WARPS and split_k < 16 and n_tiles >= 4 * split_k:
        split_k *= 2
    # num_stages = 1: the kernel prefetches plane words itself (two tiles ahead, in registers).
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_W=block_w, SPLIT_K=split_k,
                num_warps=num_warps, num_stages=1)


def _dequant_config(N: int, K: int) -> dict:
    """BLOCK_R rows x 32 * BLOCK_W columns per program: 4096 outputs, 32 per thread with 4 warps."""
    block_w = min(4, _next_pow2(packed_words(K)))
    return dict(BLOCK_R=128 // block_w, BLOCK_W=block_w, num_warps=4)


# ----------------------------------------------------------------------------------------- checks
def _check_device(name: str, t: torch.Tensor, device: torch.device) -> None:
    if t.device != device:
        raise ValueError(f"bcq triton: {name} is on {t.device} but the other inputs are on {device}")


def _on_device(device: torch.device):
    """Launch context: Triton launches on the current CUDA device, so make it the tensors' one."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _check_runnable(device: torch.device) -> None:
    if device.type == "cuda":
        return
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return
    raise ValueError(
        f"bcq triton: tensors on {device} need CUDA, or TRITON_INTERPRET=1 (set before importing this "
        "module) for CPU tensors"
    )


def _check_weights(fn: str, qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor,
                   group_size: int, in_features: int) -> tuple[int, int, int]:
    """Validate the packed weight tensors; returns (bits, N, n_groups)."""
    if not isinstance(qweight, torch.Tensor) or qweight.dtype != torch.int32 or qweight.dim() != 3:
        got = f"{qweight.dtype} {tuple(qweight.shape)}" if isinstance(qweight, torch.Tensor) else type(
            qweight)
        raise ValueError(f"{fn}: qweight must be int32 [bits, N, ceil(K/32)], got {got}")
    bits, n, kw = qweight.shape
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"{fn}: bits (qweight.shape[0]) must be one of {SUPPORTED_BITS}, got {bits}")
    if n < 1:
        raise ValueError(f"{fn}: qweight has no output rows (shape {tuple(qweight.shape)})")
    if kw != packed_words(in_features):
        raise ValueError(
            f"{fn}: qweight has {kw} words per row but in_features={in_features} needs "
            f"{packed_words(in_features)}"
        )
    if not qweight.is_contiguous():
        raise ValueError(f"{fn}: qweight must be contiguous")
    valid_int = isinstance(group_size, int) and not isinstance(group_size, bool)
    if not valid_int or not (group_size == -1 or group_size >= 1):
        raise ValueError(f"{fn}: group_size must be -1 (per channel) or an int >= 1, got {group_size!r}")
    groups = 1 if group_size == -1 else -(-in_features // group_size)
    for name, t in (("scales", scales), ("offsets", offsets)):
        if not isinstance(t, torch.Tensor) or t.dtype not in _SCALE_DTYPES:
            got = t.dtype if isinstance(t, torch.Tensor) else type(t)
            raise ValueError(f"{fn}: {name} must be float16 or bfloat16, got {got}")
        if tuple(t.shape) != (n, groups):
            raise ValueError(
                f"{fn}: {name} must be [N, n_groups]={[n, groups]} for group_size={group_size} and "
                f"in_features={in_features}, got {tuple(t.shape)}"
            )
        if not t.is_contiguous():
            raise ValueError(f"{fn}: {name} must be contiguous")
        _check_device(name, t, qweight.device)
    return bits, n, groups


# ----------------------------------------------------------------------------------------- wrappers
def bcq_gemv(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor,
             group_size: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """``y = x @ W_hat.T`` for a few rows of x (decode), reading the packed weights once.

    Args:
        x: fp16 / bf16 [M, K], 1 <= M <= 16, unit stride along K (rows may be strided).
        qweight: int32 [bits, N, ceil(K/32)], bits in (2, 3, 4).
        scales, offsets: fp16 (or bf16) [N, n_groups].
        group_size: -1 (per row) or a multiple of 4 (the tables cover 4 columns).
        out: optional [M, N] contiguous tensor of x's dtype and device to write into.
    Returns:
        [M, N] in x's dtype (``out`` when given). Accumulation is fp32 from fp32 tables, so it differs
        from ``kernels.bcq.reference.matmul`` by the reference's rounding of W_hat to x's dtype and
        the summation order.
    """
    fn = "bcq_gemv"
    if not isinstance(x, torch.Tensor) or x.dtype not in _ACT_DTYPES:
        got = x.dtype if isinstance(x, torch.Tensor) else type(x)
        raise ValueError(f"{fn}: x must be float16 or bfloat16, got {got}")
    if x.dim() != 2:
        raise ValueError(f"{fn}: x must be 2-D [M, K], got shape {tuple(x.shape)}")
    m, k = x.shape
    if not 1 <= m <= MAX_GEMV_ROWS:
        raise ValueError(f"{fn}: x must have 1..{MAX_GEMV_ROWS} rows, got {m} (use the dequantize path)")
    if k < 1:
        raise ValueError(f"{fn}: x has no columns")
    if x.stride(1) != 1:
        raise ValueError(
            f"{fn}: x must have unit stride along K (make it contiguous), got strides {x.stride()}")
    int_group = isinstance(group_size, int) and not isinstance(group_size, bool)
    if int_group and group_size != -1 and group_size % MU:
        raise ValueError(
            f"{fn}: group_size={group_size} is not a multiple of {MU}: the lookup tables cover {MU} input "
            "columns, so every group must hold whole tables (use the dequantize path)"
        )
    bits, n, groups = _check_weights(fn, qweight, scales, offsets, group_size, k)
    _check_device("qweight", qweight, x.device)
    _check_runnable(x.device)
    if out is None:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    else:
        if not isinstance(out, torch.Tensor) or out.dtype != x.dtype or tuple(out.shape) != (m, n):
            got = f"{out.dtype} {tuple(out.shape)}" if isinstance(out, torch.Tensor) else type(out)
            raise ValueError(f"{fn}: out must be {x.dtype} {(m, n)}, got {got}")
        if not out.is_contiguous():
            raise ValueError(f"{fn}: out must be contiguous")
        _check_device("out", out, x.device)

    with _on_device(x.device):
        return _launch_gemv(x, qweight, scales, offsets, group_size, out, bits, groups)


def _launch_gemv(x, qweight, scales, offsets, group_size, out, bits, groups):
    """Table + GEMV (+ split-K reduce) launches for validated inputs; see :func:`bcq_gemv`."""
    m, k = x.shape
    n = qweight.shape[1]
    cfg = _gemv_config(m, n, k, bits, group_size)
    kw = qweight.shape[2]
    block_m, block_w = cfg["BLOCK_M"], cfg["BLOCK_W"]
    n_mblocks = triton.cdiv(m, block_m)
    n_tiles = kw // block_w
    n_chunks = kw * 8
    table = torch.empty((n_mblocks, n_chunks, 16, block_m), dtype=torch.float32, device=x.device)
    tile_x_sums = torch.empty((n_mblocks, n_tiles, block_m), dtype=torch.float32, device=x.device)
    tile_c = block_w * 8
    block_c = max(_TABLE_BLOCK_C, tile_c)
    _bcq_table_kernel[(n_mblocks, triton.cdiv(n_chunks, block_c))](
        x, table, tile_x_sums, m, k, x.stride(0), n_chunks, n_tiles,
        BLOCK_M=block_m, BLOCK_C=block_c, TILE_C=tile_c, num_warps=4,
    )

    if groups == 1:
        mode = 2
    elif group_size % (32 * block_w) == 0:
        mode = 1
    else:
        mode = 0
    tiles_per_split = triton.cdiv(n_tiles, cfg["SPLIT_K"])
    split_k = triton.cdiv(n_tiles, tiles_per_split)  # no empty splits
    target = out if split_k == 1 else torch.empty((split_k, m, n), dtype=torch.float32, device=x.device)
    grid = (n_mblocks, triton.cdiv(n, cfg["BLOCK_N"]), split_k)
    _bcq_gemv_kernel[grid](
        table, tile_x_sums, qweight, scales, offsets, target,
        m, n, groups, n_tiles, tiles_per_split,
        KW=kw, GROUP_SIZE=group_size if mode != 2 else 0, BITS=bits,
        BLOCK_M=block_m, BLOCK_N=cfg["BLOCK_N"], BLOCK_W=block_w,
        GROUP_MODE=mode, SPLIT_K=split_k, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    if split_k > 1:
        _bcq_splitk_reduce_kernel[(triton.cdiv(m * n, _REDUCE_BLOCK),)](
            target, out, m * n, SPLIT_K=split_k, BLOCK=_REDUCE_BLOCK, num_warps=4
        )
    return out


def bcq_dequantize(qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor, group_size: int,
                   in_features: int, dtype: torch.dtype) -> torch.Tensor:
    """W_hat [N, in_features] in ``dtype`` (fp16, bf16 or fp32) for prefill / large batches.

    Bit-identical to ``kernels.bcq.reference.dequantize_packed(...).to(dtype)``: ``s * q + o`` in fp32,
    one rounding to ``dtype``. Any group_size >= 1 (or -1) is accepted. Output on qweight's device.
    """
    fn = "bcq_dequantize"
    if dtype not in _DEQUANT_DTYPES:
        raise ValueError(f"{fn}: dtype must be one of {_DEQUANT_DTYPES}, got {dtype}")
    if not isinstance(in_features, int) or isinstance(in_features, bool) or in_features < 1:
        raise ValueError(f"{fn}: in_features must be a positive int, got {in_features!r}")
    bits, n, groups = _check_weights(fn, qweight, scales, offsets, group_size, in_features)
    _check_runnable(qweight.device)
    w = torch.empty((n, in_features), dtype=dtype, device=qweight.device)
    kw = qweight.shape[2]
    cfg = _dequant_config(n, in_features)
    grid = (triton.cdiv(n, cfg["BLOCK_R"]), triton.cdiv(kw, cfg["BLOCK_W"]))
    with _on_device(qweight.device):
        _bcq_dequant_kernel[grid](
            qweight, scales, offsets, w, n, in_features, kw, groups, group_size,
            BITS=bits, BLOCK_R=cfg["BLOCK_R"], BLOCK_W=cfg["BLOCK_W"],
            GROUP_MODE=2 if groups == 1 else (1 if group_size % 32 == 0 else 0),
            num_warps=cfg["num_warps"],
        )
    return w
