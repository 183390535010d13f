"""The base of the packed-weight CPU kernels: bit-plane codes read straight from the checkpoint
layout (:mod:`gq_kernels.packing`), decoded in registers, never a dense copy of the weight.

A format's package subclasses :class:`BitplaneCpuKernel` once per variant (``<fmt>-cpu-avx512``,
``<fmt>-cpu-avx2``, ``<fmt>-cpu-portable``; registered in that order of preference) and says in
``prepare`` how a code becomes a value: a table per output row (``table`` fp32 [N, 2^bits], rounded
to the activation dtype) or a scale and offset per row and group (``scales``, ``offsets`` fp16).

Per call (``torch.ops.gq_cpu.bitplane_matmul``): up to :data:`GEMV_MAX_ROWS` activation rows run
the GEMV (the memory-bound decode case: each weight is read once, as its packed bits); more rows
(prefill, big batches) dequantize one tile of output rows at a time (at most 4 MiB of fp32) and
multiply it with ``at::mm``. Output rows are split over torch's intra-op threads. fp32, bf16 and
fp16 activations are served: x is widened to fp32, values are rounded to x's dtype, products
accumulate in fp32, so the result is the reference's ``x @ W_hat.to(x.dtype).T`` up to summation
order.
"""
from __future__ import annotations

from typing import ClassVar

import torch

from gq_kernels.cpu import build, features
from gq_kernels.kernel import LinearKernel, n_rows

GEMV_MAX_ROWS = 8  # csrc/bitplane.h kMaxRows
MAX_BITS = 4  # a 2^bits table fits one 16-lane register
TILE_BYTES = 4 << 20  # csrc/ops.cpp kTileBytes
ISA_CODES = {"portable": 0, "avx2": 1, "avx512": 2}


class CpuKernel(LinearKernel):
    """A kernel of the CPU extension, one class per instruction-set variant (``isa``): it serves
    on the CPU when the CPU runs that variant and the extension builds (the reason when not)."""

    isa: ClassVar[str]

    @classmethod
    def layer_ok(cls, layer) -> tuple[bool, str | None]:
        """What the variant needs of the layer beyond its format (default: nothing)."""
        return True, None

    @classmethod
    def can_implement(cls, layer, device, dtype, rows=None):
        ok, why = super().can_implement(layer, device, dtype, rows)
        if not ok:
            return ok, why
        if torch.device(device).type != "cpu":
            return False, f"needs the CPU, got {torch.device(device).type}"
        ok, why = cls.layer_ok(layer)
        if not ok:
            return False, why
        ok, why = features.isa_support(cls.isa)
        if not ok:
            return False, why
        return build.status()  # builds the extension on first use; (False, why) when it cannot


class BitplaneCpuKernel(CpuKernel):
    """One variant (``isa``) of a format's CPU kernel. Subclasses set ``name``, ``formats``,
    ``isa`` and implement ``prepare`` (returning ``qweight`` plus ``table`` or ``scales`` and
    ``offsets``); ``group_size`` is read from the layer's params when it has one."""

    @classmethod
    def layer_ok(cls, layer):
        if not 1 <= layer.params.bits <= MAX_BITS:
            return False, f"serves 1..{MAX_BITS} bits (a 2^bits table in one SIMD register), got {layer.params.bits}"
        return True, None

    @property
    def isa_code(self) -> int:
        """The variant the fp32 operators run (the extension's code for ``isa``)."""
        return ISA_CODES[self.isa]

    @property
    def group_size(self) -> int:
        return getattr(self.layer.params, "group_size", -1)

    def path(self, x: torch.Tensor) -> str:
        return f"{self.name}:{'gemv' if n_rows(x) <= GEMV_MAX_ROWS else 'tiled'}"

    def apply(self, tensors, x, bias=None):
        y = torch.ops.gq_cpu.bitplane_matmul(x, *self._decoder(tensors), self.isa_code)
        return y if bias is None else y + bias.to(y.dtype)

    @classmethod
    def shared(cls, members):
        first = members[0][0]
        if not all(isinstance(k, BitplaneCpuKernel) and (k.isa, k.dtype, k.device, k.layer.in_features) ==
                   (first.isa, first.dtype, first.device, first.layer.in_features) for k, _ in members):
            return None
        parts = list(zip(*(k._decoder(t)[:5] for k, t in members)))  # qweights, tables, scales, offsets, sizes
        op, k, isa = torch.ops.gq_cpu.bitplane_matmul_multi, first.layer.in_features, first.isa_code
        qweights, tables, scales, offsets, sizes = (list(p) for p in parts)
        return lambda x: op(x, qweights, tables, scales, offsets, sizes, k, isa)

    def _decoder(self, tensors) -> tuple:
        return (tensors["qweight"], tensors.get("table"), tensors.get("scales"), tensors.get("offsets"),
                self.group_size, self.layer.in_features)

    def apply_out(self, tensors, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``x`` [M, in] @ W_hat.T into ``out`` fp32 [M, out_features] (tests pre-fill it with NaN)."""
        torch.ops.gq_cpu.bitplane_matmul_out(x, *self._decoder(tensors), self.isa_code, out)
        return out

    def dequantize(self, tensors, out: torch.Tensor | None = None) -> torch.Tensor:
        """W_hat fp32 [out, in] from the prepared tensors, rounded to this kernel's dtype."""
        rounding = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}[self.dtype]
        if out is None:
            return torch.ops.gq_cpu.bitplane_dequantize(*self._decoder(tensors), rounding, self.isa_code)
        torch.ops.gq_cpu.bitplane_dequantize_out(*self._decoder(tensors), rounding, self.isa_code, out)
        return out
