"""Configuration of one quantization run: it flows from the CLI to the checkpoint's config.json."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from kernels.bcq.reference import SUPPORTED_BITS as BCQ_BITS
from kernels.lut.reference import SUPPORTED_BITS as LUT_BITS

Method = Literal["rtn", "gptq", "squeezellm", "lnq"]

# Which checkpoint format each quantizer produces.
METHOD_FORMAT: dict[str, str] = {"rtn": "bcq", "gptq": "bcq", "squeezellm": "lut", "lnq": "lut"}
FORMAT_BITS: dict[str, tuple[int, ...]] = {"lut": LUT_BITS, "bcq": BCQ_BITS}
# Methods that consume a Hessian (and so can be guided).
HESSIAN_METHODS = ("gptq", "lnq")


class CalibrationConfig(BaseModel):
    """Which text, how many windows of how many tokens."""

    model_config = ConfigDict(extra="forbid")

    data: str = "sotu"  # corpus spec, see quantize.data.resolve_corpus
    n_samples: int = Field(32, ge=1)
    seq_len: int = Field(512, ge=8)
    seed: int = 0


class QuantizeConfig(BaseModel):
    """Everything that decides the quantized weights. Stored under config.json["quantization_config"]."""

    model_config = ConfigDict(extra="forbid")

    method: Method
    bits: int
    guided: bool = False  # GuidedQuant: per-group saliency-weighted Hessians
    groups: int = Field(1, ge=1)  # g: output-channel groups for GuidedQuant
    group_size: int = -1  # uniform formats: inputs per scale; -1 = per output channel
    sym: bool = False  # uniform formats: symmetric grid
    # LNQ (paper defaults)
    lnq_iters: int = Field(2, ge=1)  # T: alternations of codebook update and assignment
    lnq_cd_sweeps: int = Field(4, ge=1)  # K: coordinate-descent sweeps per assignment step
    lnq_lambda: float = Field(1e-7, ge=0.0)  # ridge on the codebook least squares
    # GPTQ
    gptq_damp: float = Field(0.01, ge=0.0)  # fraction of mean(diag H) added to the diagonal
    gptq_block: int = Field(128, ge=1)
    # SqueezeLLM weighted k-means
    kmeans_iters: int = Field(50, ge=1)
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)

    @property
    def format(self) -> str:
        return METHOD_FORMAT[self.method]

    @model_validator(mode="after")
    def _check(self) -> "QuantizeConfig":
        allowed = FORMAT_BITS[self.format]
        if self.bits not in allowed:
            raise ValueError(
                f"--bits {self.bits} is not supported by method {self.method!r} (format {self.format!r}); "
                f"choose one of {list(allowed)}"
            )
        if self.guided and self.method not in HESSIAN_METHODS:
            raise ValueError(
                f"--guided needs a Hessian-based method ({', '.join(HESSIAN_METHODS)}); {self.method!r} has none"
            )
        if self.groups > 1 and not self.guided:
            raise ValueError("--groups > 1 only makes sense with --guided")
        if self.group_size != -1 and (self.group_size < 1 or self.format != "bcq"):
            raise ValueError("--group-size applies to uniform methods (rtn, gptq) and must be -1 or >= 1")
        return self

    def needs_hessian(self) -> bool:
        return self.method in HESSIAN_METHODS

    def needs_weight_fisher(self) -> bool:
        """SqueezeLLM (and LNQ's SqueezeLLM initialisation) weight k-means by the diagonal Fisher."""
        return self.method in ("squeezellm", "lnq")

    def to_checkpoint_config(self) -> dict:
        """The ``quantization_config`` block of config.json."""
        out = {"quant_method": "guidedquant", "format": self.format, "bits": self.bits, "format_version": 1}
        out.update(self.model_dump())
        return out
