"""Bit-plane packing of integer codes along the input dimension.

Layout (shared by the ``lut`` and ``bcq`` formats): codes uint8 [out, in] with values in [0, 2^bits)
become ``qweight`` int32 [bits, out, ceil(in / 32)] where plane ``b`` holds bit ``b`` of every code,
and input column ``c`` lands in word ``c // 32`` at bit ``c % 32``. Columns past ``in`` are zero.

Packing only along the input dimension keeps every output row independent, so sharding by output
channel (tensor parallel, fused q/k/v or gate/up) is a plain slice of dim 1.
"""
from __future__ import annotations

import torch

WORD_BITS = 32


def packed_words(in_features: int) -> int:
    """Number of int32 words per row and plane: ceil(in_features / 32)."""
    return (in_features + WORD_BITS - 1) // WORD_BITS


def _bit_weights(device: torch.device) -> torch.Tensor:
    """int64 [32]: 2^k for k in 0..31 (int64 so bit 31 does not overflow before the final cast)."""
    return torch.ones(WORD_BITS, dtype=torch.int64, device=device) << torch.arange(WORD_BITS, device=device)


def pack_bitplanes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack codes into bit planes.

    Args:
        codes: integer tensor [out, in] (uint8 in the checkpoint), values in [0, 2^bits).
        bits: bits per code, 1..8.
    Returns:
        int32 [bits, out, ceil(in / 32)]; bit 31 set gives a negative int32 (two's complement).
    """
    if codes.dim() != 2:
        raise ValueError(f"pack_bitplanes: codes must be 2-D [out, in], got shape {tuple(codes.shape)}")
    if not 1 <= bits <= 8:
        raise ValueError(f"pack_bitplanes: bits must be in 1..8, got {bits}")
    if codes.dtype.is_floating_point or codes.dtype == torch.bool:
        raise ValueError(f"pack_bitplanes: codes must be an integer tensor, got {codes.dtype}")
    out_f, in_f = codes.shape
    c = codes.to(torch.int64)
    if c.numel() and (int(c.min()) < 0 or int(c.max()) >= (1 << bits)):
        raise ValueError(
            f"pack_bitplanes: codes must lie in [0, {1 << bits}) for bits={bits}, "
            f"found range [{int(c.min())}, {int(c.max())}]"
        )
    n_words = packed_words(in_f)
    pad = n_words * WORD_BITS - in_f
    c = torch.nn.functional.pad(c, (0, pad)).view(out_f, n_words, WORD_BITS)  # zeros past the last column
    weights = _bit_weights(c.device)
    out = torch.empty(bits, out_f, n_words, dtype=torch.int32, device=c.device)
    for b in range(bits):  # one plane at a time bounds the int64 temporary to [out, words, 32]
        words = (((c >> b) & 1) * weights).sum(dim=-1)  # int64 in [0, 2^32)
        # Reinterpret the low 32 bits as signed int32 (values >= 2^31 wrap to negatives).
        out[b] = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return out


def unpack_bitplanes(qweight: torch.Tensor, in_features: int) -> torch.Tensor:
    """Inverse of :func:`pack_bitplanes`.

    Args:
        qweight: int32 [bits, out, ceil(in_features / 32)].
        in_features: number of real input columns (padding is dropped).
    Returns:
        uint8 [out, in_features].
    """
    if qweight.dim() != 3 or qweight.dtype != torch.int32:
        raise ValueError(
            f"unpack_bitplanes: qweight must be int32 [bits, out, words], got {qweight.dtype} {tuple(qweight.shape)}"
        )
    bits, out_f, n_words = qweight.shape
    if n_words != packed_words(in_features):
        raise ValueError(
            f"unpack_bitplanes: qweight has {n_words} words per row but in_features={in_features} "
            f"needs {packed_words(in_features)}"
        )
    cols = torch.arange(WORD_BITS, dtype=torch.int32, device=qweight.device)
    codes = torch.zeros(out_f, n_words * WORD_BITS, dtype=torch.int32, device=qweight.device)
    for b in range(bits):
        # (x >> k) & 1 is bit k even for negative int32 (arithmetic shift), so no widening is needed.
        plane = (qweight[b].unsqueeze(-1) >> cols) & 1  # [out, words, 32]
        codes |= plane.reshape(out_f, -1) << b
    return codes[:, :in_features].to(torch.uint8)
