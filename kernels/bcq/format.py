"""The ``bcq`` format: uniform (binary-coded) scalar quantization with a scale and an offset per
output channel and group of ``group_size`` inputs.

A weight [out, in] is stored as ``qweight`` int32 [bits, out, ceil(in/32)] (bit planes, see
:mod:`gq_kernels.packing`) and ``scales`` / ``offsets`` fp16 [out, G], G = ceil(in / group_size)
(1 when group_size == -1); ``w = s * q + o`` in float32 (:mod:`.reference` is the specification).
Produced by RTN and GPTQ.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from pydantic import field_validator

from gq_kernels.bcq import reference as ref
from gq_kernels.format import Format, FormatParams, QuantResult, TensorSpec
from gq_kernels.packing import WORD_BITS, pack_bitplanes, packed_words, unpack_bitplanes

NAME = "bcq"


class BcqParams(FormatParams):
    format: ClassVar[str] = NAME
    supported_bits: ClassVar[tuple[int, ...]] = ref.SUPPORTED_BITS
    group_size: int = -1  # inputs per (scale, offset); -1 = one pair per output channel

    @field_validator("group_size")
    @classmethod
    def _group_size(cls, v: int) -> int:
        if v != -1 and v < 1:
            raise ValueError(f"group_size must be -1 (per channel) or >= 1, got {v}")
        return v


@dataclass
class UniformQuant(QuantResult):
    """codes uint8 [out, in]; scales, offsets float16 [out, n_groups]; group_size -1 = per channel."""

    codes: torch.Tensor
    scales: torch.Tensor
    offsets: torch.Tensor
    bits: int
    group_size: int = -1

    format: ClassVar[str] = NAME
    tunable: ClassVar[tuple[str, ...]] = ("scales", "offsets")

    def params(self) -> BcqParams:
        return BcqParams(bits=self.bits, group_size=self.group_size)

    def dequantize(self) -> torch.Tensor:
        return ref.dequantize(self.codes, self.scales, self.offsets, self.group_size)

    def field_specs(self, out_features: int, in_features: int) -> dict:
        g = (out_features, ref.n_groups(in_features, self.group_size))
        return {"codes": ((out_features, in_features), torch.uint8),
                "scales": (g, torch.float16), "offsets": (g, torch.float16)}


class BcqFormat(Format):
    name = NAME
    Params = BcqParams
    Result = UniformQuant

    def tensors(self, params: BcqParams, out_features: int, in_features: int) -> dict[str, TensorSpec]:
        gs = params.group_size
        g = (out_features, ref.n_groups(in_features, gs))
        # Per-channel pairs hold for every column (no input dim); group pairs split on group bounds.
        group = dict(in_dim=None) if gs == -1 else dict(in_dim=1, in_unit=gs)
        return {
            "qweight": TensorSpec((params.bits, out_features, packed_words(in_features)), torch.int32,
                                  out_dim=1, in_dim=2, in_unit=WORD_BITS),
            "scales": TensorSpec(g, torch.float16, out_dim=0, **group),
            "offsets": TensorSpec(g, torch.float16, out_dim=0, **group),
        }

    def pack(self, result: UniformQuant) -> dict[str, torch.Tensor]:
        return {"qweight": pack_bitplanes(result.codes.cpu(), result.bits),
                "scales": result.scales.cpu().contiguous(), "offsets": result.offsets.cpu().contiguous()}

    def unpack(self, tensors: dict[str, torch.Tensor], params: BcqParams, in_features: int) -> UniformQuant:
        return UniformQuant(unpack_bitplanes(tensors["qweight"], in_features), tensors["scales"],
                            tensors["offsets"], params.bits, params.group_size)

    def dequantize(self, tensors: dict[str, torch.Tensor], params: BcqParams, in_features: int) -> torch.Tensor:
        return ref.dequantize_packed(tensors["qweight"], tensors["scales"], tensors["offsets"],
                                     params.group_size, in_features)

    def slice_columns(self, tensors, params, in_features, start, length):
        gs = params.group_size
        if gs != -1 and start % gs:
            return None  # the range starts inside a group: no bcq linear of these columns exists
        codes = unpack_bitplanes(tensors["qweight"], in_features)[:, start:start + length]
        out = {"qweight": pack_bitplanes(codes, params.bits)}
        g0 = 0 if gs == -1 else start // gs
        n = ref.n_groups(length, gs)
        for name in ("scales", "offsets"):
            out[name] = tensors[name][:, g0:g0 + n].contiguous()
        return out
