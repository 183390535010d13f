"""The ``w4a4`` format's specification: integer weights, integer activations, a low-bit KV cache.

Everything here is plain PyTorch in float32 and is what the integer kernels must reproduce.

Weights (symmetric): codes ``q_w`` int in [-2^(b-1), 2^(b-1) - 1], one fp16 scale per row or, with
weight groups, per row and group of input columns, ``W_hat = s_w * q_w``. Activations (per token, or per group of columns, asymmetric
with the range stretched to hold 0):

    lo = min(min x, 0) * clip,  hi = max(max x, 0) * clip,  s_x = (hi - lo) / (2^a - 1)
    z_x = round(-lo / s_x),     q_x = clamp(round(x / s_x) + z_x, 0, 2^a - 1)
    x_hat = s_x * (q_x - z_x)

Both code sets are small integers, so ``x_hat @ W_hat^T`` factors exactly as

    y[t, n] = sum_g s_x[t, g] * s_w[n] * (sum_{k in g} q_x[t, k] q_w[n, k]  -  z_x[t, g] * r[n, g])

with r[n, g] = sum_{k in g} q_w[n, k]: an integer GEMM (int8 x int8 -> int32) and a float epilogue
(:mod:`.ops`). With weight groups, s_w[n] becomes s_w[n, g] and the sum runs over the finer of the
two groupings (:func:`gemm_group_size`: one must divide the other). A linear may first rotate its input by the Hadamard ``R_in`` (SpinQuant's R4 before
down_proj); its weight then holds ``W R_in``, so ``(x R_in)(W R_in)^T = x W^T``.

The KV cache keeps, per (token, KV head) (or per group of a head's channels), ``K R_d`` (R_d: the head_dim Hadamard, SpinQuant's R3,
applied after RoPE) and V quantized asymmetrically like activations; attention reads
``K_hat = deq(K R_d) R_d^T`` and ``V_hat = deq(V)``. Since R_d is orthogonal,
``Q K_hat^T = (Q R_d) deq(K R_d)^T``: the same scores as rotating Q and K, without touching Q.
"""
from __future__ import annotations

import torch

from gq_kernels.hadamard import hadamard_transform

SUPPORTED_BITS = (2, 3, 4)       # weight codes: two per byte
ACT_BITS = (4, 8, 16)            # 16: activations stay in floating point
KV_BITS = (4, 8, 16)             # 16: the KV cache stays in floating point


# ---------------------------------------------------------------------------------------- weights
def weight_range(bits: int) -> tuple[int, int]:
    """The symmetric code range [lo, hi] of ``bits``-bit weights (e.g. [-8, 7] at 4 bits)."""
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def column_scales(scale: torch.Tensor, in_features: int) -> torch.Tensor:
    """Each weight's scale, float32 [out, in], from fp16 scales [out] (per row) or [out, G] (per row
    and group of in / G consecutive columns)."""
    s = scale.float()
    if s.dim() == 1:
        return s.unsqueeze(1).expand(-1, in_features)
    if in_features % s.shape[1]:
        raise ValueError(f"{s.shape[1]} weight groups do not divide {in_features} input columns")
    return s.repeat_interleave(in_features // s.shape[1], dim=1)


def quantize_weight(w: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Round-to-nearest codes of w [out, in] on the grid ``scale`` fp16 [out] or [out, G]: int8 [out, in]."""
    lo, hi = weight_range(bits)
    s = column_scales(scale.clamp_min(torch.finfo(torch.float16).tiny), w.shape[1])
    return torch.clamp(torch.round(w.float() / s), lo, hi).to(torch.int8)


def dequantize_weight(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """W_hat float32 [out, in] from int8 codes [out, in] and fp16 scales [out] or [out, G]."""
    return codes.float() * column_scales(scale, codes.shape[1])


def gemm_group_size(in_features: int, act_group_size: int, weight_group_size: int) -> int:
    """The columns an integer GEMM must sum separately: the finer of the activation groups and the
    weight groups (0 = the whole row for either; returns 0 when both are). One must divide the other."""
    ga = act_group_size or in_features
    gw = weight_group_size or in_features
    if max(ga, gw) % min(ga, gw):
        raise ValueError(f"activation groups of {ga} and weight groups of {gw} columns: one must divide the other")
    g = min(ga, gw)
    return 0 if g == in_features else g


def pack_nibbles(u: torch.Tensor) -> torch.Tensor:
    """uint8 values in [0, 16) [..., n] -> uint8 [..., ceil(n/2)]: element 2j in the low nibble,
    2j+1 in the high one (an odd last element pairs with 0)."""
    if u.shape[-1] % 2:
        u = torch.cat([u, u.new_zeros(*u.shape[:-1], 1)], dim=-1)
    return (u[..., 0::2] | (u[..., 1::2] << 4)).contiguous()


def unpack_nibbles(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_nibbles`: uint8 [..., n]."""
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(*packed.shape[:-1], -1)[..., :n]


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """int8 weight codes [out, in] in [-8, 7] -> uint8 [out, ceil(in/2)] (two's complement nibbles)."""
    return pack_nibbles((codes.to(torch.int16) & 0xF).to(torch.uint8))


def unpack_int4(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: int8 [out, in_features] in [-8, 7]."""
    codes = unpack_nibbles(packed, in_features).to(torch.int16)
    return torch.where(codes >= 8, codes - 16, codes).to(torch.int8)


# ------------------------------------------------------------------------------------ activations
def group_view(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """x [..., n] -> [..., n / group_size, group_size] (group_size 0: one group of the whole row)."""
    n = x.shape[-1]
    g = n if group_size in (0, -1) else group_size
    if n % g:
        raise ValueError(f"activation group size {g} does not divide the input size {n}")
    return x.reshape(*x.shape[:-1], n // g, g)


def quantize_act(x: torch.Tensor, bits: int, group_size: int = 0, clip: float = 1.0
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric per-token (per-group) codes of x [..., n].

    Returns:
        codes uint8 [..., G, n/G] in [0, 2^bits); scale float32 [..., G, 1]; zero float32
        [..., G, 1] (integer-valued, in [0, 2^bits)).
    """
    maxq = (1 << bits) - 1
    xg = group_view(x.float(), group_size)
    lo = xg.amin(dim=-1, keepdim=True).clamp_max(0) * clip
    hi = xg.amax(dim=-1, keepdim=True).clamp_min(0) * clip
    scale = (hi - lo) / maxq
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero group: any scale works
    zero = torch.round(-lo / scale)
    codes = torch.clamp(torch.round(xg / scale) + zero, 0, maxq)
    return codes.to(torch.uint8), scale, zero


def dequantize_act(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """x_hat float32 [..., n] from :func:`quantize_act`'s output."""
    xg = (codes.float() - zero) * scale
    return xg.reshape(*xg.shape[:-2], -1)


def fake_quant_act(x: torch.Tensor, bits: int, group_size: int = 0, clip: float = 1.0,
                   ste: bool = False) -> torch.Tensor:
    """x_hat in x's dtype (bits 16: x itself). ``ste``: gradients pass straight through (the
    rounding, scale and zero count as constants), for learning rotations under quantization."""
    if bits >= 16:
        return x
    xq = dequantize_act(*quantize_act(x.detach() if ste else x, bits, group_size, clip)).to(x.dtype)
    return x + (xq - x).detach() if ste else xq


def prepare_input(x: torch.Tensor, input_hadamard: bool) -> torch.Tensor:
    """The activation a linear quantizes: x, or x R_in (over the last axis, float32: the rotated
    values are quantized without a round trip through x's dtype) when it has one."""
    return hadamard_transform(x.float()) if input_hadamard else x


def matmul(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, act_bits: int, act_group_size: int,
           input_hadamard: bool, act_clip: float = 1.0, bias: torch.Tensor | None = None,
           ste: bool = False) -> torch.Tensor:
    """The specification of one w4a4 linear: ``fake_quant(x R_in?) @ W_hat^T`` in float32, returned
    in x's dtype. x [..., in]; codes int8 [out, in]; scale fp16 [out] or [out, G] (weight groups).
    ``ste``: the activation rounding passes gradients straight through (fine-tuning the scales)."""
    xq = fake_quant_act(prepare_input(x, input_hadamard).float(), act_bits, act_group_size, act_clip, ste)
    y = xq @ dequantize_weight(codes, scale).t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


# ----------------------------------------------------------------------------------------- KV cache
def kv_rotate_keys(k: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """k [..., head_dim] @ R_d (transpose: @ R_d^T), float32."""
    return hadamard_transform(k.float(), transpose=transpose)


def check_kv_group(group_size: int, head_dim: int) -> None:
    """Raise ValueError unless KV groups of ``group_size`` channels (0: the whole head) tile ``head_dim``."""
    if group_size and head_dim % group_size:
        raise ValueError(f"KV groups of {group_size} channels do not divide head_dim {head_dim}; pass a "
                         "--kv-group that divides it (or 0: one range per head)")


def fake_quant_kv(k: torch.Tensor, v: torch.Tensor, bits: int, clip: float = 1.0, ste: bool = False,
                  group_size: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """What attention reads from a ``bits``-bit cache for k, v [B, H_kv, T, head_dim]: K_hat, V_hat
    in the inputs' dtypes (asymmetric groups per (token, head), or per ``group_size`` of a head's
    channels; K through R_d and back)."""
    if bits >= 16:
        return k, v
    kr = kv_rotate_keys(k)
    kq = kv_rotate_keys(fake_quant_act(kr, bits, group_size, clip, ste), transpose=True).to(k.dtype)
    return kq, fake_quant_act(v, bits, group_size, clip, ste)
