"""Reference (PyTorch) implementation of the ``trellis`` format: the specification kernels reproduce.

One quantized linear y = x W^T, W [m, n] (m, n multiples of 16), holds

* ``trellis`` int16 [(m/16)(n/16), 16k]: one circular bitstream of 256k bits per 16x16 tile (tile
  index = row_tile * (n/16) + col_tile), word w = stream bits 16w..16w+15, MSB first (uint16 read
  as int16). State t of a tile is the 16-bit window at bit offset t*kV (mod 256k), V values per state
  (``codes``), N = 256/V states; values land row-major in the tile: position p = 16r + c (r: output
  row, c: input column) holds value p mod V of state p // V.
* ``SU`` fp16 [n], ``SV`` fp16 [m]: the random signs (+-1) of the input and output transforms.
* ``Wscale`` fp32 [1]: one scale for the matrix.
* ``tlut`` fp16 [512, 2]: the HYB code's LUT (hyb only).

The dequantized weight is ``W_hat = Wscale * S_V R_m W_code R_n^T S_U`` (``hadamard``; R_m is
block-diagonal with ``out_rht_blocks`` blocks), W_code [m, n] the decoded values in tile layout.
Inference without a dense weight: ``y = Wscale * (((x * SU) R_n) W_code^T) R_m^T * SV``.
"""
from __future__ import annotations

import torch

from gq_kernels.trellis.codes import L, VALUES_PER_STATE, decode
from gq_kernels.hadamard import hadamard_transform, unrotate_weight

TILE = 16
TILE_WEIGHTS = TILE * TILE
SUPPORTED_BITS = (2, 3, 4)


def steps(code: str) -> int:
    """N: states per tile."""
    return TILE_WEIGHTS // VALUES_PER_STATE[code]


def words_per_tile(bits: int) -> int:
    return TILE_WEIGHTS * bits // 16


def _u16(words: torch.Tensor) -> torch.Tensor:
    return words.to(torch.int64) & 0xFFFF


def words_to_states(words: torch.Tensor, kV: int) -> torch.Tensor:
    """Circular streams int16 [T, W] -> states int64 [T, N] (N = 16 W / kV): state t is the 16-bit
    window at bit offset t kV, read across the word boundary, wrapping at the end."""
    T, W = words.shape
    nbits = 16 * W
    if nbits % kV:
        raise ValueError(f"a stream of {nbits} bits is not a whole number of {kV}-bit steps")
    N = nbits // kV
    u = _u16(words)
    off = torch.arange(N, device=words.device) * kV
    w0, r = off // 16, off % 16
    w1 = (w0 + 1) % W
    pair = (u[:, w0] << 16) | u[:, w1]  # 32 bits starting at word w0
    return (pair >> (16 - r)) & 0xFFFF


def states_to_words(states: torch.Tensor, kV: int) -> torch.Tensor:
    """Inverse of :func:`words_to_states` for tail-biting chains (see :func:`is_tail_biting`):
    states int [T, N] -> int16 [T, N kV / 16]."""
    T, N = states.shape
    nbits = N * kV
    if nbits % 16:
        raise ValueError(f"{N} steps of {kV} bits do not fill whole 16-bit words")
    W = nbits // 16
    s = states.to(torch.int64) & 0xFFFF
    off = torch.arange(W, device=states.device) * 16
    t, r = off // kV, off % kV  # word w starts r bits into state t (r < kV)
    a = (s[:, t] << r) & 0xFFFF
    b = (s[:, (t + 1) % N] >> (kV - r)) & ((1 << r) - 1)
    w = a | b
    return (((w ^ 0x8000) - 0x8000)).to(torch.int16)


def is_tail_biting(states: torch.Tensor, kV: int) -> torch.Tensor:
    """bool [T]: every state's low 16-kV bits are the next state's high 16-kV bits, circularly
    (so the chain is one circular bitstream of N kV bits)."""
    s = states.to(torch.int64)
    nxt = torch.roll(s, -1, dims=1)
    return ((s & ((1 << (L - kV)) - 1)) == (nxt >> kV)).all(dim=1)


def tiles_to_matrix(vals: torch.Tensor, m: int, n: int) -> torch.Tensor:
    """Tile-major values [(m/16)(n/16), 256] (row-major inside a tile) -> [m, n]."""
    return vals.reshape(m // TILE, n // TILE, TILE, TILE).permute(0, 2, 1, 3).reshape(m, n)


def matrix_to_tiles(w: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`tiles_to_matrix`: [m, n] -> [(m/16)(n/16), 256]."""
    m, n = w.shape
    return w.reshape(m // TILE, TILE, n // TILE, TILE).permute(0, 2, 1, 3).reshape(-1, TILE_WEIGHTS)


def decode_weight(trellis: torch.Tensor, code: str, bits: int, m: int, n: int,
                  tlut: torch.Tensor | None = None) -> torch.Tensor:
    """W_code float32 [m, n]: the decoded values (rotated basis, code units)."""
    V = VALUES_PER_STATE[code]
    states = words_to_states(trellis, bits * V)
    vals = decode(states, code, tlut)  # [T, N, V]
    return tiles_to_matrix(vals.reshape(states.shape[0], TILE_WEIGHTS), m, n)


def dequantize(trellis, SU, SV, Wscale, tlut, code: str, bits: int, out_rht_blocks: int = 1) -> torch.Tensor:
    """W_hat float32 [m, n] from the checkpoint tensors (see the module docstring)."""
    m, n = SV.shape[0], SU.shape[0]
    wc = decode_weight(trellis, code, bits, m, n, tlut)
    return unrotate_weight(wc * Wscale.float().reshape(()), SU, SV, out_rht_blocks)


def matmul(x: torch.Tensor, trellis, SU, SV, Wscale, tlut, code: str, bits: int, out_rht_blocks: int = 1,
           bias: torch.Tensor | None = None) -> torch.Tensor:
    """``y = Wscale * (((x * SU) R_n) W_code^T) R_m^T * SV (+ bias)`` in float32, returned in x's dtype:
    the transforms on every call, no dense W_hat (the spec of the fused kernels)."""
    m, n = SV.shape[0], SU.shape[0]
    wc = decode_weight(trellis, code, bits, m, n, tlut)
    xf = hadamard_transform(x.float() * SU.float())
    y = xf @ wc.t()
    y = hadamard_transform(y, transpose=True, blocks=out_rht_blocks)
    y = y * (SV.float() * Wscale.float().reshape(()))
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)
