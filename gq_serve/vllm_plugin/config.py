"""``GuidedQuantConfig``: vLLM's view of a checkpoint's ``quantization_config`` block.

Importing this module registers the config under ``"guidedquant"`` (see ``__init__.register``), so
it is only ever imported inside a process that has vLLM. The block is parsed by the same schema as
every other loader (:mod:`gq_kernels.schema`); every format registered in :mod:`gq_kernels.registry`
is served by the one linear method of :mod:`.linear_method`.

A format may have been quantized for a low-bit KV cache (``Format.kv_cache_bits``, e.g. W4A4KV4's
4-bit per-(token, head) groups). vLLM keeps K/V in its own cache dtype, which cannot hold those, so
:func:`warn_kv_cache` logs once per process, at load, what vLLM keeps instead and that
``--kv-cache-dtype fp8`` is the closest vLLM option; it never happens silently.
"""
from __future__ import annotations

import logging
from typing import Any

import torch
from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig, QuantizeMethodBase

from gq_kernels.schema import QUANT_METHOD, QuantizationConfig as CheckpointConfig, parse_quantization_config

log = logging.getLogger(__name__)


_kv_warned = False


def warn_kv_cache(qc: CheckpointConfig) -> str | None:
    """Log, once per process, that vLLM cannot keep the low-bit KV cache a checkpoint's format was
    quantized for (``Format.kv_cache_bits``); returns the message (None when there is nothing to say)."""
    global _kv_warned
    bits = qc.format_impl.kv_cache_bits(qc.params)
    if bits is None:
        return None
    msg = (f"guidedquant: this {qc.format} checkpoint was quantized for a {bits}-bit KV cache (per token and "
           "head), which vLLM's cache cannot hold: vLLM keeps K/V in its own cache dtype instead (--kv-cache-dtype, "
           "default 'auto' = the model dtype), so attention reads unquantized keys and values and outputs differ "
           "from `gq serve --engine hf`, which runs the checkpoint's quantized cache. `--kv-cache-dtype fp8` is "
           "the closest vLLM option. The quantized linears are served as the checkpoint specifies.")
    if not _kv_warned:
        _kv_warned = True
        log.warning(msg)
    return msg


def _is_module_match(prefix: str, name: str) -> bool:
    """True when ``name`` (an HF module name from the checkpoint) denotes the vLLM module ``prefix``.

    vLLM prefixes can carry an extra leading scope (e.g. ``language_model.``) that the HF name does
    not, so a match on a dotted-component suffix counts too; ``"lm_head"`` matches ``"lm_head"`` but
    ``"proj"`` does not match ``"o_proj"``.
    """
    return prefix == name or prefix.endswith("." + name)


@register_quantization_config(QUANT_METHOD)
class GuidedQuantConfig(QuantizationConfig):
    """Weight-only GuidedQuant checkpoints, any registered format."""

    def __init__(self, checkpoint: CheckpointConfig, modules_to_not_convert: list[str]) -> None:
        super().__init__()
        self.checkpoint = checkpoint
        self.modules_to_not_convert = list(modules_to_not_convert)

    @property
    def format(self) -> str:
        return self.checkpoint.format

    @property
    def params(self):
        return self.checkpoint.params

    def __repr__(self) -> str:
        return f"GuidedQuantConfig({self.checkpoint!r}, modules_to_not_convert={self.modules_to_not_convert})"

    # ------------------------------------------------------------------ registry surface
    @classmethod
    def get_name(cls) -> str:
        return QUANT_METHOD

    @classmethod
    def get_supported_act_dtypes(cls) -> list[torch.dtype]:
        # Kernels say per layer what they serve (gq_kernels.kernel); dense serves every float dtype,
        # and fp32 matters on the CPU, where it is the only dtype that reproduces transformers.
        return [torch.float16, torch.bfloat16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        # The dense path runs on anything vLLM runs on (Volta = 70); packed kernels refuse what they
        # cannot serve through can_implement, per layer.
        return 70

    @staticmethod
    def get_config_filenames() -> list[str]:
        # Everything lives in config.json["quantization_config"], which vLLM reads on its own.
        return []

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "GuidedQuantConfig":
        """Validate the checkpoint's block; every error names the key and what would be accepted."""
        try:
            qc = parse_quantization_config(config)
        except ValueError as e:
            raise ValueError(f"guidedquant: {e}") from None
        skip = qc.modules_to_not_convert if "modules_to_not_convert" in config else ["lm_head"]
        warn_kv_cache(qc)
        return cls(qc, skip)

    # ------------------------------------------------------------------ per-layer dispatch
    def is_skipped(self, prefix: str) -> bool:
        """Whether the vLLM module ``prefix`` stays dense.

        A fused vLLM module (``qkv_proj``, ``gate_up_proj``) stands for several checkpoint modules;
        ``packed_modules_mapping`` (filled in by the model) names them. The shards of one fused
        parameter must share one format, so a partly-skipped fused module is an export error.
        """
        head, _, leaf = prefix.rpartition(".")
        parts = self.packed_modules_mapping.get(leaf)
        if not parts:
            return any(_is_module_match(prefix, m) for m in self.modules_to_not_convert)
        names = [f"{head}.{p}" if head else p for p in parts]
        skipped = [any(_is_module_match(n, m) for m in self.modules_to_not_convert) for n in names]
        if all(skipped):
            return True
        if any(skipped):
            raise ValueError(
                f"guidedquant: vLLM fuses {names} into {prefix}, but modules_to_not_convert lists only some of "
                "them; quantize all or none of a fused group"
            )
        return False

    def get_quant_method(self, layer: torch.nn.Module, prefix: str) -> QuantizeMethodBase | None:
        if isinstance(layer, LinearBase):
            if self.is_skipped(prefix):
                return UnquantizedLinearMethod()
            from gq_serve.vllm_plugin.linear_method import GuidedQuantLinearMethod

            return GuidedQuantLinearMethod(self)
        # Embeddings, the LM head (ParallelLMHead is an embedding class, not LinearBase) and attention
        # stay unquantized: None makes vLLM use its own unquantized method for them.
        return None
