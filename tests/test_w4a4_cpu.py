"""The CPU integer GEMM of ``w4a4`` (gq_kernels.w4a4.cpu): bit for bit what ``w4a4-int`` computes."""
from __future__ import annotations

import pytest
import torch

from gq_kernels.cpu import build, features
from gq_kernels.format import LinearSpec
from gq_kernels.registry import choose_kernel, get_format
from gq_kernels.w4a4.cpu import (W4A4CpuAvx2Kernel, W4A4CpuAvx512Kernel, W4A4CpuAvx512VnniKernel,
                                 W4A4CpuPortableKernel, ISA_CODES, pack_codes)
from gq_kernels.w4a4 import reference as ref
from gq_kernels.w4a4.ops import W4A4IntKernel

FMT = get_format("w4a4")
VARIANTS = (W4A4CpuAvx512VnniKernel, W4A4CpuAvx512Kernel, W4A4CpuAvx2Kernel, W4A4CpuPortableKernel)
# in, out, input Hadamard, activation group, weight group: per row, out not a multiple of 16, weight
# groups finer / coarser than activation groups, GEMM groups of 4 columns
CASES = [(64, 24, 0, 0, 0), (64, 40, 1, 0, 16), (96, 33, 0, 32, 0), (128, 16, 1, 16, 64), (64, 8, 0, 8, 4)]


def _layer(in_f, out_f, had, group, wgroup, act_bits, seed=0):
    g = torch.Generator().manual_seed(seed + in_f + out_f + group + wgroup + act_bits)
    params = FMT.params(bits=4, act_bits=act_bits, act_clip=0.9, weight_group_size=wgroup)
    t = FMT.example_tensors(params, out_f, in_f, g)
    t["layout"] = torch.tensor([had, group], dtype=torch.int32)
    FMT.check_tensors(t, params, out_f, in_f)
    return LinearSpec(params, out_f, in_f), t, g


def _runnable(cls):
    ok, why = cls.can_implement(LinearSpec(FMT.params(bits=4), 16, 64), torch.device("cpu"), torch.float32)
    if not ok:
        pytest.skip(f"{cls.name}: {why}")


@pytest.mark.parametrize("cls", VARIANTS, ids=lambda c: c.name)
@pytest.mark.parametrize("act_bits", [4, 8])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_cpu_kernel_equals_the_int_kernel_bit_for_bit(cls, act_bits, case):
    _runnable(cls)
    spec, t, g = _layer(*case, act_bits)
    kernel, reference = cls(spec, torch.device("cpu"), torch.float32), W4A4IntKernel(spec, torch.device("cpu"),
                                                                                     torch.float32)
    ours, theirs = kernel.prepare(t), reference.prepare(t)
    assert "w" in ours  # the extension's path, not the fallback
    # 1, 5 and 70 rows: whole and partial 4-row tiles, one and two 64-row chunks; a bias
    for rows in (1, 5, 70):
        x = torch.randn(rows, case[0], generator=g) * 3
        bias = torch.randn(case[1], generator=g)
        assert torch.equal(kernel.apply(ours, x, bias), reference.apply(theirs, x, bias))
    x = torch.randn(2, 3, case[0], generator=g, dtype=torch.bfloat16)
    got = kernel.apply(ours, x)
    assert got.dtype == torch.bfloat16 and got.shape == (2, 3, case[1])
    assert torch.equal(got, reference.apply(theirs, x))


@pytest.mark.parametrize("cls", VARIANTS, ids=lambda c: c.name)
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group", [0, 16, 12, 24])   # 24: a vector and a tail
def test_activation_codes_are_the_reference_ones(cls, bits, group):
    _runnable(cls)
    g = torch.Generator().manual_seed(bits + group)
    x = torch.randn(37, 144, generator=g) * 4
    x[3] = x[3].abs()             # no negative value: the range still holds 0
    x[4] = 0.0                    # an all-zero row: scale 1
    j = torch.arange(144)
    x[5] = torch.where(j % 4 == 0, 15.0, (j % 15) + 0.5)   # 4 bits, clip 1: scale 1, codes on ties (to even)
    for clip in (1.0, 0.8):
        codes, s, z = torch.ops.gq_cpu.quantize_act_codes(x, bits, group, clip, ISA_CODES[cls.isa])
        want = ref.quantize_act(x, bits, group, clip)
        assert torch.equal(codes, want[0].reshape(37, 144))
        assert torch.equal(s, want[1].reshape(37, -1)) and torch.equal(z, want[2].reshape(37, -1))


def test_pack_codes_puts_four_columns_of_sixteen_channels_together():
    codes = torch.randint(-8, 8, (20, 12), dtype=torch.int8)
    packed = pack_codes(codes)
    assert packed.shape == (2, 3, 64)
    flat = packed.reshape(-1)
    for n in (0, 7, 15, 16, 19):
        for c in (0, 3, 5, 11):
            assert flat[((n // 16) * 3 + c // 4) * 64 + (n % 16) * 4 + c % 4] == codes[n, c]
    assert not packed[1, :, 16:].any()  # the padding channels of the last block


def test_groups_not_a_multiple_of_four_take_the_int_path():
    spec, t, g = _layer(64, 16, 0, 2, 0, 4)
    kernel = W4A4CpuPortableKernel(spec, torch.device("cpu"), torch.float32)
    _runnable(W4A4CpuPortableKernel)
    runtime = kernel.prepare(t)
    assert "codes" in runtime
    x = torch.randn(3, 64, generator=g)
    ref_kernel = W4A4IntKernel(spec, torch.device("cpu"), torch.float32)
    assert torch.equal(kernel.apply(runtime, x), ref_kernel.apply(ref_kernel.prepare(t), x))


def test_the_registry_prefers_the_cpu_kernel_where_it_runs():
    spec, _, _ = _layer(64, 16, 0, 0, 0, 4)
    best = next((c for c in VARIANTS[:-1] if features.isa_support(c.isa)[0]), None)
    chosen = choose_kernel(spec, "cpu", torch.float32)
    if best is None or not build.status()[0]:
        assert chosen.name == "w4a4-int"
    else:
        assert chosen.name == best.name
    # float activations: only the int kernel serves them
    spec16, _, _ = _layer(64, 16, 0, 0, 0, 16)
    assert choose_kernel(spec16, "cpu", torch.float32).name == "w4a4-int"
    ok, why = W4A4CpuPortableKernel.can_implement(spec16, torch.device("cpu"), torch.float32)
    assert not ok and "4 or 8 bits, not 16" in why


def test_the_operator_names_what_is_wrong():
    _runnable(W4A4CpuPortableKernel)
    a = torch.zeros(2, 64, dtype=torch.uint8)
    s = torch.ones(2, 1)
    w = torch.zeros(1, 16, 64, dtype=torch.int8)
    rs, ws = torch.zeros(2, 16), torch.ones(1, 16)
    op = torch.ops.gq_cpu.group_int8_matmul
    assert op(a, s, s, w, rs, ws, 16, 32, 0).shape == (2, 16)
    with pytest.raises(RuntimeError, match=r"weight codes must be contiguous int8 \[1, 16, 64\] for 16 x 64"):
        op(a, s, s, w[:, :8], rs, ws, 16, 32, 0)
    with pytest.raises(RuntimeError, match="must be multiples of 4"):
        op(a, s, s, w, rs, ws, 16, 6, 0)
    with pytest.raises(RuntimeError, match=r"rs must be a contiguous CPU fp32 \[2, 16\]"):
        op(a, s, s, w, torch.zeros(3, 16), ws, 16, 32, 0)
    with pytest.raises(RuntimeError, match="activation codes must be a CPU uint8"):
        op(a.to(torch.int8), s, s, w, rs, ws, 16, 32, 0)
