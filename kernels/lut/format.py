"""The ``lut`` format: non-uniform scalar quantization with a per-output-channel codebook.

A weight [out, in] is stored as ``qweight`` int32 [bits, out, ceil(in/32)] (bit planes, see
:mod:`gq_kernels.packing`) and ``codebook`` fp16 [out, 2^bits]; ``W_hat[r, c] = codebook[r, code[r, c]]``
(:mod:`.reference` is the specification). Produced by SqueezeLLM and LNQ.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from gq_kernels.format import Format, FormatParams, QuantResult, TensorSpec
from gq_kernels.lut import reference as ref
from gq_kernels.packing import WORD_BITS, pack_bitplanes, packed_words, unpack_bitplanes

NAME = "lut"


class LutParams(FormatParams):
    format: ClassVar[str] = NAME
    supported_bits: ClassVar[tuple[int, ...]] = ref.SUPPORTED_BITS
    # Codebooks are per row, never per group; the field exists so that a checkpoint saying otherwise
    # is refused instead of silently misread.
    group_size: Literal[-1] = -1


@dataclass
class LutQuant(QuantResult):
    """codes uint8 [out, in] in [0, 2^bits); codebook float16 [out, 2^bits]."""

    codes: torch.Tensor
    codebook: torch.Tensor
    bits: int

    format: ClassVar[str] = NAME
    tunable: ClassVar[tuple[str, ...]] = ("codebook",)

    def params(self) -> LutParams:
        return LutParams(bits=self.bits)

    def dequantize(self) -> torch.Tensor:
        return ref.dequantize(self.codes, self.codebook)

    def field_specs(self, out_features: int, in_features: int) -> dict:
        return {"codes": ((out_features, in_features), torch.uint8),
                "codebook": ((out_features, 1 << self.bits), torch.float16)}


class LutFormat(Format):
    name = NAME
    Params = LutParams
    Result = LutQuant

    def tensors(self, params: LutParams, out_features: int, in_features: int) -> dict[str, TensorSpec]:
        return {
            "qweight": TensorSpec((params.bits, out_features, packed_words(in_features)), torch.int32,
                                  out_dim=1, in_dim=2, in_unit=WORD_BITS),
            # One codebook per row: a rank holding some columns of a row needs all of it.
            "codebook": TensorSpec((out_features, 1 << params.bits), torch.float16, out_dim=0),
        }

    def pack(self, result: LutQuant) -> dict[str, torch.Tensor]:
        return {"qweight": pack_bitplanes(result.codes.cpu(), result.bits),
                "codebook": result.codebook.cpu().contiguous()}

    def unpack(self, tensors: dict[str, torch.Tensor], params: LutParams, in_features: int) -> LutQuant:
        return LutQuant(unpack_bitplanes(tensors["qweight"], in_features), tensors["codebook"], params.bits)

    def dequantize(self, tensors: dict[str, torch.Tensor], params: LutParams, in_features: int) -> torch.Tensor:
        return ref.dequantize_packed(tensors["qweight"], tensors["codebook"], in_features)

    def slice_columns(self, tensors, params, in_features, start, length):
        # A codebook lookup is per element: any column range is a valid lut linear.
        codes = unpack_bitplanes(tensors["qweight"], in_features)[:, start:start + length]
        return {"qweight": pack_bitplanes(codes, params.bits), "codebook": tensors["codebook"]}
