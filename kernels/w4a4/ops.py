"""``w4a4`` with integer arithmetic: the kernel that serves its linears on the CPU and the GPU.

Per call: rotate the input by R_in when the layer has one (O(n log n), :mod:`gq_kernels.hadamard`),
quantize it per token (per group) to codes in [0, 2^a), multiply codes by weight codes in an integer
GEMM (``torch._int_mm``: int8 x int8 -> int32, VNNI/AMX on x86 CPUs, IMMA on GPUs) and finish with
the float epilogue of :mod:`.reference`'s identity

    y = sum_g s_x[:, g] * s_w * (acc_g - z_x[:, g] * r[:, g]),   r[n, g] = sum_{k in g} q_w[n, k]

(with weight groups, s_w[:, g] inside the sum, and g running over the finer of the two groupings).

The integer accumulator is exact; the result equals the fake-quant reference up to the order of
the float epilogue. Where ``torch._int_mm`` refuses a shape (CUDA wants more than 16 rows and
multiples of 8), the same codes are multiplied as float32, which is exact too: every partial sum is
an integer below 2^24 (|q_x q_w| <= 120 and K < 139,000).

On CUDA the registry prefers ``w4a4-triton`` (:class:`W4A4TritonKernel`, the ``gq::w4a4_matmul``
operator over :mod:`.triton_kernels`): the same identity with the activation quantization and an
int8 x int4 GEMM in Triton, reading the packed weights (no int8 copy) and fusing the epilogue.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from gq_kernels.kernel import LinearKernel, TritonKernel, kernels_serve, rows_2d, triton_available
from gq_kernels.w4a4 import reference as ref
from gq_kernels.w4a4.format import NAME, read_act_clip, read_layout

_EXACT_FP32_K = (1 << 24) // 120


def int_matmul(a: torch.Tensor, b_t: torch.Tensor) -> torch.Tensor:
    """Exact ``a @ b_t.T`` for int8 a [M, K] and int8 b_t [N, K]: int32 [M, N]."""
    M, K = a.shape
    if a.device.type == "cuda" and (M <= 16 or K % 8 or b_t.shape[0] % 8):
        if K >= _EXACT_FP32_K:
            raise ValueError(f"no exact float path for K={K}")
        return (a.float() @ b_t.float().t()).to(torch.int32)
    return torch._int_mm(a, b_t.t())


def group_codes(w_codes: torch.Tensor, group_size: int) -> torch.Tensor:
    """int8 [N, K] -> [G, N, K/G] contiguous: each GEMM group's weight columns as one matrix
    (group_size: :func:`gq_kernels.w4a4.reference.gemm_group_size`; 0 = one group)."""
    N, K = w_codes.shape
    g = K if group_size == 0 else group_size
    return w_codes.reshape(N, K // g, g).transpose(0, 1).contiguous()


def group_row_sums(codes: torch.Tensor, group_size: int) -> torch.Tensor:
    """r[n, g] = sum of row n's codes over GEMM group g: int8 [N, K] -> int32 [N, G]."""
    N, K = codes.shape
    g = K if group_size == 0 else group_size
    return codes.reshape(N, K // g, g).sum(dim=-1, dtype=torch.int32).contiguous()


def quantized_matmul(x: torch.Tensor, w_groups: torch.Tensor, w_scale: torch.Tensor, row_sums: torch.Tensor,
                     act_bits: int, act_group_size: int, input_hadamard: bool, act_clip: float = 1.0) -> torch.Tensor:
    """One w4a4 linear with an integer GEMM.

    Args:
        x: [..., K] float activations.
        w_groups: int8 [G, N, K/G] weight codes per GEMM group (:func:`group_codes`: the finer of the
            activation and weight groups; G = 1 when both are per row); row_sums int32 [N, G];
            w_scale float32 [N], or [N, Gw] with weight groups.
    Returns:
        [..., N] float32.
    """
    xr = ref.prepare_input(rows_2d(x), input_hadamard)
    G, N, gs = w_groups.shape
    if act_bits >= 16:
        w = w_groups.transpose(0, 1).reshape(N, G * gs)
        y = xr.float() @ ref.dequantize_weight(w, w_scale.half()).t()
        return y.reshape(*x.shape[:-1], N)
    codes, s_x, z_x = ref.quantize_act(xr, act_bits, act_group_size, act_clip)   # [M, Ga, K/Ga], [M, Ga, 1]
    # Codes up to 2^8 - 1 do not fit int8: shift by 2^(a-1) and fold the shift into the zero point.
    shift = 128 if act_bits == 8 else 0
    a = (codes.to(torch.int16) - shift).to(torch.int8).reshape(codes.shape[0], G, gs)
    per_act = G // s_x.shape[1]                                          # GEMM groups per activation group
    w_grouped = w_scale.dim() == 2
    per_w = G // w_scale.shape[1] if w_grouped else G
    y = None
    for g in range(G):
        acc = int_matmul(a[:, g].contiguous(), w_groups[g])                             # [M, N] int32
        ga = g // per_act
        zr = (z_x[:, ga] - shift) * row_sums[:, g].float()[None, :]                # [M, N]
        part = s_x[:, ga] * (acc.float() - zr)
        if w_grouped:
            part = part * w_scale[None, :, g // per_w]
        y = part if y is None else y + part
    if not w_grouped:
        y = y * w_scale[None, :]
    return y.reshape(*x.shape[:-1], N)


class W4A4IntKernel(LinearKernel):
    """Integer codes times integer codes (``torch._int_mm``) on any device; weights held as int8
    codes (one byte per weight: the GEMM reads int8), plus per-group row sums."""

    name = "w4a4-int"
    formats = (NAME,)

    def prepare(self, tensors):
        layer = self.layer
        had, group = read_layout(tensors["layout"])
        self.act_clip = read_act_clip(tensors, layer.params)
        codes = ref.unpack_int4(tensors["qweight"].to(self.device), layer.in_features)
        gemm_group = ref.gemm_group_size(layer.in_features, group, layer.params.weight_group_size)
        return {"codes": group_codes(codes, gemm_group), "scale": tensors["scale"].float().to(self.device),
                "row_sums": group_row_sums(codes, gemm_group), "layout": torch.tensor([int(had), group])}

    def apply(self, tensors, x, bias=None):
        p = self.layer.params
        had, group = bool(tensors["layout"][0]), int(tensors["layout"][1])
        y = quantized_matmul(x, tensors["codes"], tensors["scale"], tensors["row_sums"], p.act_bits, group, had,
                             self.act_clip)
        if bias is not None:
            y = y + bias.float()
        return y.to(x.dtype)


# ------------------------------------------------------------------------------------ Triton (GPU)
def _triton_serves(device: torch.device) -> bool:
    """CUDA with Triton; or the CPU when the tests run Triton's interpreter (TRITON_INTERPRET=1)."""
    if kernels_serve(device):
        return True
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1" and triton_available()


@torch.library.custom_op("gq::w4a4_matmul", mutates_args=())
def w4a4_matmul(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, row_sums: torch.Tensor,
                act_bits: int, act_group_size: int, input_hadamard: bool, act_clip: float,
                bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One w4a4 linear on packed weights: x [..., K] (fp16 / bf16 / fp32) -> [..., N] in x's dtype.

    qweight uint8 [N, ceil(K/2)] (the checkpoint's packing); scale fp32 [N] or [N, Gw] (weight
    groups); row_sums int32 [N, G] over the GEMM groups (:func:`gq_kernels.w4a4.reference.gemm_group_size`).
    With Triton (:mod:`.triton_kernels`): the input Hadamard (when the layer has one), the Triton
    activation quantization, the Triton int8 x int4 GEMM with the fused epilogue (and bias). Else
    the same integer arithmetic in torch (:func:`quantized_matmul`, unpacking on every call).
    """
    K = x.shape[-1]
    N = qweight.shape[0]
    if not _triton_serves(x.device):
        w = group_codes(ref.unpack_int4(qweight, K), K // row_sums.shape[1])
        y = quantized_matmul(x, w, scale, row_sums, act_bits, act_group_size, input_hadamard, act_clip)
        if bias is not None:
            y = y + bias.float()
        return y.to(x.dtype)
    from gq_kernels.w4a4.triton_kernels import w4a4_linear

    xr = ref.prepare_input(rows_2d(x), input_hadamard)  # fp32 after a Hadamard, else x's dtype
    y = w4a4_linear(xr, qweight, scale, row_sums, act_bits, act_group_size, act_clip, bias, out_dtype=x.dtype)
    return y.reshape(*x.shape[:-1], N)


@w4a4_matmul.register_fake
def _(x, qweight, scale, row_sums, act_bits, act_group_size, input_hadamard, act_clip, bias=None):
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


class W4A4TritonKernel(TritonKernel):
    """Packed int4 weights on a CUDA GPU: Triton activation quantization, then a Triton int8 x int4
    GEMM that unpacks the weight nibbles in registers, accumulates in int32 and fuses the epilogue
    (per-group scales and zero points, s_w, bias). It keeps the checkpoint's packed ``qweight``
    (half a byte per weight: half of w4a4-int's int8 codes) plus int32 row sums per GEMM group.
    Activations must be quantized (4 or 8 bits); at 16 bits w4a4-int serves the layer. Activation
    or weight groups that are not a multiple of 32 columns fall back to w4a4-int's path (int8 codes)."""

    name = "w4a4-triton"
    formats = (NAME,)

    @classmethod
    def can_implement(cls, layer, device, dtype, rows=None):
        ok, why = super().can_implement(layer, device, dtype, rows)
        if not ok:
            return ok, why
        if layer.params.act_bits not in (4, 8):
            return False, f"quantizes activations to 4 or 8 bits, not {layer.params.act_bits}"
        return True, None

    def prepare(self, tensors):
        layer = self.layer
        had, group = read_layout(tensors["layout"])
        K = layer.in_features
        gemm_group = ref.gemm_group_size(K, group, layer.params.weight_group_size)
        if gemm_group % 32:
            # A GEMM K step (>= 32 columns for int8 tensor cores) must not cross an activation or
            # weight group: such layers (head_dim 16, groups of 16) go through w4a4-int's path instead.
            self._fallback = W4A4IntKernel(layer, self.device, self.dtype)
            return self._fallback.prepare(tensors)
        self._fallback = None
        self.act_clip = read_act_clip(tensors, layer.params)
        qweight = tensors["qweight"].to(self.device).contiguous()
        # Row sums per group, from a transient unpacked copy (freed on return).
        return {"qweight": qweight, "scale": tensors["scale"].float().to(self.device),
                "row_sums": group_row_sums(ref.unpack_int4(qweight, K), gemm_group),
                "layout": torch.tensor([int(had), group])}

    def apply(self, tensors, x, bias=None):
        if "codes" in tensors:  # prepared by the w4a4-int fallback
            return self._fallback.apply(tensors, x, bias)
        p = self.layer.params
        had, group = bool(tensors["layout"][0]), int(tensors["layout"][1])
        return torch.ops.gq.w4a4_matmul(x, tensors["qweight"], tensors["scale"], tensors["row_sums"], p.act_bits,
                                        group, had, self.act_clip, bias)
