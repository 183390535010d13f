"""Bit-plane codes times int8 activations on the CPU: the decode GEMV of ``--kernel lut-cpu-q8``.

What llama.cpp does for its k-quants, applied to our codes: the activations are rounded per block of
:data:`BLOCK` columns to int8 with one fp32 scale, each output row's 2^bits values to 256 levels
between the row's smallest and largest (``W ~= tmin + tscale * u``, u uint8), and the products are
integer dot products (AVX-512 VNNI), exact within a block. Two roundings the fp32 kernels do not
make: the result differs from ``x @ W_hat.T`` by far more than summation order (the tests bound
it; docs/results.md measures what it costs in perplexity). Prefill (more than
:data:`~gq_kernels.cpu.kernel.GEMV_MAX_ROWS` rows) stays exact: it runs the fp32 avx512 variant.

The functions below are the specification: :func:`q8_matmul_reference` is what the kernel
computes, up to fp32 summation order across blocks.
"""
from __future__ import annotations

from typing import ClassVar

import torch

from gq_kernels.cpu.kernel import GEMV_MAX_ROWS, ISA_CODES, BitplaneCpuKernel
from gq_kernels.kernel import n_rows
from gq_kernels.packing import unpack_bitplanes

BLOCK = 64  # csrc/bitplane.h kQ8Block
TABLE_BYTES = 16  # a row's uint8 table, padded to 2^4 entries


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x fp32 [m, k] -> (xq int8 [m, blocks * BLOCK], xscale fp32 [m, blocks], xsum fp32 [m]).

    Per block of BLOCK columns: s = amax / 127 (0 for a zero block), xq = round-half-even(x / s)
    clamped to [-127, 127], zero past k; xsum = sum over blocks of s * sum(xq in the block)."""
    m, k = x.shape
    blocks = -(-k // BLOCK)
    xp = torch.zeros(m, blocks * BLOCK, dtype=torch.float32)
    xp[:, :k] = x.float()
    xb = xp.view(m, blocks, BLOCK)
    s = xb.abs().amax(dim=2) / 127
    q = torch.where(s[..., None] > 0, torch.round(xb / torch.where(s > 0, s, 1)[..., None]).clamp(-127, 127),
                    torch.zeros_like(xb))
    xsum = (s * q.sum(dim=2)).sum(dim=1)
    return q.to(torch.int8).view(m, blocks * BLOCK), s, xsum


def table_q8(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """values fp32 [n, 2^bits] -> (table uint8 [n, TABLE_BYTES], tscale fp32 [n], tmin fp32 [n]) with
    values ~= tmin + tscale * table: 256 levels from the row's smallest to its largest value (both
    exact); a row of one value gets tscale 0."""
    values = values.float()
    lo, hi = values.amin(dim=1), values.amax(dim=1)
    tscale = (hi - lo) / 255
    u = torch.round((values - lo[:, None]) / torch.where(tscale > 0, tscale, 1)[:, None]).clamp(0, 255)
    table = torch.zeros(values.shape[0], TABLE_BYTES, dtype=torch.uint8)
    table[:, :values.shape[1]] = u.to(torch.uint8)
    return table, tscale.contiguous(), lo.contiguous()


def q8_matmul_reference(x: torch.Tensor, qweight: torch.Tensor, table: torch.Tensor, tscale: torch.Tensor,
                        tmin: torch.Tensor, in_features: int) -> torch.Tensor:
    """The specification: x fp32 [m, k] -> y fp32 [m, n] as the int8-activation kernel computes it:
    the codes' uint8 values as dense rows (:func:`dense_q8_reference`)."""
    codes = unpack_bitplanes(qweight, in_features).long()  # [n, k]
    u = torch.zeros(codes.shape[0], -(-in_features // BLOCK) * BLOCK, dtype=torch.uint8)
    u[:, :in_features] = torch.gather(table, 1, codes)
    return dense_q8_reference(x, u, tscale, tmin, in_features)


def dense_q8(q: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Int8 rows (``rowint8.quantize_rows``: W = scale * q) -> (u uint8 [n, k padded to BLOCK], tscale,
    tmin) with W = tmin + tscale * u: u = q + 128, tscale = scale, tmin = -128 scale."""
    n, k = q.shape
    u = torch.zeros(n, -(-k // BLOCK) * BLOCK, dtype=torch.uint8)
    u[:, :k] = (q.to(torch.int16) + 128).to(torch.uint8)
    return u, scale.float().contiguous(), (-128 * scale.float()).contiguous()


def dense_q8_reference(x: torch.Tensor, u: torch.Tensor, tscale: torch.Tensor, tmin: torch.Tensor,
                       in_features: int) -> torch.Tensor:
    """The specification of :func:`dense_q8_matmul`'s GEMV: x fp32 [m, k] -> y fp32 [m, n]."""
    xq, xscale, xsum = quantize_activations(x)
    blocks = xscale.shape[1]
    # Integer sums per block (exact in float64), then scaled per block and summed.
    acc = torch.einsum("mbc,nbc->mnb", xq.double().view(-1, blocks, BLOCK), u.double().view(-1, blocks, BLOCK))
    y = (acc * xscale.double()[:, None, :]).sum(dim=2) * tscale.double() + tmin.double() * xsum.double()[:, None]
    return y.float()


def dense_q8_matmul(x: torch.Tensor, u: torch.Tensor, tscale: torch.Tensor, tmin: torch.Tensor,
                    in_features: int, max_rows: int | None = GEMV_MAX_ROWS) -> torch.Tensor:
    """x [..., k] -> [..., n] in x's dtype: up to ``max_rows`` rows (None: any number) with int8
    activations (the extension's ``dense_q8_matmul``), more rows exactly (x @ (scale * q).T, 4 MiB of
    fp32 weights at a time)."""
    rows = n_rows(x)
    if 0 < rows and (max_rows is None or rows <= max_rows):
        return torch.ops.gq_cpu.dense_q8_matmul(x, u, tscale, tmin, in_features)
    x2 = x.reshape(-1, in_features)
    out = x2.new_empty((x2.shape[0], u.shape[0]))
    step = max(1, (4 << 20) // (4 * max(in_features, 1)))
    for r0 in range(0, u.shape[0], step):
        w = (u[r0:r0 + step, :in_features].float() - 128) * tscale[r0:r0 + step, None]
        out[:, r0:r0 + step] = x2 @ w.to(x.dtype).T
    return out.view(*x.shape[:-1], u.shape[0])


class BitplaneQ8CpuKernel(BitplaneCpuKernel):
    """Int8 activations for up to GEMV_MAX_ROWS rows; more rows (prefill) run the exact fp32
    ``avx512`` operators. Chosen by name only (``--kernel``): it changes the numbers. A format's
    subclass comes before its fp32 kernel class in the bases, whose ``prepare`` makes the fp32
    ``table`` this class rounds to uint8."""

    isa = "avx512vnni"
    auto: ClassVar[bool] = False
    fp32_isa: ClassVar[str] = "avx512"
    # Calls of up to this many rows take int8 activations; None: every call (scripts/q8_quality.py
    # measures the decode numerics' perplexity that way, on whole windows).
    q8_max_rows: ClassVar[int | None] = GEMV_MAX_ROWS

    @classmethod
    def _q8(cls, x: torch.Tensor) -> bool:
        rows = n_rows(x)
        return rows > 0 and (cls.q8_max_rows is None or rows <= cls.q8_max_rows)

    @property
    def isa_code(self) -> int:
        return ISA_CODES[self.fp32_isa]

    def prepare(self, tensors):
        out = super().prepare(tensors)
        out["table_q8"], out["tscale"], out["tmin"] = table_q8(out["table"])
        return out

    def path(self, x: torch.Tensor) -> str:
        return f"{self.name}:{'gemv-q8' if self._q8(x) else 'tiled'}"

    def apply(self, tensors, x, bias=None):
        if not self._q8(x):
            return super().apply(tensors, x, bias)
        y = torch.ops.gq_cpu.bitplane_q8_matmul_multi(x, [tensors["qweight"]], [tensors["table_q8"]],
                                                      [tensors["tscale"]], [tensors["tmin"]], self.layer.in_features)
        return y if bias is None else y + bias.to(y.dtype)

    @classmethod
    def shared(cls, members):
        first = members[0][0]
        if not all(isinstance(k, BitplaneQ8CpuKernel) and (k.dtype, k.device, k.layer.in_features) ==
                   (first.dtype, first.device, first.layer.in_features) for k, _ in members):
            return None
        exact = super().shared(members)
        parts = [[t[name] for _, t in members] for name in ("qweight", "table_q8", "tscale", "tmin")]
        op, k = torch.ops.gq_cpu.bitplane_q8_matmul_multi, first.layer.in_features
        return lambda x: op(x, *parts, k) if cls._q8(x) else exact(x)
