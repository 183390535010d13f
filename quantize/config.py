"""Configuration of one quantization run: it flows from the CLI to the checkpoint's config.json.

``QuantizeConfig`` holds what every run has (method, GuidedQuant, calibration) and the method's
own options as that method's config class (``options``). It is built from flat keyword arguments,
as the CLI gives them (``QuantizeConfig(method="gptq", bits=3, group_size=128)``), and written back
flat (:meth:`QuantizeConfig.flat`) into the checkpoint's provenance.
"""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, field_validator, model_validator

from gq_kernels.format import FormatParams
from gq_quantize.finetune import FinetuneConfig
from gq_quantize.methods.base import MethodConfig
from gq_quantize.methods.registry import get_method, method_names


class CalibrationConfig(BaseModel):
    """Which text, how many windows of how many tokens."""

    model_config = ConfigDict(extra="forbid")

    data: str = "sotu"  # corpus spec, see gq_quantize.data.resolve_corpus
    n_samples: int = Field(32, ge=1)
    seq_len: int = Field(512, ge=8)
    seed: int = 0


class QuantizeConfig(BaseModel):
    """Everything that decides the quantized weights (stored flat in the checkpoint's provenance)."""

    model_config = ConfigDict(extra="forbid")

    method: str
    guided: bool = False  # GuidedQuant: per-group saliency-weighted Hessians
    groups: int = Field(1, ge=1)  # g: output-channel groups for GuidedQuant
    # Each guided Hessian pulled this far toward the trace-matched plain one (0: the paper's):
    # a few dozen windows' saliency can rest on a handful of tokens (hessians.shrink_to_plain).
    guided_shrink: float = Field(0.0, ge=0.0, le=1.0)
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    # Sequential calibration: each decoder layer's Hessians from the outputs of the already
    # quantized layers before it (and, inside a layer, of its already quantized linears), as GPTQ
    # does; off: every Hessian from the unquantized model (one cache serves every method).
    sequential: bool = False
    # After the layer-wise quantization: the codes fixed, the float tensors (codebooks, scales)
    # tuned end to end against the unquantized model on the calibration windows (finetune.py).
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    options: SerializeAsAny[MethodConfig] | None = None

    @model_validator(mode="before")
    @classmethod
    def _collect_options(cls, data: Any) -> Any:
        """Flat keyword arguments: the keys that are not common fields are the method's options."""
        if isinstance(data, dict) and "options" not in data:
            data = dict(data)
            data["options"] = {k: data.pop(k) for k in list(data) if k not in cls.model_fields}
        return data

    @field_validator("method")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in method_names():
            raise ValueError(f"unknown method {v!r}; choose one of {method_names()}")
        return v

    @field_validator("options", mode="before")
    @classmethod
    def _options(cls, v: Any, info) -> Any:
        method = info.data.get("method")
        if method not in method_names():
            return None  # the method's own error says what is wrong
        if isinstance(v, dict):
            return get_method(method).config.model_validate(v)
        return v

    @model_validator(mode="after")
    def _check(self) -> "QuantizeConfig":
        if self.options is None:
            raise ValueError(f"options of method {self.method!r} are missing")
        if type(self.options).name != self.method:
            raise ValueError(f"options are for method {type(self.options).name!r}, not {self.method!r}")
        if self.guided and not type(self.options).guidable():
            guidable = [n for n in method_names() if get_method(n).config.guidable()]
            raise ValueError(f"--guided needs a Hessian-based method ({', '.join(guidable)}); {self.method!r} has none")
        if self.groups > 1 and not self.guided:
            raise ValueError("--groups > 1 only makes sense with --guided")
        if self.guided_shrink and not self.guided:
            raise ValueError("--guided-shrink pulls GuidedQuant's Hessians toward the plain one; add --guided")
        most = type(self.options).max_groups
        if most is not None and self.groups > most:
            raise ValueError(f"method {self.method!r} takes --groups up to {most}: "
                             f"{type(self.options).max_groups_reason}")
        if self.finetune.steps:
            from gq_kernels.registry import get_format

            if not get_format(self.format).Result.tunable:
                tunable = [n for n in method_names() if get_format(get_method(n).config.format).Result.tunable]
                raise ValueError(f"--finetune-steps tunes each layer's float tensors with its codes fixed, and "
                                 f"{self.method!r} writes {self.format!r}, which has none that may change; it "
                                 f"applies to {', '.join(tunable)}")
        if self.sequential and "hessian" not in self.needs():
            seq = [n for n in method_names() if "hessian" in get_method(n).config.needs]
            raise ValueError(f"--sequential changes the layer Hessians, which {self.method!r} does not use; "
                             f"it applies to {', '.join(seq)}")
        return self

    # ---------------------------------------------------------------- views
    @property
    def bits(self) -> int:
        return self.options.bits

    @property
    def format(self) -> str:
        """Name of the checkpoint format the method produces."""
        return type(self.options).format

    def format_params(self) -> FormatParams:
        return self.options.format_params(groups=self.hessian_groups())

    def needs(self) -> frozenset[str]:
        """Calibration the run needs: a subset of {"hessian", "fisher"}."""
        return self.options.required()

    def hessian_groups(self) -> int:
        """Hessians per layer the quantizer receives: g with GuidedQuant, else 1."""
        return self.groups if self.guided else 1

    def flat(self) -> dict[str, Any]:
        """Common fields and the method's options in one flat dict (calibration nested)."""
        out = {"method": self.method, **self.options.model_dump(), "guided": self.guided, "groups": self.groups,
               "sequential": self.sequential}
        if self.guided_shrink:
            out["guided_shrink"] = self.guided_shrink
        if self.finetune.steps:
            out["finetune"] = self.finetune.model_dump()
        out["calibration"] = self.calibration.model_dump()
        return out
