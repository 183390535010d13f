"""The checkpoint's ``config.json["quantization_config"]``: one pydantic model, written by the
exporter and parsed by every loader (checkpoint validation, transformers, the vLLM plugin).

Loader fields are typed and checked, the format's parameters (``bits``, ``group_size``, ...) are
flat keys validated by the format's own ``Params`` model, and the quantizer's provenance (method,
its options, calibration) rides along as extra keys that no loader reads.
"""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, PrivateAttr, ValidationError, field_validator, model_validator

from gq_kernels.format import Format, FormatParams
from gq_kernels.registry import format_names, get_format

QUANT_METHOD = "guidedquant"
FORMAT_VERSION = 1


class QuantizationConfig(BaseModel):
    """``quantization_config`` of a gq checkpoint. Build with :func:`parse_quantization_config` (from
    JSON) or :meth:`for_export` (from a quantization run)."""

    model_config = ConfigDict(extra="allow", frozen=True, strict=True)

    quant_method: str
    format_version: int
    format: str
    # Exact module names that stay dense; every other nn.Linear of the model is quantized.
    modules_to_not_convert: list[str] = []
    # Serving preference: the kernel every layer must use (None: chosen per layer, see gq_kernels.registry).
    kernel: str | None = None

    _params: FormatParams = PrivateAttr()

    @field_validator("quant_method")
    @classmethod
    def _method(cls, v: str) -> str:
        if v != QUANT_METHOD:
            raise ValueError(f"this loader reads {QUANT_METHOD!r} only")
        return v

    @field_validator("format_version")
    @classmethod
    def _version(cls, v: int) -> int:
        if v != FORMAT_VERSION:
            raise ValueError(f"this gq-serve reads version {FORMAT_VERSION}; re-export the checkpoint with "
                             "this gq-serve version or upgrade gq-serve")
        return v

    @field_validator("format")
    @classmethod
    def _format(cls, v: str) -> str:
        if v not in format_names():
            raise ValueError(f"this format is not served by this gq-serve (registered formats: "
                             f"{format_names()}); upgrade gq-serve or re-export in a registered format")
        return v

    @model_validator(mode="after")
    def _parse_params(self) -> "QuantizationConfig":
        fields = self.format_impl.Params.model_fields
        self._params = self.format_impl.Params(**{k: v for k, v in (self.model_extra or {}).items() if k in fields})
        return self

    @property
    def format_impl(self) -> Format:
        return get_format(self.format)

    @property
    def params(self) -> FormatParams:
        """The format's parameters (``bits`` and whatever else the format declares)."""
        return self._params

    @property
    def bits(self) -> int:
        return self._params.bits

    @classmethod
    def for_export(cls, params: FormatParams, modules_to_not_convert: list[str],
                   provenance: dict[str, Any] | None = None) -> "QuantizationConfig":
        """The block an exporter writes: loader fields, the format's parameters, provenance."""
        reserved = set(cls.model_fields) | set(type(params).model_fields)
        extra = {k: v for k, v in (provenance or {}).items() if k not in reserved}
        return cls(quant_method=QUANT_METHOD, format_version=FORMAT_VERSION, format=params.format,
                   modules_to_not_convert=sorted(modules_to_not_convert), **params.model_dump(), **extra)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (loader fields, format parameters, provenance), ``kernel`` only when set."""
        out = self.model_dump(exclude_none=False)
        if out.get("kernel") is None:
            out.pop("kernel", None)
        return out


def _message(e: ValidationError, data: dict) -> str:
    parts = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err.get("loc", ()))
        msg = err["msg"].removeprefix("Value error, ")
        if loc and loc in data:
            parts.append(f"quantization_config.{loc} is {data[loc]!r}: {msg}")
        elif loc:
            parts.append(f"quantization_config.{loc}: {msg}")
        else:
            parts.append(f"quantization_config: {msg}")
    return "; ".join(parts)


def parse_quantization_config(data: Any) -> QuantizationConfig:
    """Validate a ``quantization_config`` block; a ValueError names the offending field."""
    if not isinstance(data, dict):
        raise ValueError(f"quantization_config must be a JSON object, got {type(data).__name__}")
    try:
        return QuantizationConfig.model_validate(data)
    except ValidationError as e:
        raise ValueError(_message(e, data)) from None
