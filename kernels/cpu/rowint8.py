"""Int8 weights with one fp32 scale per output row, multiplied on the CPU without widening the
matrix: the kernel behind ``--head int8`` (:mod:`gq_serve.head`), for the lm_head, the largest
matrix a decode step reads (SmolLM2: 49152 x 576, 113 MB in fp32, 28 MB in int8).

``quantize_rows`` is symmetric absmax rounding per row (codes in [-127, 127]); ``dequantize_rows``
is the specification, ``x @ dequantize_rows(q, s).T`` what :func:`int8_matmul` computes (up to
summation order). The extension's GEMV (``csrc/rowint8_isa.cpp``) serves up to 8 activation rows
reading each int8 weight once; more rows multiply 4 MiB fp32 tiles with ``at::mm``. Without the
extension (no compiler) or off the CPU, the reference runs instead.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from gq_kernels.cpu import build, features
from gq_kernels.cpu.kernel import ISA_CODES

PREFERENCE = ("avx512", "avx2", "portable")


def quantize_rows(w: torch.Tensor, chunk_bytes: int = 16 << 20) -> tuple[torch.Tensor, torch.Tensor]:
    """w float [n, k] -> (q int8 [n, k] in [-127, 127], scale fp32 [n]); a zero row gets scale 1.
    Rows go ``chunk_bytes`` of fp32 at a time, so that rounding a 262 MB head does not briefly need
    three more copies of it."""
    n, k = w.shape
    q = torch.empty((n, k), dtype=torch.int8, device=w.device)
    scale = torch.empty(n, dtype=torch.float32, device=w.device)
    step = max(1, chunk_bytes // (4 * max(k, 1)))
    for r0 in range(0, n, step):
        block = w[r0:r0 + step].float()
        amax = block.abs().amax(dim=1) if k else torch.zeros(block.shape[0], device=w.device)
        s = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
        q[r0:r0 + step] = torch.round(block / s[:, None]).clamp_(-127, 127).to(torch.int8)
        scale[r0:r0 + step] = s
    return q, scale


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The specification: fp32 [n, k] = scale[:, None] * q."""
    return q.float() * scale.float()[:, None]


def best_isa() -> tuple[str | None, str | None]:
    """(the fastest variant this machine runs, None) or (None, why the extension cannot serve)."""
    ok, why = build.status()
    if not ok:
        return None, why
    for isa in PREFERENCE:
        if features.isa_support(isa)[0]:
            return isa, None
    return None, "no variant of the CPU kernels runs here"  # unreachable: portable needs no flags


def int8_matmul(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, isa: str | None) -> torch.Tensor:
    """x [..., k] -> [..., n] in x's dtype; ``isa`` from :func:`best_isa` (which loads the extension:
    not here, so that torch.compile traces this call as one op), None runs the reference."""
    if isa is None or x.device.type != "cpu":
        return F.linear(x, dequantize_rows(q, scale).to(x.dtype))
    return torch.ops.gq_cpu.int8_matmul(x, q, scale, ISA_CODES[isa])
