"""What a quantization method is: one pydantic config class (its options, the format it produces,
what calibration it needs) and one pure quantize function, registered together in
:mod:`gq_quantize.methods.registry` (in the manner of torchao's config -> handler registry).

The config's fields are the method's options end to end: the `gq quantize` flags are generated
from them (``--<field-name>``), they are stored in the checkpoint's provenance, and the handler
receives the validated instance.
"""
from __future__ import annotations

from typing import Callable, ClassVar, Protocol

import torch
from pydantic import BaseModel, ConfigDict, field_validator, model_validator

from gq_kernels.format import FormatParams, QuantResult
from gq_kernels.registry import get_format

# What a method may need from calibration: the layer Hessian X^T X ("hessian"; GuidedQuant then
# swaps in the saliency-weighted per-group Hessians) and the diagonal weight Fisher ("fisher").
NEEDS = frozenset({"hessian", "fisher"})


class MethodConfig(BaseModel):
    """Options of one method. Subclasses set ``name``, ``format``, ``needs`` and add fields; a
    field shared by several methods (``group_size``, ``kmeans_iters``) must mean the same thing in
    each, since they share one command-line flag."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: ClassVar[str]
    format: ClassVar[str]
    needs: ClassVar[frozenset[str]] = frozenset()
    # GuidedQuant's g this method is exact for (None: any), and why.
    max_groups: ClassVar[int | None] = None
    max_groups_reason: ClassVar[str] = ""

    bits: int

    @field_validator("bits")
    @classmethod
    def _bits(cls, v: int) -> int:
        allowed = list(get_format(cls.format).Params.supported_bits)
        if v not in allowed:
            raise ValueError(f"--bits {v} is not supported by method {cls.name!r} (format {cls.format!r}); "
                             f"choose one of {allowed}")
        return v

    @model_validator(mode="after")
    def _format_params_valid(self) -> "MethodConfig":
        self.format_params()  # the format refuses what it cannot store (e.g. group_size 0)
        return self

    def format_params(self, groups: int = 1) -> FormatParams:
        """The format parameters of what this method produces (the fields both declare) in a run
        whose quantizer receives ``groups`` Hessians per layer (GuidedQuant's g; 1 otherwise). A
        method whose format depends on g (e.g. one transform per group) overrides this."""
        params_cls = get_format(self.format).Params
        return params_cls(**{k: getattr(self, k) for k in params_cls.model_fields if k in type(self).model_fields})

    def required(self) -> frozenset[str]:
        """What this run needs from calibration (``needs``, unless an option turns some off)."""
        return type(self).needs

    def for_layer(self, name: str, model_config) -> "MethodConfig":
        """The options for the linear ``name`` of a model with this HF ``model_config``: the same
        options (the default), or a copy told what role the layer plays (e.g. a layer whose input
        the format rotates online)."""
        return self

    # The option that turns ``after_quantize``'s pass off, for error messages.
    after_quantize_off: ClassVar[str] = ""

    def after_quantize(self):
        """A pass over the whole model once every linear is quantized (and any fine-tune is done), or
        None (the default). The pass is ``fn(model, results, windows, progress) -> results``: model the
        unquantized HF model (left as it was), results name -> QuantResult, windows int64 [N, T] of
        calibration text; it returns results for the same names (e.g. with scalars it chose)."""
        return None

    @classmethod
    def guidable(cls) -> bool:
        """Whether GuidedQuant applies: the method minimises a Hessian-weighted objective."""
        return "hessian" in cls.needs


class Handler(Protocol):
    """``handler(w [out, in] fp32, hessian [in, in] or None, fisher [out, in] or None, cfg) -> result``.

    Pure: no I/O, no global state. A handler that takes all GuidedQuant groups at once (a hessian
    [g, in, in]) sets ``accepts_grouped_hessian = True``; otherwise it is called per group.
    """

    def __call__(self, w: torch.Tensor, hessian: torch.Tensor | None, fisher: torch.Tensor | None,
                 cfg: MethodConfig) -> QuantResult: ...


HandlerFn = Callable[[torch.Tensor, "torch.Tensor | None", "torch.Tensor | None", MethodConfig], QuantResult]
