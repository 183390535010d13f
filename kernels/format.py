"""What a checkpoint format is: its parameters, the tensors of one quantized linear, the result
type its quantizers return, and its PyTorch reference (the specification every kernel reproduces).

A format is one subclass of :class:`Format` in its own package (``lut/format.py``, ...), registered
in :mod:`gq_kernels.registry`. Everything else (export, checkpoint validation, ``GQLinear``,
transformers loading, the vLLM plugin, the kernels' choice) reads a format through this interface
and never names one.
"""
from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, field_validator


class FormatParams(BaseModel):
    """Parameters shared by every quantized linear of a checkpoint (flat in ``quantization_config``).

    Subclasses set ``format`` (the format they belong to) and ``supported_bits``, and add their
    fields and validators.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    format: ClassVar[str]
    supported_bits: ClassVar[tuple[int, ...]]
    bits: int

    @field_validator("bits")
    @classmethod
    def _supported(cls, v: int) -> int:
        if v not in cls.supported_bits:
            raise ValueError(f"format {cls.format!r} supports bits {list(cls.supported_bits)}, got {v}")
        return v


@dataclass(frozen=True)
class TensorSpec:
    """One checkpoint tensor of a quantized linear (the bias is not one: it stays a dense tensor).

    ``out_dim``: the dimension indexed by output channel (None: the tensor is shared by all rows);
    ``in_dim``: the dimension indexed by input columns in units of ``in_unit`` columns (None: not
    split by column). Loaders slice along them for fused layers and tensor parallelism; an input
    slice is valid on ``in_unit`` boundaries. ``differs_by_part`` (``out_dim`` None only): linears
    that a loader fuses into one layer (q/k/v, gate/up) may hold different values; the fused layer
    then applies each part with its own kernel (otherwise every part must hold the same value).
    """

    shape: tuple[int, ...]
    dtype: torch.dtype
    out_dim: int | None = 0
    in_dim: int | None = None
    in_unit: int = 1
    differs_by_part: bool = False


@dataclass
class QuantResult(ABC):
    """Base of what a quantizer returns for one weight [out, in]: the format's unpacked tensors
    (dataclass fields whose dim 0 is the output channel), its scalar parameters (the other fields),
    and free-form ``stats`` for the manifest.

    Rows of a result are independent, so slicing and concatenating along dim 0 (GuidedQuant's
    output-channel groups) is generic.
    """

    format: ClassVar[str]
    # Float fields an end-to-end fine-tune may change with the codes fixed (quantize/finetune.py);
    # ``train_forward`` (by default through ``dequantize``) must be differentiable in them.
    tunable: ClassVar[tuple[str, ...]] = ()
    # Those of them that are positive scales, tuned as their logarithm: Adam's steps are absolute, and
    # a step that suits one row's scale would be large for a row with a smaller range.
    tunable_log: ClassVar[tuple[str, ...]] = ()
    # The fine-tune's default Adam learning rate for them (for tunable_log fields, a relative step).
    finetune_lr: ClassVar[float] = 3e-4
    stats: dict = field(default_factory=dict, kw_only=True)

    @abstractmethod
    def params(self) -> FormatParams:
        """The format parameters this result was quantized with."""

    @abstractmethod
    def dequantize(self) -> torch.Tensor:
        """W_hat float32 [out, in]: bit for bit what a loaded checkpoint dequantizes to."""

    @abstractmethod
    def field_specs(self, out_features: int, in_features: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Field name -> (shape, dtype) that a result for an [out, in] weight must have."""

    def train_forward(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The layer's output for x [..., in] as the served checkpoint computes it, differentiable in the
        ``tunable`` fields and in x (the end-to-end fine-tune's student). Weight-only formats:
        ``x W_hat^T + b``; formats that also quantize their input override it."""
        return F.linear(x, self.dequantize().to(x.dtype), bias)

    # ------------------------------------------------------------------ generic row handling
    def _tensor_fields(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self) if f.name != "stats" and isinstance(getattr(self, f.name), torch.Tensor)]

    def scalars(self) -> dict:
        """The non-tensor fields (bits, group size, ...) by name."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name != "stats" and not isinstance(getattr(self, f.name), torch.Tensor)}

    def slice_rows(self, r0: int, r1: int) -> "QuantResult":
        """Output channels [r0, r1) as a result of the same type (no stats)."""
        return dataclasses.replace(self, **{n: getattr(self, n)[r0:r1] for n in self._tensor_fields()}, stats={})

    def to(self, device: torch.device | str) -> "QuantResult":
        """The same result with its tensors on ``device`` (stats kept)."""
        return dataclasses.replace(self, **{n: getattr(self, n).to(device) for n in self._tensor_fields()},
                                   stats=self.stats)

    @classmethod
    def concat(cls, parts: list["QuantResult"]) -> "QuantResult":
        """Stack results along the output channels; their scalar fields must agree (no stats)."""
        first = parts[0]
        for p in parts[1:]:
            if type(p) is not type(first) or p.scalars() != first.scalars():
                raise ValueError(f"cannot concatenate {type(p).__name__}{p.scalars()} with "
                                 f"{type(first).__name__}{first.scalars()}")
        return dataclasses.replace(first, **{n: torch.cat([getattr(p, n) for p in parts])
                                             for n in first._tensor_fields()}, stats={})

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensor fields by name (for storing an unfinished run's layers)."""
        return {n: getattr(self, n) for n in self._tensor_fields()}

    def check(self, name: str, params: FormatParams, out_features: int, in_features: int) -> None:
        """Refuse a result that does not fit ``params`` or an [out, in] layer; errors name the field."""
        if self.params() != params:
            raise ValueError(f"{name}: quantized with {_describe(self.params())} but the config says {_describe(params)}")
        for fname, (shape, dtype) in self.field_specs(out_features, in_features).items():
            t = getattr(self, fname)
            if t.dtype != dtype or tuple(t.shape) != tuple(shape):
                raise ValueError(f"{name}: {fname} must be {_dtype_name(dtype)} {list(shape)}, "
                                 f"got {_dtype_name(t.dtype)} {list(t.shape)}")


def head_dim(model_config) -> int:
    """Channels per attention head of a Hugging Face config: its ``head_dim`` where it sets one (Gemma,
    Qwen3 decouple it from the width), else ``hidden_size // num_attention_heads``."""
    return getattr(model_config, "head_dim", None) or model_config.hidden_size // model_config.num_attention_heads


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _describe(params: FormatParams) -> str:
    return ", ".join(f"{k}={v}" for k, v in params.model_dump().items())


class Format(ABC):
    """One checkpoint format. Subclasses set ``name``, ``Params`` and ``Result`` and implement the
    layout (``tensors``), packing and the reference. Instances are stateless."""

    name: ClassVar[str]
    Params: ClassVar[type[FormatParams]]
    Result: ClassVar[type[QuantResult]]
    # False when a range of output rows of a linear is not a linear of this format (e.g. a
    # transform mixes all rows): loaders then keep each fused part's tensors whole and a tensor-
    # parallel rank dequantizes its rows instead of slicing ``out_dim``.
    independent_rows: ClassVar[bool] = True
    # False when a linear of this format also quantizes its input (the reference matmul is then
    # more than ``x @ W_hat^T``): weight-only shortcuts (the ``dense`` kernel) must not serve it.
    weight_only: ClassVar[bool] = True
    # False when whether a range of input columns of a linear is a linear of this format depends on
    # the values of its tensors, not only on the ``TensorSpec`` units (e.g. a ``layout`` tensor that
    # asks for an input transform or an activation range over all columns): loaders then load every
    # column and ask ``slice_columns``, whose None means the range cannot be cut out.
    columns_split_by_spec: ClassVar[bool] = True

    def params(self, **values) -> FormatParams:
        """Validated parameters (a pydantic ValidationError names a bad field)."""
        return self.Params(**values)

    @abstractmethod
    def tensors(self, params: FormatParams, out_features: int, in_features: int) -> dict[str, TensorSpec]:
        """Checkpoint tensor suffix -> spec, for one quantized [out, in] linear."""

    @abstractmethod
    def pack(self, result: QuantResult) -> dict[str, torch.Tensor]:
        """A quantizer result -> the checkpoint tensors (CPU, contiguous)."""

    @abstractmethod
    def unpack(self, tensors: dict[str, torch.Tensor], params: FormatParams, in_features: int) -> QuantResult:
        """Inverse of :meth:`pack`."""

    @abstractmethod
    def dequantize(self, tensors: dict[str, torch.Tensor], params: FormatParams, in_features: int) -> torch.Tensor:
        """The specification: W_hat float32 [out, in] from the checkpoint tensors."""

    def matmul(self, x: torch.Tensor, tensors: dict[str, torch.Tensor], params: FormatParams, in_features: int,
               bias: torch.Tensor | None = None) -> torch.Tensor:
        """Reference ``x @ W_hat.to(x.dtype).T (+ bias)``; x [..., in] -> [..., out] in x's dtype."""
        w = self.dequantize(tensors, params, in_features).to(x.dtype)
        return F.linear(x, w, None if bias is None else bias.to(x.dtype))

    def example_tensors(self, params: FormatParams, out_features: int, in_features: int,
                        generator: torch.Generator, name: str = "", model_config=None) -> dict[str, torch.Tensor] | None:
        """Random valid tensors of an [out, in] linear with realistic magnitudes, on the generator's
        device, for benchmarks; None (the default) when any bit pattern of the integer tensors with
        N(0, 0.02^2) float tensors is. ``name`` / ``model_config``: the module name and HF config,
        for formats whose layers differ by role."""
        return None

    def kv_cache(self, params: FormatParams, model_config, store: bool = True, ste: bool = False):
        """The transformers ``Cache`` a model (HF ``model_config``) of this format must run with,
        or None (the default: any cache). ``store=False``: one that keeps nothing, for
        full-sequence forwards; ``ste``: its rounding passes gradients straight through (with
        ``store=False``, for training). Raises ValueError when the model cannot have it."""
        return None

    def kv_cache_bits(self, params: FormatParams) -> int | None:
        """Bits per K/V element of the cache a model of this format was quantized for (what
        :meth:`kv_cache` builds), or None (the default) when it runs with any floating-point cache.
        Engines that keep their own KV cache (vLLM) read this to say what they cannot reproduce."""
        return None

    def check_shape(self, params: FormatParams, out_features: int, in_features: int) -> None:
        """Raise ValueError (saying why) when this format cannot hold an [out, in] linear."""

    def infer_out_features(self, tensors: dict[str, torch.Tensor], params: FormatParams, in_features: int) -> int:
        """Output channels of a linear from its tensors (for loaders that load a fused part whole):
        the size of ``out_dim`` of a tensor that has one; formats without override it."""
        for name, spec in self.tensors(params, 1, in_features).items():
            if spec.out_dim is not None and name in tensors:
                return int(tensors[name].shape[spec.out_dim])
        raise NotImplementedError(f"format {self.name!r} cannot tell a linear's output size from its tensors")

    def slice_columns(self, tensors: dict[str, torch.Tensor], params: FormatParams, in_features: int,
                      start: int, length: int) -> dict[str, torch.Tensor] | None:
        """The tensors of a standalone linear holding input columns [start, start + length), for a
        tensor-parallel rank whose column range does not fall on the tensors' unit boundaries (or of
        any rank when ``columns_split_by_spec`` is False); None when the format cannot express that
        range. The loader then keeps a dense weight of the columns when the format is
        ``weight_only``; otherwise (the linear also quantizes its input, e.g. over all its columns)
        no column range computes the right function, and the loader keeps the linear whole: every
        rank gathers the full input and computes its share of the output rows."""
        return None

    def check_tensors(self, tensors: dict[str, torch.Tensor], params: FormatParams, out_features: int,
                      in_features: int, prefix: str = "") -> None:
        """Refuse missing, unexpected, mis-shaped or mis-typed tensors; the error names the tensor."""
        want = self.tensors(params, out_features, in_features)
        problems = [f"missing tensor '{prefix}{n}'" for n in want if n not in tensors]
        problems += [f"unexpected tensor '{prefix}{n}'" for n in tensors if n not in want]
        for n, spec in want.items():
            t = tensors.get(n)
            if t is None:
                continue
            if t.dtype != spec.dtype:
                problems.append(f"{prefix}{n}: expected dtype {spec.dtype}, found {t.dtype}")
            elif tuple(t.shape) != spec.shape:
                problems.append(f"{prefix}{n}: expected shape {list(spec.shape)}, found {list(t.shape)}")
        if problems:
            raise ValueError(f"{self.name}: " + "; ".join(problems))


@dataclass(frozen=True)
class LinearSpec:
    """One quantized linear as kernels see it: format parameters and its (local) shape."""

    params: FormatParams
    out_features: int
    in_features: int

    @property
    def format(self) -> str:
        return self.params.format

    def tensors(self) -> dict[str, TensorSpec]:
        from gq_kernels.registry import get_format

        return get_format(self.format).tensors(self.params, self.out_features, self.in_features)
