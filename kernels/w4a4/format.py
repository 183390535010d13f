"""The ``w4a4`` format (SpinQuant): integer weights *and* integer activations, a low-bit KV cache.

Per quantized linear [out, in]:

- ``qweight`` uint8 [out, ceil(in/2)]: symmetric ``bits``-bit codes, two per byte (low nibble first);
- ``scale`` fp16 [out]: one scale per output channel, or fp16 [out, in / weight_group_size] with
  ``weight_group_size`` (one per output channel and group of that many input columns);
- ``layout`` int32 [2]: (1 when the input is rotated by the Hadamard R_in before it is quantized
  (down_proj, SpinQuant's R4), the activation group size: 0 = one group per token, else columns per
  group (o_proj: head_dim, one group per attention head)). It describes this linear alone, so a
  loader needs no module names.

- ``act_clip`` float32 [1], only when ``per_linear_act_clip``: this linear's activation clip ratio
  (``gq quantize --per-linear-act-clip`` chooses it). Linears fed the same input (q/k/v) may hold
  different ratios, each quantizing that input its own way (``differs_by_part``).

Checkpoint-wide parameters: ``bits``, ``weight_group_size``, ``act_bits`` / ``act_clip``
(activations; ``act_clip`` is every linear's ratio unless ``per_linear_act_clip``) and ``kv_bits`` /
``kv_clip`` / ``kv_group_size`` (the KV cache, :mod:`.kvcache`: 0 = one range per token and head).
The rotations R1 / R2 are folded into the dense weights and the embeddings of the checkpoint, and
RMSNorm gains are 1 (unless ``--finetune-norms`` tuned them: dense tensors like any other);
:mod:`.reference` is the specification.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from pydantic import Field, field_validator

from gq_kernels.format import Format, FormatParams, QuantResult, TensorSpec, head_dim
from gq_kernels.hadamard import hadamard_transform, has_hadamard
from gq_kernels.w4a4 import reference as ref

NAME = "w4a4"


class W4A4Params(FormatParams):
    format: ClassVar[str] = NAME
    supported_bits: ClassVar[tuple[int, ...]] = ref.SUPPORTED_BITS
    act_bits: int = 4
    act_clip: float = Field(1.0, gt=0, le=1)
    kv_bits: int = 4
    kv_clip: float = Field(1.0, gt=0, le=1)
    per_linear_act_clip: bool = False
    weight_group_size: int = Field(0, ge=0)  # 0: one weight scale per output channel
    kv_group_size: int = Field(0, ge=0)      # 0: one KV range per (token, head)

    @field_validator("act_bits")
    @classmethod
    def _act_bits(cls, v: int) -> int:
        if v not in ref.ACT_BITS:
            raise ValueError(f"act_bits must be one of {list(ref.ACT_BITS)}, got {v}")
        return v

    @field_validator("kv_bits")
    @classmethod
    def _kv_bits(cls, v: int) -> int:
        if v not in ref.KV_BITS:
            raise ValueError(f"kv_bits must be one of {list(ref.KV_BITS)}, got {v}")
        return v


@dataclass
class W4A4Quant(QuantResult):
    """codes int8 [out, in] (symmetric, in the input basis the layer quantizes: ``x R_in`` when
    ``input_hadamard``); scale float16 [out], or [out, in / weight_group_size] with weight groups."""

    codes: torch.Tensor
    scale: torch.Tensor
    bits: int
    input_hadamard: bool = False
    act_group_size: int = 0
    act_bits: int = 4
    act_clip: float = 1.0
    kv_bits: int = 4
    kv_clip: float = 1.0
    per_linear_act_clip: bool = False
    linear_act_clip: float | None = None  # this linear's ratio (per_linear_act_clip; None: act_clip)
    weight_group_size: int = 0
    kv_group_size: int = 0

    format: ClassVar[str] = NAME
    # The per-channel (per-group) weight scales; the activation and KV ranges are computed online.
    tunable: ClassVar[tuple[str, ...]] = ("scale",)
    tunable_log: ClassVar[tuple[str, ...]] = ("scale",)
    finetune_lr: ClassVar[float] = 1e-3   # docs/w4a4.md, "Fine-tuning the scales"

    def params(self) -> W4A4Params:
        return W4A4Params(bits=self.bits, act_bits=self.act_bits, act_clip=self.act_clip,
                          kv_bits=self.kv_bits, kv_clip=self.kv_clip, per_linear_act_clip=self.per_linear_act_clip,
                          weight_group_size=self.weight_group_size, kv_group_size=self.kv_group_size)

    def own_act_clip(self) -> float:
        """The activation clip ratio this linear is served with."""
        return self.linear_act_clip if self.per_linear_act_clip and self.linear_act_clip is not None else self.act_clip

    def dequantize(self) -> torch.Tensor:
        return effective_weight(self.codes, self.scale, self.input_hadamard)

    def train_forward(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        # The served function, its input quantized at this linear's own ratio; the rounding passes
        # gradients straight through to the layers before.
        return ref.matmul(x, self.codes, self.scale, self.act_bits, self.act_group_size, self.input_hadamard,
                          self.own_act_clip(), bias, ste=True)

    def field_specs(self, out_features: int, in_features: int) -> dict:
        return {"codes": ((out_features, in_features), torch.int8),
                "scale": (scale_shape(out_features, in_features, self.weight_group_size), torch.float16)}


def scale_shape(out_features: int, in_features: int, weight_group_size: int) -> tuple[int, ...]:
    """The ``scale`` tensor's shape: [out], or [out, in / weight_group_size]."""
    return (out_features,) if not weight_group_size else (out_features, in_features // weight_group_size)


def effective_weight(codes: torch.Tensor, scale: torch.Tensor, input_hadamard: bool) -> torch.Tensor:
    """The weight the layer applies to its *unrotated* input, float32 [out, in]: ``s q`` or, with an
    input Hadamard, ``(s q) R_in^T`` (what a weight-only view of the layer sees; activation
    quantization comes on top, see :func:`gq_kernels.w4a4.reference.matmul`)."""
    w = ref.dequantize_weight(codes, scale)
    return hadamard_transform(w, transpose=True) if input_hadamard else w


def layer_layout(name: str, model_config) -> tuple[bool, int]:
    """SpinQuant's per-layer choices for a Llama-family linear ``name``: (input Hadamard R4 on
    down_proj, activation groups of head_dim on o_proj: one per attention head); (False, 0) else."""
    if name.endswith("mlp.down_proj"):
        return True, 0
    if name.endswith("self_attn.o_proj"):
        return False, head_dim(model_config)
    return False, 0


def read_layout(layout: torch.Tensor) -> tuple[bool, int]:
    """(input_hadamard, act_group_size) from a ``layout`` tensor."""
    vals = [int(v) for v in layout.tolist()]
    return bool(vals[0]), vals[1]


def read_act_clip(tensors: dict[str, torch.Tensor], params: W4A4Params) -> float:
    """The activation clip ratio of one linear: its ``act_clip`` tensor, or the checkpoint's."""
    return float(tensors["act_clip"].reshape(-1)[0]) if params.per_linear_act_clip else params.act_clip


class W4A4Format(Format):
    name = NAME
    Params = W4A4Params
    Result = W4A4Quant
    weight_only = False
    # Whether input columns [start, start + length) are a w4a4 linear depends on ``layout``: an input
    # Hadamard mixes all columns and per-token activation ranges span them (slice_columns).
    columns_split_by_spec = False

    def tensors(self, params: W4A4Params, out_features: int, in_features: int) -> dict[str, TensorSpec]:
        specs = {
            "qweight": TensorSpec((out_features, (in_features + 1) // 2), torch.uint8, out_dim=0, in_dim=1, in_unit=2),
            "scale": TensorSpec(scale_shape(out_features, in_features, params.weight_group_size), torch.float16,
                                out_dim=0, **({} if not params.weight_group_size else
                                              dict(in_dim=1, in_unit=params.weight_group_size))),
            "layout": TensorSpec((2,), torch.int32, out_dim=None),
        }
        if params.per_linear_act_clip:
            specs["act_clip"] = TensorSpec((1,), torch.float32, out_dim=None, differs_by_part=True)
        return specs

    def pack(self, result: W4A4Quant) -> dict[str, torch.Tensor]:
        out = {"qweight": ref.pack_int4(result.codes.cpu()), "scale": result.scale.cpu().contiguous(),
               "layout": torch.tensor([int(result.input_hadamard), result.act_group_size], dtype=torch.int32)}
        if result.per_linear_act_clip:
            out["act_clip"] = torch.tensor([result.own_act_clip()], dtype=torch.float32)
        return out

    def unpack(self, tensors: dict[str, torch.Tensor], params: W4A4Params, in_features: int) -> W4A4Quant:
        had, group = read_layout(tensors["layout"])
        return W4A4Quant(ref.unpack_int4(tensors["qweight"], in_features), tensors["scale"], params.bits,
                         input_hadamard=had, act_group_size=group, act_bits=params.act_bits,
                         act_clip=params.act_clip, kv_bits=params.kv_bits, kv_clip=params.kv_clip,
                         per_linear_act_clip=params.per_linear_act_clip,
                         linear_act_clip=read_act_clip(tensors, params) if params.per_linear_act_clip else None,
                         weight_group_size=params.weight_group_size, kv_group_size=params.kv_group_size)

    def dequantize(self, tensors: dict[str, torch.Tensor], params: W4A4Params, in_features: int) -> torch.Tensor:
        had, _ = read_layout(tensors["layout"])
        return effective_weight(ref.unpack_int4(tensors["qweight"], in_features), tensors["scale"], had)

    def matmul(self, x, tensors, params: W4A4Params, in_features, bias=None):
        had, group = read_layout(tensors["layout"])
        return ref.matmul(x, ref.unpack_int4(tensors["qweight"], in_features), tensors["scale"], params.act_bits,
                          group, had, read_act_clip(tensors, params), bias)

    def check_tensors(self, tensors, params, out_features, in_features, prefix=""):
        self.check_shape(params, out_features, in_features)
        super().check_tensors(tensors, params, out_features, in_features, prefix)
        had, group = read_layout(tensors["layout"])
        if group < 0 or (group and in_features % group):
            raise ValueError(f"{self.name}: {prefix}layout: activation group size {group} does not divide "
                             f"the input size {in_features}")
        try:
            ref.gemm_group_size(in_features, group, params.weight_group_size)
        except ValueError as e:
            raise ValueError(f"{self.name}: {prefix}layout: {e}") from None
        if had and not has_hadamard(in_features):
            raise ValueError(f"{self.name}: {prefix}layout asks for an input Hadamard of size {in_features}, "
                             "which has no Hadamard construction")
        if params.per_linear_act_clip:
            clip = float(tensors["act_clip"][0])
            if not 0 < clip <= 1:
                raise ValueError(f"{self.name}: {prefix}act_clip is {clip}; a clip ratio lies in (0, 1] "
                                 "(re-export the checkpoint)")

    def check_shape(self, params, out_features, in_features):
        gw = params.weight_group_size
        if gw and in_features % gw:
            raise ValueError(f"{self.name}: weight groups of {gw} columns do not divide the input size {in_features}; "
                             "quantize with a --weight-group that divides every linear's input size")

    def slice_columns(self, tensors, params: W4A4Params, in_features, start, length):
        """The linear of input columns [start, start + length): only when the layer has no input
        Hadamard (R_in mixes every column) and its activations are quantized per group of columns
        with the range on group boundaries (per-token ranges span every column), or not at all."""
        had, group = read_layout(tensors["layout"])
        if had:
            return None
        if params.act_bits < 16 and (group == 0 or start % group or length % group):
            return None
        gw = params.weight_group_size
        if gw and (start % gw or length % gw):
            return None
        codes = ref.unpack_int4(tensors["qweight"], in_features)[:, start:start + length]
        layout = tensors["layout"].clone()
        if group and (start % group or length % group):
            layout[1] = 0  # activations in floating point (act_bits 16): the groups do not matter
        scale = tensors["scale"].clone() if not gw else tensors["scale"][:, start // gw:(start + length) // gw].clone()
        out = {"qweight": ref.pack_int4(codes), "scale": scale, "layout": layout}
        if params.per_linear_act_clip:
            out["act_clip"] = tensors["act_clip"].clone()
        return out

    def kv_cache_bits(self, params: W4A4Params) -> int | None:
        return params.kv_bits if params.kv_bits < 16 else None

    def example_tensors(self, params, out_features, in_features, generator, name="", model_config=None):
        lo, hi = ref.weight_range(params.bits)
        dev = generator.device
        codes = torch.randint(lo, hi + 1, (out_features, in_features), generator=generator, dtype=torch.int8, device=dev)
        shape = scale_shape(out_features, in_features, params.weight_group_size)
        scale = (torch.rand(shape, generator=generator, device=dev) * 0.004 + 0.002).half()
        had, group = layer_layout(name, model_config) if model_config is not None else (False, 0)
        out = {"qweight": ref.pack_int4(codes), "scale": scale,
               "layout": torch.tensor([int(had), group], dtype=torch.int32, device=dev)}
        if params.per_linear_act_clip:
            out["act_clip"] = torch.tensor([params.act_clip], dtype=torch.float32, device=dev)
        return out

    def kv_cache(self, params: W4A4Params, model_config, store: bool = True, ste: bool = False):
        """A transformers cache holding ``kv_bits``-bit keys and values (None at 16 bits)."""
        if params.kv_bits >= 16:
            return None
        from gq_kernels.w4a4.kvcache import QuantizedKVCache

        dim = head_dim(model_config)
        if not has_hadamard(dim):
            raise ValueError(f"{self.name}: the {params.kv_bits}-bit KV cache rotates keys by a Hadamard of head_dim "
                             f"{dim}, which has no construction; export with kv_bits 16")
        ref.check_kv_group(params.kv_group_size, dim)
        return QuantizedKVCache(model_config.num_hidden_layers, params.kv_bits, params.kv_clip, store=store, ste=ste,
                                group_size=params.kv_group_size)
