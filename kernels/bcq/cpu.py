"""``bcq`` on the CPU: the packed codes read in place; per output row and group the 2^bits values
``s * q + o`` are formed in registers from the fp16 scale and offset (fp32 multiply, then add, as
the reference does) and rounded to the activation dtype, so nothing is stored beyond the
checkpoint's tensors. The GEMV, the tiled prefill path and the variants are
:mod:`gq_kernels.cpu.kernel`'s.
"""
from __future__ import annotations

from gq_kernels.bcq.format import NAME
from gq_kernels.cpu.kernel import BitplaneCpuKernel


class BcqCpuKernel(BitplaneCpuKernel):
    formats = (NAME,)

    def prepare(self, tensors):
        return {name: tensors[name].contiguous() for name in ("qweight", "scales", "offsets")}


class BcqCpuAvx512Kernel(BcqCpuKernel):
    name, isa = "bcq-cpu-avx512", "avx512"


class BcqCpuAvx2Kernel(BcqCpuKernel):
    name, isa = "bcq-cpu-avx2", "avx2"


class BcqCpuPortableKernel(BcqCpuKernel):
    name, isa = "bcq-cpu-portable", "portable"
