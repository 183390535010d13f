"""``GuidedQuantConfig``: vLLM's view of a checkpoint's ``quantization_config`` block.

Importing this module registers the config under ``"guidedquant"`` (see ``__init__.register``), so
it is only ever imported inside a process that has vLLM.
"""
from __future__ import annotations

import os
from typing import Any

import torch
from vllm.model_executor.layers.linear import LinearBase, LinearMethodBase, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig, QuantizeMethodBase
from vllm.model_executor.utils import set_weight_attrs

from gq_serve.checkpoint import validate_quantization_config
from gq_serve.vllm_plugin import QUANT_METHOD
from kernels.bcq.reference import SUPPORTED_BITS as BCQ_BITS
from kernels.lut.reference import SUPPORTED_BITS as LUT_BITS
from kernels import ops
# kernels.packing defines the layout: codes of 32 consecutive input columns share one int32 word.
from kernels.packing import WORD_BITS, pack_bitplanes, packed_words, unpack_bitplanes

# Formats the vLLM plugin serves today. ``trellis`` (QTIP) and ``w4a4`` (SpinQuant) are part of the
# checkpoint contract but have no linear method yet: refuse them by name instead of loading garbage.
_FORMAT_BITS: dict[str, tuple[int, ...]] = {"lut": LUT_BITS, "bcq": BCQ_BITS}
_KNOWN_UNSERVED = ("trellis", "w4a4")


# Debug / CI knob: keep the packed tensors and call kernels.ops on every device. On the CPU the ops
# run the reference per call (slow), which lets CPU tests exercise the GPU path's tensor handling
# (fused layers, tensor-parallel column splits, repacking) end to end.
FORCE_PACKED_ENV = "GQ_VLLM_FORCE_PACKED"


def use_packed_path(device: torch.device) -> bool:
    """True when linear layers on ``device`` keep packed weights and call ``kernels.ops`` in apply."""
    if os.environ.get(FORCE_PACKED_ENV) == "1":
        return True
    return ops.kernels_serve(device)


def _is_module_match(prefix: str, name: str) -> bool:
    """True when ``name`` (an HF module name from the checkpoint) denotes the vLLM module ``prefix``.

    vLLM prefixes can carry an extra leading scope (e.g. ``language_model.``) that the HF name does
    not, so a match on a dotted-component suffix counts too; ``"lm_head"`` matches ``"lm_head"`` but
    ``"proj"`` does not match ``"o_proj"``.
    """
    return prefix == name or prefix.endswith("." + name)


@register_quantization_config(QUANT_METHOD)
class GuidedQuantConfig(QuantizationConfig):
    """Weight-only GuidedQuant formats: ``lut`` (per-row codebook) and ``bcq`` (scale*q + offset)."""

    def __init__(self, fmt: str, bits: int, group_size: int, modules_to_not_convert: list[str]) -> None:
        super().__init__()
        self.format = fmt
        self.bits = bits
        self.group_size = group_size
        self.modules_to_not_convert = list(modules_to_not_convert)

    def __repr__(self) -> str:
        return (
            f"GuidedQuantConfig(format={self.format!r}, bits={self.bits}, group_size={self.group_size}, "
            f"modules_to_not_convert={self.modules_to_not_convert})"
        )

    # ------------------------------------------------------------------ registry surface
    @classmethod
    def get_name(cls) -> str:
        return QUANT_METHOD

    @classmethod
    def get_supported_act_dtypes(cls) -> list[torch.dtype]:
        # The reference path dequantizes to the activation dtype and calls F.linear, so any float works;
        # fp32 matters on CPU, where it is the only dtype that reproduces transformers token for token.
        return [torch.float16, torch.bfloat16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        # The dequantize + dense GEMM path runs on anything vLLM runs on (Volta = 70). Raise this when
        # the GPU kernels in kernels/ become the only GPU path and they need newer tensor cores.
        return 70

    @staticmethod
    def get_config_filenames() -> list[str]:
        # Everything lives in config.json["quantization_config"], which vLLM reads on its own; there is
        # no side file (like AutoGPTQ's quantize_config.json) to look for.
        return []

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "GuidedQuantConfig":
        """Validate the checkpoint's block; every error names the key and what would be accepted."""
        if isinstance(config, dict) and config.get("format") in _KNOWN_UNSERVED:
            raise ValueError(
                f"guidedquant: format {config['format']!r} is not served by the vLLM plugin yet; "
                f"use `gq serve CKPT --engine hf`, or a checkpoint in one of {sorted(_FORMAT_BITS)}"
            )
        # One validator for every loader (transformers, embedded engine, vLLM).
        try:
            qc = validate_quantization_config(config)
        except ValueError as e:
            raise ValueError(f"guidedquant: {e}") from None
        skip = qc["modules_to_not_convert"] if "modules_to_not_convert" in config else ["lm_head"]
        return cls(qc["format"], qc["bits"], qc["group_size"], skip)

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
            # Imported here so this module stays importable (for registration) even while a method
            # module fails to import; the error then points at the method, at load time.
            if self.format == "lut":
                from gq_serve.vllm_plugin.lut_method import LutLinearMethod

                return LutLinearMethod(self)
            from gq_serve.vllm_plugin.bcq_method import BcqLinearMethod

            return BcqLinearMethod(self)
        # Embeddings, the LM head (ParallelLMHead is an embedding class, not LinearBase) and attention
        # stay unquantized: None makes vLLM use its own unquantized method for them.
        return None


# ====================================================================================== shared by
# lut_method.py and bcq_method.py: both formats store the same bit-plane ``qweight`` and differ only in
# the per-row tensors next to it, so loading, tensor-parallel partitioning and the dense fallback live
# here once.


class GuidedQuantLinearMethodBase(LinearMethodBase):
    """Packed bit-plane weights, dequantized once after loading; subclasses add the format tensors.

    Parameters are plain ``torch.nn.Parameter`` tagged with ``set_weight_attrs`` (``output_dim``,
    ``input_dim``, ``weight_loader``). That is the v1 loader protocol: vLLM hands v1 loaders to every
    linear method not on its internal ``WEIGHT_LOADER_V2_SUPPORTED`` list, and it is the same in vLLM
    0.26 and 0.32, whereas the v2 parameter classes only load through layers that opted in.
    With it:
      * column-parallel / fused (qkv_proj, gate_up_proj) layers narrow ``output_dim`` to the shard's
        slot and the rank's rows -- packing is along the input only, so that is a plain slice;
      * row-parallel layers narrow ``input_dim`` by the rank. That is only right for packed words when
        the rank's input slice starts and ends on a word boundary; otherwise the parameter gets no
        ``input_dim`` (vLLM then loads it whole on every rank) and the rank's columns are cut out after
        unpacking. The same rule applies to group-wise scales at group boundaries.
    No ``packed_dim`` / ``packed_factor`` is set: v1 loaders only consult them when the packed dim is
    the output dim (to rescale shard offsets), and here the output dim is never packed.
    """

    # Subclass hooks --------------------------------------------------------------------------
    def create_format_weights(self, layer, out_pp: int, input_size: int, in_pp: int, in_start: int, loader) -> list[str]:
        """Register the format's tensors on ``layer``; return their names."""
        raise NotImplementedError

    def dequantize_partition(self, layer, codes: torch.Tensor, in_start: int, in_pp: int) -> torch.Tensor:
        """float32 [out_pp, in_pp]: W_hat columns [in_start, in_start + in_pp) of the full matrix.

        ``codes`` holds exactly those columns (uint8 [out_pp, in_pp]).
        """
        raise NotImplementedError

    def __init__(self, quant_config: GuidedQuantConfig) -> None:
        self.quant_config = quant_config

    # Helpers ----------------------------------------------------------------------------------
    @staticmethod
    def checked_loader(layer, name: str, dtype: torch.dtype, fixed_dims: dict[int, int], inner):
        """Wrap vLLM's loader so a wrong tensor is refused with its name, not a bare shape assert.

        ``fixed_dims`` maps a dim to the size every on-disk tensor must have there (dims vLLM never
        slices, e.g. the bit planes or the codebook width).
        """

        def load(param, loaded_weight, *args, **kwargs):
            full = f"{layer.prefix}.{name}" if getattr(layer, "prefix", "") else name
            if loaded_weight.dtype != dtype:
                raise ValueError(f"guidedquant: {full} must be {dtype}, the checkpoint has {loaded_weight.dtype}")
            bad = {d: n for d, n in fixed_dims.items() if loaded_weight.dim() <= d or loaded_weight.shape[d] != n}
            if loaded_weight.dim() != param.dim() or bad:
                raise ValueError(
                    f"guidedquant: {full} has shape {tuple(loaded_weight.shape)}; expected {param.dim()} dims with "
                    + ", ".join(f"dim {d} == {n}" for d, n in fixed_dims.items())
                )
            return inner(param, loaded_weight, *args, **kwargs)

        return load

    @staticmethod
    def add_param(layer, name: str, data: torch.Tensor, attrs: dict) -> None:
        p = torch.nn.Parameter(data, requires_grad=False)
        set_weight_attrs(p, attrs)
        layer.register_parameter(name, p)

    # vLLM API ---------------------------------------------------------------------------------
    def create_weights(
        self,
        layer: torch.nn.Module,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs,
    ) -> None:
        loader = extra_weight_attrs.pop("weight_loader")
        out_pp = sum(output_partition_sizes)
        in_pp = input_size_per_partition
        row_parallel = in_pp != input_size
        # LinearBase sets tp_rank before create_weights runs (0 for replicated / disable_tp layers).
        in_start = getattr(layer, "tp_rank", 0) * in_pp if row_parallel else 0
        shard_words = row_parallel and in_pp % WORD_BITS == 0
        stored_start, stored_len = (in_start, in_pp) if shard_words else (0, input_size)

        bits = self.quant_config.bits
        attrs = {"output_dim": 1, **extra_weight_attrs}
        if shard_words:
            attrs["input_dim"] = 2
        attrs["weight_loader"] = self.checked_loader(
            layer, "qweight", torch.int32, {0: bits, 2: packed_words(input_size)}, loader
        )
        self.add_param(layer, "qweight", torch.empty(bits, out_pp, packed_words(stored_len), dtype=torch.int32), attrs)
        names = ["qweight", *self.create_format_weights(layer, out_pp, input_size, in_pp, in_start, loader)]

        # What process_weights_after_loading needs; a plain attribute, not state vLLM would try to load.
        layer.gq_partition = {
            "in_start": in_start,  # first input column of this rank in the full matrix
            "in_pp": in_pp,
            "stored_start": stored_start,  # first column held by the loaded qweight
            "stored_len": stored_len,
            "out_pp": out_pp,
            "packed_params": names,
            "params_dtype": params_dtype,
        }

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        part = layer.gq_partition
        qweight = layer.qweight.data
        codes = unpack_bitplanes(qweight, part["stored_len"])
        lo = part["in_start"] - part["stored_start"]
        codes = codes[:, lo : lo + part["in_pp"]]

        # CUDA: keep packed tensors holding exactly this rank's columns and call the kernels in apply.
        packed = self.kernel_tensors(layer, codes) if use_packed_path(qweight.device) else None
        if packed is None:
            # Reference path (CPU, or a rank split no kernel layout can express): one dense weight.
            w = self.dequantize_partition(layer, codes, part["in_start"], part["in_pp"])
            # device= explicitly: the dense weight must sit where the packed one was loaded (a tensor
            # made without it lands on the CPU and only fails on a GPU).
            keep = {"weight": w.to(device=qweight.device, dtype=part["params_dtype"])}
        else:
            keep = packed
        # The loaded tensors go; what apply reads is registered in their place.
        for name in part["packed_params"]:
            delattr(layer, name)
        for name, t in keep.items():
            layer.register_parameter(name, torch.nn.Parameter(t.contiguous(), requires_grad=False))
        layer.gq_kernel = packed is not None

    def local_qweight(self, layer, codes: torch.Tensor) -> torch.Tensor:
        """int32 [bits, out_pp, ceil(in_pp/32)] packing only this rank's columns (``codes`` [out_pp, in_pp]).

        The loaded tensor already is that unless a row-parallel split is not word-aligned, in which
        case the rank's columns are packed again (on the codes' device).
        """
        part = layer.gq_partition
        if part["stored_start"] == part["in_start"] and part["stored_len"] == part["in_pp"]:
            return layer.qweight.data
        return pack_bitplanes(codes, self.quant_config.bits)

    def kernel_tensors(self, layer, codes: torch.Tensor) -> dict[str, torch.Tensor] | None:
        """Format hook: the packed tensors ``kernel_matmul`` reads, or None to use the dense path."""
        raise NotImplementedError

    def kernel_matmul(self, layer, x: torch.Tensor) -> torch.Tensor:
        """Format hook: ``x @ W_hat.T`` through ``kernels.ops`` from the tensors of ``kernel_tensors``."""
        raise NotImplementedError

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if layer.gq_kernel:
            y = self.kernel_matmul(layer, x)
            return y if bias is None else y + bias
        # Reference / CPU path: W_hat was computed with kernels.*.reference.dequantize semantics.
        return torch.nn.functional.linear(x, layer.weight, bias)
