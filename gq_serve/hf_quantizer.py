"""Register ``quant_method == "guidedquant"`` with transformers' quantizer registry.

After importing this module, ``AutoModelForCausalLM.from_pretrained(ckpt)`` builds the model with
``GQLinear`` layers (same rule as :mod:`gq_serve.checkpoint`: every ``nn.Linear`` not named in
``modules_to_not_convert``) and lets transformers load the packed tensors. A local checkpoint's
files are first checked against its ``gq_manifest.json`` (whole-file sha256, cached by path, size
and mtime: :func:`gq_serve.checkpoint.verify_files`), since transformers reads the tensors without
our per-tensor checks. Registration is idempotent: importing twice (or in several processes) is
harmless.
"""
from __future__ import annotations

from pathlib import Path

import torch
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from gq_kernels.schema import QUANT_METHOD, QuantizationConfig, parse_quantization_config
from gq_serve.checkpoint import CheckpointIntegrityError, quantize_linears, verify_files
from gq_serve.quant_linear import GQLinear, install_kv_cache, select_kernels


class GuidedQuantConfig(QuantizationConfigMixin):
    """transformers-side view of config.json's ``quantization_config`` (validated on construction)."""

    def __init__(self, **kwargs):
        self.parsed: QuantizationConfig = parse_quantization_config({"quant_method": QUANT_METHOD, **kwargs})
        for key, value in self.parsed.to_dict().items():
            setattr(self, key, value)

    def to_dict(self) -> dict:
        return self.parsed.to_dict()


class GuidedQuantHfQuantizer(HfQuantizer):
    """Swaps dense linears for ``GQLinear`` before transformers loads the checkpoint's tensors."""

    requires_calibration = True  # only pre-quantized checkpoints: quantizing happens in `gq quantize`

    def validate_environment(self, *args, **kwargs) -> None:
        return None

    def _process_model_before_weight_loading(self, model, **kwargs):
        local = Path(str(getattr(model.config, "_name_or_path", "") or ""))
        if local.is_dir():  # a hub id has no local files to check here
            problems = verify_files(local)
            if problems:
                raise CheckpointIntegrityError(local, problems)
        dtype = kwargs.get("dtype") or torch.get_default_dtype()
        quantize_linears(model, self.quantization_config.parsed, dtype)
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        for m in model.modules():
            if isinstance(m, GQLinear):
                m.reset_cache()
        model.gq_kernels = select_kernels(model, model.device, model.dtype)
        install_kv_cache(model, self.quantization_config.parsed.params)
        return model

    def is_serializable(self, **kwargs) -> bool:
        return False  # re-export with quantize.export instead of save_pretrained

    @property
    def is_trainable(self) -> bool:
        return False


def register() -> None:
    """Add the config and the quantizer to transformers' registries once."""
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(GuidedQuantConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(GuidedQuantHfQuantizer)


register()
