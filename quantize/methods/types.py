"""Results of the layer-wise quantizers: codes plus the per-row parameters of a format."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kernels.bcq import reference as bcq_ref
from kernels.lut import reference as lut_ref


@dataclass
class LutQuant:
    """Non-uniform scalar quantization (``lut`` format).

    codes: uint8 [out, in] in [0, 2^bits); codebook: float16 [out, 2^bits].
    """

    codes: torch.Tensor
    codebook: torch.Tensor
    bits: int
    stats: dict = field(default_factory=dict)

    format = "lut"

    def dequantize(self) -> torch.Tensor:
        """W_hat, float32 [out, in] -- exactly what a loaded checkpoint dequantizes to."""
        return lut_ref.dequantize(self.codes, self.codebook)


@dataclass
class UniformQuant:
    """Uniform scalar quantization (``bcq`` format): w = scale * q + offset per (row, group).

    codes: uint8 [out, in]; scales, offsets: float16 [out, n_groups]; group_size -1 = per channel.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    offsets: torch.Tensor
    bits: int
    group_size: int = -1
    stats: dict = field(default_factory=dict)

    format = "bcq"

    def dequantize(self) -> torch.Tensor:
        """W_hat, float32 [out, in] -- exactly what a loaded checkpoint dequantizes to."""
        return bcq_ref.dequantize(self.codes, self.scales, self.offsets, self.group_size)
