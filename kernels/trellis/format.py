"""The ``trellis`` format: QTIP's bitshift-trellis vector quantization in a random Hadamard basis.

Tensors of one quantized [m, n] linear (:mod:`.reference` is the specification):
``trellis`` int16 [(m/16)(n/16), 16 bits], ``SU`` fp16 [n], ``SV`` fp16 [m], ``Wscale`` fp32 [1] and,
for the ``hyb`` code, ``tlut`` fp16 [512, 2].

The input transform spans every input column and the output transform mixes every output row (of
its block), so neither a row range nor a column range of a trellis linear is a trellis linear: no
tensor declares ``out_dim`` / ``in_dim``, ``independent_rows`` is False (a fused layer keeps each
part's tensors whole; a tensor-parallel rank dequantizes its part) and ``slice_columns`` says None.

Streams use the spec's *plain* layout (row-major inside a tile, words in tile order) for every code;
QTIP's own CUDA kernel layout (mma-fragment order inside a tile, bytes interleaved across 2x2
tiles) is not read: a checkpoint made by QTIP's tools would need its streams converted first.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from pydantic import Field, model_validator

from gq_kernels.format import Format, FormatParams, QuantResult, TensorSpec
from gq_kernels.trellis import reference as ref
from gq_kernels.trellis.codes import CODES, TLUT_BITS, VALUES_PER_STATE
from gq_kernels.hadamard import hadamard_factor

NAME = "trellis"


class TrellisParams(FormatParams):
    format: ClassVar[str] = NAME
    supported_bits: ClassVar[tuple[int, ...]] = ref.SUPPORTED_BITS
    # Which code maps a 16-bit state to values: hyb (V=2, 9-bit LUT), 1mad or 3inst (V=1).
    trellis_code: Literal["hyb", "1mad", "3inst"] = "hyb"
    # Output Hadamard blocks: 1 = one transform over all output rows (QTIP); b > 1 = one transform
    # per block of m/b consecutive rows (exact pairing with GuidedQuant's b groups).
    out_rht_blocks: int = Field(1, ge=1)
    # Fixed by this format; present so a checkpoint saying otherwise is refused, not misread.
    trellis_L: Literal[16] = 16
    tile: Literal[16] = 16

    @property
    def V(self) -> int:
        return VALUES_PER_STATE[self.trellis_code]

    @property
    def kV(self) -> int:
        return self.bits * self.V


def check_shape(params: TrellisParams, out_features: int, in_features: int, name: str = "") -> None:
    """Refuse a linear the format cannot hold; the error names the layer and the size."""
    where = f"{name}: " if name else ""
    for what, size in (("out_features", out_features), ("in_features", in_features)):
        if size % ref.TILE:
            raise ValueError(f"{where}trellis needs {what} to be a multiple of {ref.TILE}, got {size}")
    if out_features % params.out_rht_blocks:
        raise ValueError(f"{where}out_rht_blocks={params.out_rht_blocks} does not divide out_features={out_features}")
    try:
        hadamard_factor(in_features)
        hadamard_factor(out_features // params.out_rht_blocks)
    except ValueError as e:
        raise ValueError(f"{where}{e}") from None


@dataclass
class TrellisQuant(QuantResult):
    """What the QTIP quantizer returns: the checkpoint tensors themselves (trellis int16 [tiles, 16k],
    SU / SV fp16 signs, Wscale fp32 [1], tlut fp16 [512, 2] or [0, 2] for the V=1 codes).

    Rows are *not* independent (the output transform mixes them): slicing rows of this result is
    not a trellis linear, so quantizers must take all GuidedQuant groups at once."""

    trellis: torch.Tensor
    SU: torch.Tensor
    SV: torch.Tensor
    Wscale: torch.Tensor
    tlut: torch.Tensor
    bits: int
    trellis_code: str = "hyb"
    out_rht_blocks: int = 1

    format: ClassVar[str] = NAME

    def params(self) -> TrellisParams:
        return TrellisParams(bits=self.bits, trellis_code=self.trellis_code, out_rht_blocks=self.out_rht_blocks)

    def dequantize(self) -> torch.Tensor:
        return ref.dequantize(self.trellis, self.SU, self.SV, self.Wscale, self._tlut(), self.trellis_code,
                              self.bits, self.out_rht_blocks)

    def _tlut(self):
        return self.tlut if self.trellis_code == "hyb" else None

    def field_specs(self, out_features: int, in_features: int) -> dict:
        tiles = (out_features // ref.TILE) * (in_features // ref.TILE)
        nlut = 1 << TLUT_BITS if self.trellis_code == "hyb" else 0
        return {"trellis": ((tiles, ref.words_per_tile(self.bits)), torch.int16),
                "SU": ((in_features,), torch.float16), "SV": ((out_features,), torch.float16),
                "Wscale": ((1,), torch.float32), "tlut": ((nlut, 2), torch.float16)}

    def slice_rows(self, r0, r1):
        raise NotImplementedError("rows of a trellis result are mixed by the output Hadamard transform; "
                                  "quantize all output-channel groups in one call")


class TrellisFormat(Format):
    name = NAME
    Params = TrellisParams
    Result = TrellisQuant
    independent_rows = False

    def tensors(self, params: TrellisParams, out_features: int, in_features: int) -> dict[str, TensorSpec]:
        tiles = (out_features // ref.TILE) * (in_features // ref.TILE)
        out = {
            "trellis": TensorSpec((tiles, ref.words_per_tile(params.bits)), torch.int16, out_dim=None),
            "SU": TensorSpec((in_features,), torch.float16, out_dim=None),
            "SV": TensorSpec((out_features,), torch.float16, out_dim=None),
            "Wscale": TensorSpec((1,), torch.float32, out_dim=None),
        }
        if params.trellis_code == "hyb":
            out["tlut"] = TensorSpec((1 << TLUT_BITS, 2), torch.float16, out_dim=None)
        return out

    def pack(self, result: TrellisQuant) -> dict[str, torch.Tensor]:
        out = {"trellis": result.trellis, "SU": result.SU, "SV": result.SV, "Wscale": result.Wscale}
        if result.trellis_code == "hyb":
            out["tlut"] = result.tlut
        return {k: v.cpu().contiguous() for k, v in out.items()}

    def unpack(self, tensors: dict[str, torch.Tensor], params: TrellisParams, in_features: int) -> TrellisQuant:
        tlut = tensors.get("tlut", torch.zeros(0, 2, dtype=torch.float16))
        return TrellisQuant(tensors["trellis"], tensors["SU"], tensors["SV"], tensors["Wscale"], tlut, params.bits,
                            params.trellis_code, params.out_rht_blocks)

    def dequantize(self, tensors: dict[str, torch.Tensor], params: TrellisParams, in_features: int) -> torch.Tensor:
        return ref.dequantize(tensors["trellis"], tensors["SU"], tensors["SV"], tensors["Wscale"],
                              tensors.get("tlut"), params.trellis_code, params.bits, params.out_rht_blocks)

    def matmul(self, x, tensors, params: TrellisParams, in_features, bias=None):
        return ref.matmul(x, tensors["trellis"], tensors["SU"], tensors["SV"], tensors["Wscale"], tensors.get("tlut"),
                          params.trellis_code, params.bits, params.out_rht_blocks, bias)

    def example_tensors(self, params, out_features, in_features, generator, name="", model_config=None):
        """Random streams (every one is a valid circular chain), +-1 signs, Wscale 0.02, the default LUT."""
        from gq_kernels.trellis.codes import default_tlut
        from gq_kernels.hadamard import random_signs

        tiles = (out_features // ref.TILE) * (in_features // ref.TILE)
        dev = generator.device
        words = torch.randint(-32768, 32768, (tiles, ref.words_per_tile(params.bits)), generator=generator, device=dev)
        out = {"trellis": words.to(torch.int16), "SU": random_signs(in_features, generator).half(),
               "SV": random_signs(out_features, generator).half(), "Wscale": torch.tensor([0.02], device=dev)}
        if params.trellis_code == "hyb":
            out["tlut"] = default_tlut().to(dev)
        return out

    def check_shape(self, params, out_features, in_features):
        check_shape(params, out_features, in_features)

    def infer_out_features(self, tensors, params, in_features):
        if "SV" not in tensors:
            raise ValueError("trellis: missing tensor 'SV' (the output signs give the layer's size)")
        return int(tensors["SV"].shape[0])

    def check_tensors(self, tensors, params: TrellisParams, out_features, in_features, prefix=""):
        """Shapes and dtypes (the generic check), then the layer's size, then the values a decoder
        relies on: signs are +-1, Wscale and the LUT are finite."""
        try:
            check_shape(params, out_features, in_features)
        except ValueError as e:
            raise ValueError(f"{self.name}: {prefix.rstrip('.') or 'layer'}: {e}") from None
        super().check_tensors(tensors, params, out_features, in_features, prefix)
        problems = []
        for n in ("SU", "SV"):
            if not bool((tensors[n].float().abs() == 1).all()):
                problems.append(f"{prefix}{n}: random signs must be +1 or -1")
        if not bool(torch.isfinite(tensors["Wscale"]).all()) or float(tensors["Wscale"].float().reshape(-1)[0]) <= 0:
            problems.append(f"{prefix}Wscale: must be a finite positive scale, got {tensors['Wscale'].tolist()}")
        if "tlut" in tensors and not bool(torch.isfinite(tensors["tlut"].float()).all()):
            problems.append(f"{prefix}tlut: the LUT holds non-finite values")
        if problems:
            raise ValueError(f"{self.name}: " + "; ".join(problems))
