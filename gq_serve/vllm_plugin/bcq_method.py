"""vLLM linear method for the ``bcq`` format: uniform codes with a scale and offset per row and group.

On disk, per linear: ``qweight`` int32 [bits, out, ceil(in/32)] (bit planes, see kernels.packing),
``scales`` and ``offsets`` fp16 [out, G], G = ceil(in / group_size) (1 when group_size == -1);
``w = scale * q + offset`` in float32 (kernels.bcq.reference).
"""
from __future__ import annotations

import torch

from gq_serve.vllm_plugin.config import GuidedQuantLinearMethodBase
from kernels import ops
from kernels.bcq import reference as bcq_ref


class BcqLinearMethod(GuidedQuantLinearMethodBase):
    def create_format_weights(self, layer, out_pp: int, input_size: int, in_pp: int, in_start: int, loader) -> list[str]:
        gs = self.quant_config.group_size
        n_full = bcq_ref.n_groups(input_size, gs)
        row_parallel = in_pp != input_size
        # Shard the group axis across row-parallel ranks only when each rank's columns are whole
        # groups; otherwise (per-channel, or a group straddling two ranks) every rank loads all groups
        # and picks its own in dequantize_partition.
        shard_groups = row_parallel and gs != -1 and in_pp % gs == 0
        n_stored = in_pp // gs if shard_groups else n_full
        layer.gq_groups_stored_start = (in_start // gs) if shard_groups else 0
        for name in ("scales", "offsets"):
            attrs = {
                "output_dim": 0,
                "weight_loader": self.checked_loader(layer, name, torch.float16, {1: n_full}, loader),
            }
            if shard_groups:
                attrs["input_dim"] = 1
            self.add_param(layer, name, torch.empty(out_pp, n_stored, dtype=torch.float16), attrs)
        return ["scales", "offsets"]

    def dequantize_partition(self, layer, codes: torch.Tensor, in_start: int, in_pp: int) -> torch.Tensor:
        gs = self.quant_config.group_size
        scales, offsets = layer.scales.data, layer.offsets.data
        if gs == -1:
            # One (scale, offset) per row: valid for any column range.
            return bcq_ref.dequantize(codes, scales, offsets, gs)
        # The reference expands groups from column 0 of the codes it gets. Start the codes at the
        # boundary of the group holding in_start (left-padding with `lead` dummy columns) so the
        # reference sees aligned groups, then drop the padding: bit-exact with dequantizing the full
        # matrix and slicing.
        g0 = in_start // gs
        lead = in_start - g0 * gs
        first = g0 - layer.gq_groups_stored_start
        if lead:
            codes = torch.nn.functional.pad(codes, (lead, 0))
        w = bcq_ref.dequantize(codes, scales[:, first:], offsets[:, first:], gs)
        return w[:, lead:]

    def kernel_tensors(self, layer, codes: torch.Tensor) -> dict[str, torch.Tensor] | None:
        gs = self.quant_config.group_size
        part = layer.gq_partition
        scales, offsets = layer.scales.data, layer.offsets.data
        if gs != -1:
            if part["in_start"] % gs:
                # The kernels expand groups from the rank's first column; a rank that starts inside a
                # group would need a per-rank offset. Rare (TP split not on a group boundary): dense path.
                return None
            first = part["in_start"] // gs - layer.gq_groups_stored_start
            n = bcq_ref.n_groups(part["in_pp"], gs)
            scales, offsets = scales[:, first : first + n], offsets[:, first : first + n]
        return {"qweight": self.local_qweight(layer, codes), "scales": scales, "offsets": offsets}

    def kernel_matmul(self, layer, x: torch.Tensor) -> torch.Tensor:
        return ops.bcq_matmul(x, layer.qweight, layer.scales, layer.offsets, self.quant_config.group_size,
                              layer.gq_partition["in_pp"])
