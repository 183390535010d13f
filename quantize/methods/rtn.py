"""RTN: round-to-nearest onto a uniform min/max grid (``bcq`` format), per output channel or per group.

The grid helpers and the grid options are shared with GPTQ so both methods produce the same kind
of grid.
"""
from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import Field

from gq_kernels.bcq.format import UniformQuant
from gq_kernels.bcq.reference import n_groups
from gq_quantize.methods.base import MethodConfig
from gq_quantize.methods.registry import register_method


class UniformGridOptions(MethodConfig):
    """The uniform grid of the ``bcq`` format (RTN, GPTQ)."""

    format: ClassVar[str] = "bcq"
    group_size: int = Field(-1, description="inputs per scale and offset; -1: one pair per output channel")
    sym: bool = Field(False, description="symmetric grid around zero (uniform methods)")
    grid_search: bool = Field(False, description="uniform grids: shrink each min/max range to the one with the "
                                                 "smallest sum |w - q|^2.4 (GPTQ's mse option)")


def uniform_grid(w: torch.Tensor, bits: int, sym: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and offset of a per-row uniform grid covering the values of ``w``.

    Asymmetric: ``offset = min``, ``scale = (max - min) / (2^bits - 1)``.
    Symmetric: the grid is centred on zero, ``scale = 2 absmax / (2^bits - 1)`` and
    ``offset = -scale (2^bits - 1) / 2``; that is the natural symmetric grid of the binary-coded
    form ``sum_i alpha_i (2 b_i - 1)`` (it has no exact zero, but it is symmetric and covers
    [-absmax, absmax] exactly).

    Args:
        w: float [rows, n] -- the values one (row, group) grid must cover.
        bits: code width.
        sym: symmetric grid.
    Returns:
        (scale, offset), each float16 [rows]: rounded to fp16 *here* because the codes must be
        chosen against the grid the checkpoint will actually store.
    """
    maxq = 2**bits - 1
    w = w.float()
    if sym:
        amax = w.abs().amax(dim=1)
        scale = (2.0 * amax / maxq).half()
        offset = (-scale.float() * (maxq / 2.0)).half()
    else:
        lo, hi = w.amin(dim=1), w.amax(dim=1)
        scale = ((hi - lo) / maxq).half()
        offset = lo.half()
    return scale, offset


GRID_SEARCH_STEPS = 100  # shrink factors 1, 0.99, ..., 0.21 (GPTQ's find_params: grid 100, maxshrink 0.8)
GRID_SEARCH_NORM = 2.4


def searched_grid(w: torch.Tensor, bits: int, sym: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """As :func:`uniform_grid`, but each row's range is the min/max shrunk by the factor p in
    {1, 0.99, ..., 0.21} whose grid rounds the row with the smallest sum |w - q|^2.4 (GPTQ's
    reference ``mse`` option; llm-compressor's "mse" observer). Clipping a few outliers buys a
    finer step for every other weight, which matters most at 2-3 bits per channel.
    """
    w = w.float()
    best_err = torch.full((w.shape[0],), float("inf"))
    best_s, best_o = uniform_grid(w, bits, sym)
    lo, hi = w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True)
    for i in range(int(0.8 * GRID_SEARCH_STEPS)):
        p = 1.0 - i / GRID_SEARCH_STEPS
        s, o = uniform_grid(torch.cat([lo * p, hi * p], dim=1), bits, sym)
        q = quantize_to_grid(w, s, o, bits).float() * s.float().unsqueeze(1) + o.float().unsqueeze(1)
        err = (q - w).abs().pow(GRID_SEARCH_NORM).sum(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s, best_o = torch.where(better, s, best_s), torch.where(better, o, best_o)
    return best_s, best_o


def make_grid(w: torch.Tensor, bits: int, sym: bool = False, search: bool = False):
    """:func:`searched_grid` when ``search`` else :func:`uniform_grid`."""
    return searched_grid(w, bits, sym) if search else uniform_grid(w, bits, sym)


def quantize_to_grid(w: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, bits: int) -> torch.Tensor:
    """Nearest code on the grid ``scale * q + offset``.

    Args:
        w: float [rows, n]; scale, offset: float16 (or float) [rows].
    Returns:
        int64 [rows, n] in [0, 2^bits).
    """
    maxq = 2**bits - 1
    s = scale.float().unsqueeze(1)
    o = offset.float().unsqueeze(1)
    # A zero scale (constant row, or a range below fp16's resolution) dequantizes to the offset
    # whatever the code; dividing by 1 instead keeps the codes finite.
    s_safe = torch.where(s == 0, torch.ones_like(s), s)
    return torch.clamp(torch.round((w.float() - o) / s_safe), 0, maxq).long()


def rtn(w: torch.Tensor, bits: int, group_size: int = -1, sym: bool = False, grid_search: bool = False) -> UniformQuant:
    """Round-to-nearest uniform quantization.

    Args:
        w: float32 [out, in].
        bits: code width (2, 3 or 4 for the ``bcq`` kernels).
        group_size: inputs per (scale, offset) pair; -1 = one pair per output channel.
        sym: symmetric grid (see :func:`uniform_grid`).
        grid_search: clip each grid's range (see :func:`searched_grid`).
    Returns:
        UniformQuant with codes uint8 [out, in], scales / offsets float16 [out, G];
        ``stats["sq_error"]`` = ||W - W_hat||_F^2 (float64), i.e. the objective with H = I.
    """
    out_f, in_f = w.shape
    G = n_groups(in_f, group_size)
    gs = in_f if group_size == -1 else group_size
    codes = torch.empty(out_f, in_f, dtype=torch.uint8)
    scales = torch.empty(out_f, G, dtype=torch.float16)
    offsets = torch.empty(out_f, G, dtype=torch.float16)
    for k in range(G):
        cols = slice(k * gs, min((k + 1) * gs, in_f))
        s, o = make_grid(w[:, cols], bits, sym, grid_search)
        scales[:, k], offsets[:, k] = s, o
        codes[:, cols] = quantize_to_grid(w[:, cols], s, o, bits).to(torch.uint8)
    q = UniformQuant(codes=codes, scales=scales, offsets=offsets, bits=bits, group_size=group_size)
    q.stats["sq_error"] = float(((q.dequantize().double() - w.double()) ** 2).sum())
    return q


class RTNConfig(UniformGridOptions):
    """Round to nearest: no calibration data."""

    name: ClassVar[str] = "rtn"


@register_method(RTNConfig)
def quantize_rtn(w: torch.Tensor, hessian, fisher, cfg: RTNConfig) -> UniformQuant:
    return rtn(w, cfg.bits, group_size=cfg.group_size, sym=cfg.sym, grid_search=cfg.grid_search)
