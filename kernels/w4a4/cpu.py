"""``w4a4`` on the CPU: the extension's grouped integer GEMM (``csrc/groupint8_isa.cpp``).

The activations are quantized by the extension too (``gq_cpu::quantize_act_codes``: two vectorized
passes over x instead of torch's eight, the codes of :func:`gq_kernels.w4a4.reference.quantize_act`). The
same arithmetic as ``w4a4-int`` (:func:`gq_kernels.w4a4.ops.quantized_matmul`, bit for bit): the
activation codes (uint8) times the weight codes (int8) summed exactly in int32 per GEMM group, then
``s_x * (acc - z_x * r)`` (times the group's weight scale) added over the groups. What differs is how:
``w4a4-int`` runs one ``torch._int_mm`` per GEMM group and the epilogue as whole-matrix torch ops,
so a layer with 18 groups makes 18 GEMMs and ~90 passes over an [M, N] fp32 tensor; here each tile
of 8 rows (AVX2, portable: 4) x 16 channels keeps its int32 sums and fp32 result in registers through every group (AVX-512 VNNI:
one ``vpdpbusd`` per 4 columns x 16 channels; AVX-512 BW / AVX2: ``vpmaddubsw`` + ``vpmaddwd``).

The weight codes are held one byte each in blocks of 16 output channels x 4 columns
(:func:`pack_codes`), the row sums and scales transposed to [groups, N] so a tile loads 16 channels
of each at once. Layers whose GEMM groups are not a multiple of 4 columns go through ``w4a4-int``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from gq_kernels.cpu import kernel as cpu_kernel
from gq_kernels.cpu.kernel import CpuKernel
from gq_kernels.kernel import rows_2d
from gq_kernels.w4a4 import reference as ref
from gq_kernels.w4a4.format import NAME, read_act_clip, read_layout
from gq_kernels.w4a4.ops import W4A4IntKernel, group_row_sums

BLOCK_N = 16  # csrc/groupint8.h kGroupBlockN
# The extension's variant codes, plus the VNNI unit only the grouped GEMM has (csrc/ops.cpp).
ISA_CODES = {**cpu_kernel.ISA_CODES, "avx512vnni": 3}


def pack_codes(codes: torch.Tensor) -> torch.Tensor:
    """int8 [N, K] (K % 4 == 0) -> int8 [ceil(N/16), K/4, 64]: per block of 16 output channels, per 4
    columns, channel i's 4 codes at bytes 4i..4i+3 (zero rows pad the last block)."""
    N, K = codes.shape
    n_pad = -(-N // BLOCK_N) * BLOCK_N
    c = F.pad(codes, (0, 0, 0, n_pad - N)).reshape(n_pad // BLOCK_N, BLOCK_N, K // 4, 4)
    return c.permute(0, 2, 1, 3).reshape(n_pad // BLOCK_N, K // 4, 4 * BLOCK_N).contiguous()


def channels_last(t: torch.Tensor, n_pad: int) -> torch.Tensor:
    """[N] or [N, G] per-channel values -> fp32 [G, n_pad] (G = 1 for [N]), zero-padded channels."""
    t = t.float().reshape(t.shape[0], -1)
    return F.pad(t, (0, 0, 0, n_pad - t.shape[0])).t().contiguous()


class W4A4CpuKernel(CpuKernel):
    """One variant (``isa``) of the CPU integer GEMM for ``w4a4``; 4- or 8-bit activations."""

    formats = (NAME,)

    @classmethod
    def layer_ok(cls, layer):
        if layer.params.act_bits not in (4, 8):
            return False, f"quantizes activations to 4 or 8 bits, not {layer.params.act_bits}"
        if layer.in_features % 4:
            return False, f"needs in_features a multiple of 4, got {layer.in_features}"
        return True, None

    def prepare(self, tensors):
        layer = self.layer
        K = layer.in_features
        had, group = read_layout(tensors["layout"])
        gemm_group = ref.gemm_group_size(K, group, layer.params.weight_group_size) or K
        if gemm_group % 4:
            self._fallback = W4A4IntKernel(layer, self.device, self.dtype)
            return self._fallback.prepare(tensors)
        self._fallback = None
        self.act_clip = read_act_clip(tensors, layer.params)
        self.gemm_group = gemm_group
        codes = ref.unpack_int4(tensors["qweight"], K)
        w = pack_codes(codes)
        n_pad = w.shape[0] * BLOCK_N
        return {"w": w, "rs": channels_last(group_row_sums(codes, gemm_group), n_pad),
                "ws": channels_last(tensors["scale"], n_pad), "layout": torch.tensor([int(had), group])}

    def apply(self, tensors, x, bias=None):
        if "codes" in tensors:  # prepared by the w4a4-int fallback
            return self._fallback.apply(tensors, x, bias)
        p = self.layer.params
        had, group = bool(tensors["layout"][0]), int(tensors["layout"][1])
        xr = ref.prepare_input(rows_2d(x), had).float().contiguous()
        codes, s_x, z_x = torch.ops.gq_cpu.quantize_act_codes(xr, p.act_bits, group, self.act_clip,
                                                                ISA_CODES[self.isa])
        y = torch.ops.gq_cpu.group_int8_matmul(codes, s_x, z_x, tensors["w"], tensors["rs"], tensors["ws"],
                                               self.layer.out_features, self.gemm_group, ISA_CODES[self.isa])
        if bias is not None:
            y = y + bias.float()
        return y.reshape(*x.shape[:-1], -1).to(x.dtype)


class W4A4CpuAvx512VnniKernel(W4A4CpuKernel):
    name, isa = "w4a4-cpu-avx512vnni", "avx512vnni"


class W4A4CpuAvx512Kernel(W4A4CpuKernel):
    name, isa = "w4a4-cpu-avx512", "avx512"


class W4A4CpuAvx2Kernel(W4A4CpuKernel):
    name, isa = "w4a4-cpu-avx2", "avx2"


class W4A4CpuPortableKernel(W4A4CpuKernel):
    name, isa = "w4a4-cpu-portable", "portable"
