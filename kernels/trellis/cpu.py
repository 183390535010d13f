"""``trellis`` on the CPU: the packed streams decoded tile by tile inside the GEMV, never a dense copy.

Per call, three operators of :mod:`gq_kernels.cpu.build`'s extension: ``gq_cpu::hadamard`` makes
x~ = (x * SU) R_n in fp32, ``gq_cpu::trellis_matmul`` x~ W_code^T, ``gq_cpu::hadamard`` again R_m^T
(per ``out_rht_blocks`` block) and ``SV * Wscale``, as :func:`gq_kernels.trellis.reference.matmul`.
Up to 8 activation rows run the GEMV (each tile decoded once, multiplied with every row); more rows
decode a block of tile rows at a time (at most 4 MiB of fp32) and multiply it with ``at::mm``.
Variants: ``avx512`` decodes 16 states per step and ``avx2`` 8 (hyb: hash and LUT gather; 1mad and
3inst computed in registers, which is faster: docs/results.md, "QTIP"), ``portable`` one state at a
time through the state table. The state table (fp32 [65536, V]) is shared by every layer with the
same code and LUT.
"""
from __future__ import annotations

import functools

import torch

from gq_kernels.cpu.kernel import ISA_CODES, CpuKernel
from gq_kernels.kernel import n_rows
from gq_kernels.hadamard import hadamard_factor, hadamard_k
from gq_kernels.trellis.codes import code_table
from gq_kernels.trellis.format import NAME

GEMV_MAX_ROWS = 8  # csrc/trellis.h kTrellisMaxRows
CODE_IDS = {"hyb": 1, "1mad": 2, "3inst": 3}  # csrc/trellis.h TrellisCode (0: read every code from the table)


@functools.lru_cache(maxsize=8)
def _state_table(code: str, tlut_bytes: bytes | None) -> torch.Tensor:
    tlut = None if tlut_bytes is None else torch.frombuffer(bytearray(tlut_bytes), dtype=torch.float16).reshape(-1, 2)
    return code_table(code, tlut).contiguous()


class TrellisCpuKernel(CpuKernel):
    """One variant (``isa``) of the CPU trellis kernel."""

    formats = (NAME,)

    def path(self, x):
        return f"{self.name}:{'gemv' if n_rows(x) <= GEMV_MAX_ROWS else 'tiled'}"

    def prepare(self, tensors):
        p = self.layer.params
        tlut = tensors.get("tlut") if p.trellis_code == "hyb" else None
        key = None if tlut is None else tlut.to(torch.float16).contiguous().numpy().tobytes()
        out = {"words": tensors["trellis"].contiguous(), "table": _state_table(p.trellis_code, key),
               "su": tensors["SU"].float().contiguous(),
               "svw": (tensors["SV"].float() * tensors["Wscale"].float().reshape(())).contiguous()}
        if tlut is not None:
            out["tlut"] = tlut.to(torch.float16).contiguous().view(torch.int32).reshape(-1)
        for name, size in (("hk_in", self.layer.in_features), ("hk_out", self.layer.out_features // p.out_rht_blocks)):
            K, _ = hadamard_factor(size)
            if K > 1:
                out[name] = hadamard_k(K, torch.float32)
        return out

    def apply(self, tensors, x, bias=None):
        p, ops = self.layer.params, torch.ops.gq_cpu
        m, n = self.layer.out_features, self.layer.in_features
        x2 = x.reshape(-1, n).float().contiguous()
        xr = ops.hadamard(x2, tensors["su"], tensors.get("hk_in"), 1, False, None)
        y = ops.trellis_matmul(xr, tensors["words"], tensors["table"], tensors.get("tlut"), p.kV,
                               CODE_IDS[p.trellis_code], m, ISA_CODES[self.isa])
        y = ops.hadamard(y, None, tensors.get("hk_out"), p.out_rht_blocks, True, tensors["svw"])
        if bias is not None:
            y = y + bias.float()
        return y.to(x.dtype).reshape(*x.shape[:-1], m)


class TrellisCpuAvx512Kernel(TrellisCpuKernel):
    name, isa = "trellis-cpu-avx512", "avx512"


class TrellisCpuAvx2Kernel(TrellisCpuKernel):
    name, isa = "trellis-cpu-avx2", "avx2"


class TrellisCpuPortableKernel(TrellisCpuKernel):
    name, isa = "trellis-cpu-portable", "portable"
