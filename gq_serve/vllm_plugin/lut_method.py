"""vLLM linear method for the ``lut`` format: per-output-row codebook of 2^bits fp16 values.

On disk, per linear: ``qweight`` int32 [bits, out, ceil(in/32)] (bit planes, see kernels.packing) and
``codebook`` fp16 [out, 2^bits]; ``w[r, c] = codebook[r, code[r, c]]``.
"""
from __future__ import annotations

import torch

from gq_serve.vllm_plugin.config import GuidedQuantLinearMethodBase
from kernels import ops
from kernels.lut import reference as lut_ref


class LutLinearMethod(GuidedQuantLinearMethodBase):
    def create_format_weights(self, layer, out_pp: int, input_size: int, in_pp: int, in_start: int, loader) -> list[str]:
        n_codes = 1 << self.quant_config.bits
        # One codebook per output row: it follows the rows (output_dim=0) into fused slots and TP
        # shards, and a row-parallel rank needs the whole row's codebook, so no input_dim.
        attrs = {
            "output_dim": 0,
            "weight_loader": self.checked_loader(layer, "codebook", torch.float16, {1: n_codes}, loader),
        }
        self.add_param(layer, "codebook", torch.empty(out_pp, n_codes, dtype=torch.float16), attrs)
        return ["codebook"]

    def dequantize_partition(self, layer, codes: torch.Tensor, in_start: int, in_pp: int) -> torch.Tensor:
        # A codebook lookup is per element, so the rank's columns dequantize on their own.
        return lut_ref.dequantize(codes, layer.codebook.data)

    def kernel_tensors(self, layer, codes: torch.Tensor) -> dict[str, torch.Tensor]:
        # The codebook is per row, so any column split of the rank keeps it whole.
        return {"qweight": self.local_qweight(layer, codes), "codebook": layer.codebook.data}

    def kernel_matmul(self, layer, x: torch.Tensor) -> torch.Tensor:
        return ops.lut_matmul(x, layer.qweight, layer.codebook, layer.gq_partition["in_pp"])
