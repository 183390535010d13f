"""``lut`` on the CPU: the packed codes read in place, one table of 2^bits values per output row.

The table is the row's fp16 codebook widened to fp32 and rounded to the activation dtype (the
reference multiplies by ``W_hat.to(x.dtype)``), made once in ``prepare``: 64 bytes per row at
4 bits. The GEMV, the tiled prefill path and the variants are :mod:`gq_kernels.cpu.kernel`'s.
"""
from __future__ import annotations

from gq_kernels.cpu.kernel import BitplaneCpuKernel
from gq_kernels.cpu.q8 import BitplaneQ8CpuKernel
from gq_kernels.lut.format import NAME


class LutCpuKernel(BitplaneCpuKernel):
    formats = (NAME,)

    def prepare(self, tensors):
        table = tensors["codebook"].float().to(self.dtype).float().contiguous()
        return {"qweight": tensors["qweight"].contiguous(), "table": table}


class LutCpuAvx512Kernel(LutCpuKernel):
    name, isa = "lut-cpu-avx512", "avx512"


class LutCpuAvx2Kernel(LutCpuKernel):
    name, isa = "lut-cpu-avx2", "avx2"


class LutCpuPortableKernel(LutCpuKernel):
    name, isa = "lut-cpu-portable", "portable"


class LutCpuQ8Kernel(BitplaneQ8CpuKernel, LutCpuKernel):
    """Int8 activations (gq_kernels.cpu.q8): by name only, ``--kernel lut-cpu-q8``."""

    name = "lut-cpu-q8"
