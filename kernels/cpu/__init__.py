"""CPU machinery shared by the formats' CPU kernels: feature detection (:mod:`.features`), the
C++ extension's build and cache (:mod:`.build`), its torch operators (:mod:`.ops`) and the kernel
base class over them (:mod:`.kernel`). No format is named here: a format's package subclasses
:class:`gq_kernels.cpu.kernel.BitplaneCpuKernel` and says how its codes become values."""
