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
