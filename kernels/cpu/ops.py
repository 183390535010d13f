"""Python side of the extension's operators (``csrc/ops.cpp``): fake implementations, so that
``torch.compile`` (vLLM's compiled mode, the static decoder) treats each call as one opaque node.
Imported by :func:`gq_kernels.cpu.build.load` right after the library is loaded."""
from __future__ import annotations

import torch


@torch.library.register_fake("gq_cpu::bitplane_matmul")
def _(x, qweight, table, scales, offsets, group_size, in_features, isa):
    return x.new_empty((*x.shape[:-1], qweight.shape[1]))


@torch.library.register_fake("gq_cpu::bitplane_matmul_multi")
def _(x, qweights, tables, scales, offsets, group_sizes, in_features, isa):
    return x.new_empty((*x.shape[:-1], sum(q.shape[1] for q in qweights)))


@torch.library.register_fake("gq_cpu::bitplane_dequantize")
def _(qweight, table, scales, offsets, group_size, in_features, rounding, isa):
    return qweight.new_empty((qweight.shape[1], in_features), dtype=torch.float32)


@torch.library.register_fake("gq_cpu::int8_matmul")
def _(x, qweight, scale, isa):
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


@torch.library.register_fake("gq_cpu::group_int8_matmul")
def _(a, sx, zx, w, rs, ws, n, group, isa):
    return sx.new_empty((a.shape[0], n))


@torch.library.register_fake("gq_cpu::quantize_act_codes")
def _(x, bits, group, clip, isa):
    groups = x.shape[1] // (group if group > 0 else x.shape[1])
    return (x.new_empty(x.shape, dtype=torch.uint8), x.new_empty((x.shape[0], groups)),
            x.new_empty((x.shape[0], groups)))


@torch.library.register_fake("gq_cpu::bitplane_q8_matmul_multi")
def _(x, qweights, tables, tscales, tmins, in_features):
    return x.new_empty((*x.shape[:-1], sum(q.shape[1] for q in qweights)))


@torch.library.register_fake("gq_cpu::dense_q8_matmul")
def _(x, weight, tscale, tmin, in_features):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.register_fake("gq_cpu::rms_norm")
def _(x, weight, eps):
    return x.new_empty(x.shape)


@torch.library.register_fake("gq_cpu::rope")
def _(x, cos, sin):
    return x.new_empty(x.shape)


@torch.library.register_fake("gq_cpu::silu_mul")
def _(gate_up):
    return gate_up.new_empty((gate_up.shape[0], gate_up.shape[1] // 2))


@torch.library.register_fake("gq_cpu::decode_attention")
def _(q, keys, values, scale):
    return q.new_empty((1, q.shape[0] * q.shape[1]))


@torch.library.register_fake("gq_cpu::trellis_matmul")
def _(x, words, table, tlut, kV, code, out_features, isa):
    return x.new_empty((*x.shape[:-1], out_features), dtype=torch.float32)


@torch.library.register_fake("gq_cpu::hadamard")
def _(x, signs, hk, blocks, transpose, scale):
    return x.new_empty(x.shape)
