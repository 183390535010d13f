"""The ``w4a4`` format (SpinQuant W4A4KV4): packing, the integer kernel against the fake-quant
reference, the quantized KV cache, the method, and a tiny model quantized, exported, loaded and served."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

import gq_serve  # noqa: F401  (registers the transformers quantizer)
from gq_kernels.format import LinearSpec
from gq_kernels.registry import choose_kernel, get_format
from gq_kernels.w4a4 import reference as ref
from gq_kernels.w4a4.format import W4A4Quant
from gq_kernels.w4a4.kvcache import QuantizedKVCache
from gq_kernels.w4a4.ops import group_codes, quantized_matmul
from gq_quantize.methods.gptq import inverse_hessian_factor  # noqa: F401
from gq_quantize.methods.objective import quadratic_objective
from gq_quantize.methods.spinquant import SpinQuantConfig, clipped_scale, quantize_w4a4


FMT = get_format("w4a4")


def _poisoned(shape, dtype=torch.float32):
    return torch.full(shape, float("nan"), dtype=dtype)


# ------------------------------------------------------------------------------------------ layout
@pytest.mark.parametrize("n", [1, 7, 64, 577])
def test_int4_packing_round_trips(n):
    codes = torch.randint(-8, 8, (5, n), dtype=torch.int8)
    packed = ref.pack_int4(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (5, (n + 1) // 2)
    assert torch.equal(ref.unpack_int4(packed, n), codes)


def test_activation_codes_hold_zero_and_the_range():
    x = torch.randn(6, 96) * torch.logspace(-3, 2, 6)[:, None]
    codes, scale, zero = ref.quantize_act(x, 4, 32)
    assert codes.shape == (6, 3, 32) and int(codes.max()) <= 15 and 0 <= float(zero.min()) <= float(zero.max()) <= 15
    err = (ref.dequantize_act(codes, scale, zero) - x).abs().reshape(6, 3, 32)
    assert bool((err <= scale / 2 + 1e-6).all())  # round to nearest inside the (zero-holding) range
    assert torch.equal(ref.fake_quant_act(torch.zeros(2, 8), 4), torch.zeros(2, 8))


def test_ste_passes_gradients_straight_through():
    x = torch.randn(3, 16, requires_grad=True)
    ref.fake_quant_act(x, 4, ste=True).sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


# ---------------------------------------------------------------------------------- integer kernel
CASES = [(576, 1536, 0, 0), (1536, 576, 1, 0), (1536, 576, 1, 64), (576, 576, 0, 64), (40, 24, 0, 8),
         (96, 33, 0, 0)]


@pytest.mark.parametrize("act_clip", [1.0, 0.8])
@pytest.mark.parametrize("act_bits", [4, 8, 16])
@pytest.mark.parametrize("in_f,out_f,had,group", CASES)
@pytest.mark.parametrize("rows", [1, 3, 8, 33])
@pytest.mark.parametrize("prefer", ["w4a4-int", "auto"])   # auto: w4a4-cpu-* where the CPU runs one
def test_int_kernel_matches_the_reference(in_f, out_f, had, group, act_bits, rows, act_clip, prefer):
    g = torch.Generator().manual_seed(in_f * 7 + out_f + rows)
    params = FMT.params(bits=4, act_bits=act_bits, act_clip=act_clip)
    t = FMT.example_tensors(params, out_f, in_f, g)
    t["layout"] = torch.tensor([had, group], dtype=torch.int32)
    FMT.check_tensors(t, params, out_f, in_f)
    kernel = choose_kernel(LinearSpec(params, out_f, in_f), "cpu", torch.float32, prefer=prefer)
    runtime = kernel.prepare(t)
    x = torch.randn(rows, in_f, generator=g)
    bias = torch.randn(out_f, generator=g)
    want = FMT.matmul(x, t, params, in_f, bias)
    got = kernel.apply(runtime, x, bias)
    assert got.shape == (rows, out_f) and torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


WGROUP_CASES = [  # (in, out, input Hadamard, activation group, weight group)
    (576, 96, 0, 0, 32), (1536, 64, 1, 0, 64), (576, 64, 0, 64, 32), (576, 64, 0, 16, 32), (96, 33, 0, 32, 96),
    (64, 24, 0, 0, 16),
]


@pytest.mark.parametrize("act_bits", [4, 8, 16])
@pytest.mark.parametrize("in_f,out_f,had,group,wgroup", WGROUP_CASES)
@pytest.mark.parametrize("rows", [1, 8])
@pytest.mark.parametrize("prefer", ["w4a4-int", "auto"])
def test_int_kernel_with_weight_groups_matches_the_reference(in_f, out_f, had, group, wgroup, act_bits, rows, prefer):
    """One weight scale per row and group of columns: coarser or finer than the activation groups
    (the GEMM sums the finer ones), per token, with an input Hadamard."""
    g = torch.Generator().manual_seed(in_f + out_f + group + wgroup + rows)
    params = FMT.params(bits=4, act_bits=act_bits, act_clip=0.9, weight_group_size=wgroup)
    t = FMT.example_tensors(params, out_f, in_f, g)
    assert t["scale"].shape == (out_f, in_f // wgroup)
    t["layout"] = torch.tensor([had, group], dtype=torch.int32)
    FMT.check_tensors(t, params, out_f, in_f)
    kernel = choose_kernel(LinearSpec(params, out_f, in_f), "cpu", torch.float32, prefer=prefer)
    runtime = kernel.prepare(t)
    x = torch.randn(rows, in_f, generator=g)
    want = FMT.matmul(x, t, params, in_f)
    got = kernel.apply(runtime, x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    if in_f == wgroup:
        return
    # the group scales are what is applied: the same codes under one scale per row give another output
    flat = {**t, "scale": t["scale"][:, :1].reshape(-1).contiguous()}
    other = FMT.matmul(x, flat, FMT.params(bits=4, act_bits=act_bits, act_clip=0.9), in_f)
    assert not torch.allclose(got, other, rtol=1e-3, atol=1e-3)


def test_gemm_groups_are_the_finer_of_activation_and_weight_groups():
    assert ref.gemm_group_size(576, 0, 0) == 0 and ref.gemm_group_size(576, 0, 32) == 32
    assert ref.gemm_group_size(576, 64, 32) == 32 and ref.gemm_group_size(576, 16, 32) == 16
    assert ref.gemm_group_size(576, 576, 0) == 0
    with pytest.raises(ValueError, match="one must divide the other"):
        ref.gemm_group_size(576, 64, 48)


def _halves_add_up_to_the_layer(t, params, g):
    """Tensors t of a [24, 64] linear cut into two column halves (tensor parallel): each half is a
    valid linear, and their outputs add up to the whole layer's (for input x [5, 64], returned)."""
    x = torch.randn(5, 64, generator=g)
    halves = [FMT.slice_columns(t, params, 64, s, 32) for s in (0, 32)]
    for h in halves:
        FMT.check_tensors(h, params, 24, 32)
    got = sum(FMT.matmul(x[:, s:s + 32], h, params, 32) for s, h in zip((0, 32), halves))
    torch.testing.assert_close(got, FMT.matmul(x, t, params, 64), rtol=1e-5, atol=1e-5)
    return x


def test_weight_groups_in_the_format_are_checked_and_sliced():
    g = torch.Generator().manual_seed(5)
    params = FMT.params(bits=4, weight_group_size=16)
    assert FMT.tensors(params, 24, 64)["scale"].shape == (24, 4)
    with pytest.raises(ValueError, match="weight groups of 16 columns do not divide the input size 40"):
        FMT.check_tensors(FMT.example_tensors(FMT.params(bits=4), 24, 40, g), params, 24, 40)
    t = FMT.example_tensors(params, 24, 64, g)
    bad = {**t, "scale": t["scale"][:, 0].contiguous()}
    with pytest.raises(ValueError, match="scale"):
        FMT.check_tensors(bad, params, 24, 64)
    t["layout"] = torch.tensor([0, 16], dtype=torch.int32)
    _halves_add_up_to_the_layer(t, params, g)
    t["layout"] = torch.tensor([0, 8], dtype=torch.int32)
    assert FMT.slice_columns(t, params, 64, 8, 32) is None               # inside a weight group
    p48 = FMT.params(bits=4, weight_group_size=48)
    t96 = {**FMT.example_tensors(p48, 24, 96, g), "layout": torch.tensor([0, 32], dtype=torch.int32)}
    with pytest.raises(ValueError, match="x.layout: activation groups of 32 and weight groups of 48"):
        FMT.check_tensors(t96, p48, 24, 96, prefix="x.")
    r = FMT.unpack(FMT.pack(FMT.unpack(t, params, 64)), params, 64)
    assert r.weight_group_size == 16 and r.params() == params and torch.equal(r.scale, t["scale"])


def test_the_integer_accumulator_is_exact():
    """acc - z r equals (q_x - z) @ q_w^T computed exactly (float64 of small integers)."""
    g = torch.Generator().manual_seed(1)
    w = torch.randint(-8, 8, (48, 256), generator=g, dtype=torch.int8)
    x = torch.randn(5, 256, generator=g)
    codes, s_x, z_x = ref.quantize_act(x, 4, 0)
    exact = (codes[:, 0].double() - z_x[:, 0].double()) @ w.double().t()
    y = quantized_matmul(x, group_codes(w, 0), torch.ones(48), w.to(torch.int32).sum(1, keepdim=True), 4, 0, False)
    torch.testing.assert_close(y.double(), exact * s_x[:, 0].double(), rtol=1e-6, atol=1e-5)


def test_dense_kernel_refuses_a_format_that_quantizes_activations():
    params = FMT.params(bits=4)
    with pytest.raises(ValueError, match="quantizes activations"):
        choose_kernel(LinearSpec(params, 8, 8), "cpu", torch.float32, prefer="dense")


def test_bad_tensors_are_refused_by_name():
    params = FMT.params(bits=4)
    t = FMT.example_tensors(params, 16, 32, torch.Generator().manual_seed(0))
    del t["scale"]
    with pytest.raises(ValueError, match="missing tensor 'x.scale'"):
        FMT.check_tensors(t, params, 16, 32, prefix="x.")
    t = FMT.example_tensors(params, 16, 30, torch.Generator().manual_seed(0))
    t["layout"] = torch.tensor([1, 0], dtype=torch.int32)
    with pytest.raises(ValueError, match="no Hadamard"):
        FMT.check_tensors(t, params, 16, 30)
    t["layout"] = torch.tensor([0, 7], dtype=torch.int32)
    with pytest.raises(ValueError, match="does not divide"):
        FMT.check_tensors(t, params, 16, 30)
    with pytest.raises(ValueError, match="act_bits"):
        FMT.params(bits=4, act_bits=5)


@pytest.mark.parametrize("in_f,out_f,had,group", [(96, 40, 0, 0), (64, 24, 1, 0), (64, 24, 0, 32)])
def test_a_linears_own_clip_ratio_is_what_serves_it(in_f, out_f, had, group):
    """per_linear_act_clip: the linear's ``act_clip`` tensor, not the checkpoint's ratio, clips its
    activations in the reference, the integer kernel, unpack/pack and a column slice."""
    g = torch.Generator().manual_seed(in_f + out_f + group)
    params = FMT.params(bits=4, act_bits=4, act_clip=1.0, per_linear_act_clip=True)
    t = FMT.example_tensors(params, out_f, in_f, g)
    assert t["act_clip"].tolist() == [1.0]
    t["layout"] = torch.tensor([had, group], dtype=torch.int32)
    t["act_clip"] = torch.tensor([0.6])
    FMT.check_tensors(t, params, out_f, in_f)
    x, bias = torch.randn(7, in_f, generator=g) * 2, torch.randn(out_f, generator=g)
    codes = ref.unpack_int4(t["qweight"], in_f)
    want = ref.matmul(x, codes, t["scale"], 4, group, bool(had), 0.6, bias)
    assert not torch.allclose(want, ref.matmul(x, codes, t["scale"], 4, group, bool(had), 1.0, bias))
    torch.testing.assert_close(FMT.matmul(x, t, params, in_f, bias), want)
    kernel = choose_kernel(LinearSpec(params, out_f, in_f), "cpu", torch.float32)
    got = kernel.apply(kernel.prepare(t), x, bias)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    result = FMT.unpack(t, params, in_f)
    assert result.own_act_clip() == pytest.approx(0.6) and result.params() == params
    assert all(torch.equal(a, t[k]) for k, a in FMT.pack(result).items())
    if group:
        half = FMT.slice_columns(t, params, in_f, 0, in_f // 2)
        assert half["act_clip"].tolist() == t["act_clip"].tolist()
        FMT.check_tensors(half, params, out_f, in_f // 2)
    del t["act_clip"]
    with pytest.raises(ValueError, match="missing tensor 'x.act_clip'"):
        FMT.check_tensors(t, params, out_f, in_f, prefix="x.")
    for bad in (0.0, 1.5, float("nan")):
        t["act_clip"] = torch.tensor([bad])
        with pytest.raises(ValueError, match="act_clip is"):
            FMT.check_tensors(t, params, out_f, in_f)
    # A checkpoint-wide ratio has no such tensor.
    assert "act_clip" not in FMT.tensors(FMT.params(bits=4), out_f, in_f)


def test_slice_columns_only_where_a_column_range_is_a_w4a4_linear():
    """Tensor-parallel hooks (the vLLM plugin): per-head activation groups split at group boundaries,
    and the ranks' partial outputs sum to the whole layer's; an input Hadamard, per-token ranges or a
    range crossing a group cannot be split (None: the loader keeps the layer whole)."""
    g = torch.Generator().manual_seed(3)
    params = FMT.params(bits=4)
    t = FMT.example_tensors(params, 24, 64, g)
    t["layout"] = torch.tensor([0, 16], dtype=torch.int32)
    x = _halves_add_up_to_the_layer(t, params, g)
    assert not FMT.columns_split_by_spec
    assert FMT.slice_columns(t, params, 64, 8, 32) is None          # crosses a group
    for layout in ([0, 0], [1, 0], [1, 16]):                          # per-token range / input Hadamard
        t["layout"] = torch.tensor(layout, dtype=torch.int32)
        assert FMT.slice_columns(t, params, 64, 0, 32) is None
    t["layout"] = torch.tensor([0, 0], dtype=torch.int32)
    fp_act = FMT.params(bits=4, act_bits=16)                          # float activations: any range
    h = FMT.slice_columns(t, fp_act, 64, 5, 20)
    torch.testing.assert_close(FMT.matmul(x[:, 5:25], h, fp_act, 20),
                               x[:, 5:25] @ FMT.dequantize(t, fp_act, 64)[:, 5:25].t(), rtol=1e-5, atol=1e-5)
    assert FMT.kv_cache_bits(FMT.params(bits=4)) == 4 and FMT.kv_cache_bits(FMT.params(bits=4, kv_bits=16)) is None


# ---------------------------------------------------------------------------------------- KV cache
def _tiny_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("group", [0, 8])
def test_kv_cache_incremental_equals_one_pass_and_is_small(group):
    m = _tiny_model()
    ids = torch.randint(0, 100, (2, 12))
    with torch.no_grad():
        whole = m(ids, past_key_values=QuantizedKVCache(2, 4, store=False, group_size=group)).logits
        cache = QuantizedKVCache(2, 4, group_size=group)
        parts = [m(ids[:, :8], past_key_values=cache).logits]
        for i in range(8, 12):
            parts.append(m(ids[:, i:i + 1], past_key_values=cache).logits)
        dense = DynamicCache()
        m(ids, past_key_values=dense)
        fp = m(ids).logits
    torch.testing.assert_close(torch.cat(parts, 1), whole, rtol=1e-4, atol=1e-4)
    assert (whole - fp).abs().max() > 1e-4  # the cache really quantizes
    assert cache.get_seq_length() == 12
    fp16_bytes = sum(layer.keys.numel() + layer.values.numel() for layer in dense.layers) * 2
    d = 16  # per (token, head): d/2 bytes of codes, an fp32 scale and a uint8 zero per group
    assert cache.nbytes() == fp16_bytes // (2 * d) * (d // 2 + 5 * (d // (group or d)))
    if group:  # the groups are what the cache applies: one range per head gives other logits
        with torch.no_grad():
            per_head = m(ids, past_key_values=QuantizedKVCache(2, 4, store=False)).logits
        assert (per_head - whole).abs().max() > 1e-4 and (whole - fp).abs().max() < (per_head - fp).abs().max()


def test_kv_groups_reach_the_cache_and_must_divide_head_dim():
    from transformers import LlamaConfig

    mc = LlamaConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=2)   # head_dim 16
    cache = FMT.kv_cache(FMT.params(bits=4, kv_group_size=8), mc)
    assert {layer.group_size for layer in cache.layers} == {8}
    with pytest.raises(ValueError, match="KV groups of 12 channels do not divide head_dim 16"):
        FMT.kv_cache(FMT.params(bits=4, kv_group_size=12), mc)
    with pytest.raises(ValueError, match="KV groups of 12 channels do not divide head_dim 16; pass a --kv-group"):
        SpinQuantConfig(kv_group=12).for_layer("model.layers.0.self_attn.q_proj", mc)
    SpinQuantConfig(kv_group=12, kv_bits=16).for_layer("model.layers.0.self_attn.q_proj", mc)  # no KV cache
    k = torch.randn(1, 2, 5, 16)
    kq, vq = ref.fake_quant_kv(k, k, 4, group_size=8)
    per_group = ref.fake_quant_act(k, 4, 8)
    torch.testing.assert_close(vq, per_group)


def test_kv_fake_quant_is_exact_for_values_on_the_grid():
    """R_d is orthogonal: keys already on the rotated grid come back unchanged."""
    k = torch.randn(1, 2, 5, 16)
    kq, vq = ref.fake_quant_kv(k, k, 4)
    kq2, vq2 = ref.fake_quant_kv(kq, vq, 4)
    torch.testing.assert_close(kq2, kq, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(vq2, vq, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------ method
def _layer_problem(seed=0, out_f=32, in_f=64, n=512):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g)
    x = torch.randn(n, in_f, generator=g) @ torch.randn(in_f, in_f, generator=g) * 0.3
    return w, x.t() @ x


def test_gptq_beats_round_to_nearest_on_its_objective():
    w, H = _layer_problem()
    cfg = SpinQuantConfig(bits=4)
    gptq = quantize_w4a4(w, H, cfg)
    rtn = quantize_w4a4(w, H, SpinQuantConfig(bits=4, rtn=True))
    assert gptq.stats["objective"] < 0.8 * rtn.stats["objective"]
    assert gptq.codes.dtype == torch.int8 and int(gptq.codes.min()) >= -8 and int(gptq.codes.max()) <= 7


def test_clipping_search_never_does_worse_than_no_clipping():
    w = torch.randn(64, 128) * torch.rand(64, 1)
    w[:, 0] *= 20  # an outlier column: clipping pays
    for search in (False, True):
        s = clipped_scale(w, 4, search)
        err = (ref.dequantize_weight(ref.quantize_weight(w, s, 4), s) - w).abs().pow(2.4).sum(1)
        if not search:
            base = err
    assert bool((err <= base + 1e-4).all()) and float(err.sum()) < float(base.sum())


def test_weight_groups_lower_the_objective_and_are_refused_where_they_cannot_be():
    w, H = _layer_problem()
    per_row = quantize_w4a4(w, H, SpinQuantConfig(bits=4))
    grouped = quantize_w4a4(w, H, SpinQuantConfig(bits=4, weight_group=32))
    assert grouped.scale.shape == (w.shape[0], w.shape[1] // 32) and grouped.weight_group_size == 32
    assert grouped.stats["objective"] < 0.9 * per_row.stats["objective"]
    # each group's scale is the clipping search run on that group alone
    torch.testing.assert_close(grouped.scale[:, 1], clipped_scale(w[:, 32:64], 4))
    with pytest.raises(ValueError, match="weight groups of 40 do not divide"):
        quantize_w4a4(w, H, SpinQuantConfig(bits=4, weight_group=40))
    from transformers import LlamaConfig

    mc = LlamaConfig(hidden_size=64, num_attention_heads=4, intermediate_size=96)
    with pytest.raises(ValueError, match="activation groups of 32 and weight groups of 48"):
        quantize_w4a4(*_layer_problem(in_f=96), SpinQuantConfig(bits=4, weight_group=48, act_group=32).for_layer(
            "model.layers.0.mlp.up_proj", mc))


def test_down_proj_is_quantized_in_the_hadamard_basis_and_o_proj_per_head():
    from transformers import LlamaConfig

    mc = LlamaConfig(hidden_size=64, num_attention_heads=4, intermediate_size=96)
    cfg = SpinQuantConfig(bits=4)
    w, H = _layer_problem(in_f=96)
    down = quantize_w4a4(w, H, cfg.for_layer("model.layers.0.mlp.down_proj", mc))
    assert down.input_hadamard and down.act_group_size == 0
    # W_hat is reported in the layer's own (unrotated) input basis, so the objective is comparable.
    assert quadratic_objective(w, down.dequantize(), H) < quadratic_objective(w, torch.zeros_like(w), H) * 0.05
    o = quantize_w4a4(*_layer_problem(in_f=64), cfg.for_layer("model.layers.0.self_attn.o_proj", mc))
    assert not o.input_hadamard and o.act_group_size == 16
    packed = FMT.pack(down)
    assert torch.equal(FMT.dequantize(packed, down.params(), 96), down.dequantize())
    assert isinstance(FMT.unpack(packed, down.params(), 96), W4A4Quant)


def test_act_group_sets_every_linears_activation_groups():
    from transformers import LlamaConfig

    mc = LlamaConfig(hidden_size=64, num_attention_heads=4, intermediate_size=96)  # head_dim 16
    want = {(8, "self_attn.q_proj"): 8, (8, "self_attn.o_proj"): 8, (8, "mlp.down_proj"): 8,
            (32, "self_attn.q_proj"): 32, (32, "self_attn.o_proj"): 16, (32, "mlp.down_proj"): 32}
    for (g, n), size in want.items():
        c = SpinQuantConfig(act_group=g).for_layer(f"model.layers.0.{n}", mc)
        assert c._act_group_size == size, (g, n)
    down = quantize_w4a4(*_layer_problem(in_f=96), SpinQuantConfig(act_group=8).for_layer(
        "model.layers.0.mlp.down_proj", mc))
    assert down.input_hadamard and down.act_group_size == 8
    with pytest.raises(ValueError, match="groups of 40 do not divide this linear's 96 input channels"):
        quantize_w4a4(*_layer_problem(in_f=96), SpinQuantConfig(act_group=40).for_layer(
            "model.layers.0.mlp.down_proj", mc))


# ------------------------------------------------------------------------- a tiny model end to end
N, SEQ = 4, 16



@pytest.fixture(scope="module")
def w4a4_dir(tiny_lm_dir, corpus, tmp_path_factory):
    from gq_quantize import pipeline
    from gq_quantize.config import CalibrationConfig, QuantizeConfig

    out = tmp_path_factory.mktemp("w4a4") / "ckpt"
    # Unclipped ranges: the whole-model comparison below holds only while no activation code flips
    # between the integer and the float path, and with these ids and ranges none does (a flip needs a
    # value within float rounding of a rounding boundary). Clipped ranges: the kernel test above and
    # test_default_clip_ratios_reach_the_loaded_model.
    cfg = QuantizeConfig(method="spinquant", bits=4, guided=True, groups=1, act_clip=1.0, kv_clip=1.0,
                         per_linear_act_clip=False,
                         calibration=CalibrationConfig(data=str(corpus), n_samples=N, seq_len=SEQ))
    pipeline.quantize_model(tiny_lm_dir, cfg, out, tmp_path_factory.mktemp("cache"), progress=False)
    return out


def _simulated(tiny_lm_dir, ckpt, ids):
    """The fake-quant model: the dense model with every linear replaced by the reference matmul
    of its exported tensors and a KV cache that fake-quantizes without storing."""
    from safetensors.torch import load_file

    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir, dtype=torch.float32).eval()
    tensors = {}
    for f in Path(ckpt).glob("*.safetensors"):
        tensors.update(load_file(str(f)))
    qc = json.loads((Path(ckpt) / "config.json").read_text())["quantization_config"]
    params = FMT.params(**{k: qc[k] for k in ("bits", "act_bits", "act_clip", "kv_bits", "kv_clip",
                                              "weight_group_size") if k in qc})
    for name, mod in list(model.named_modules()):
        if isinstance(mod, torch.nn.Linear) and f"{name}.qweight" in tensors:
            t = {s: tensors[f"{name}.{s}"] for s in ("qweight", "scale", "layout")}
            mod.forward = (lambda t, i: lambda x: FMT.matmul(x, t, params, i))(t, mod.in_features)
    with torch.no_grad():
        cache = QuantizedKVCache(model.config.num_hidden_layers, qc["kv_bits"], qc["kv_clip"], store=False,
                                 group_size=qc.get("kv_group_size", 0))
        return model(ids, past_key_values=cache).logits


def test_w4a4_checkpoint_loads_and_matches_the_fake_quant_model(w4a4_dir, tiny_lm_dir):
    from gq_serve.checkpoint import load_quantized_model

    qc = json.loads((w4a4_dir / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "w4a4" and qc["act_bits"] == 4 and qc["kv_bits"] == 4
    ids = torch.randint(3, 40, (2, 10))
    want = _simulated(tiny_lm_dir, w4a4_dir, ids)
    model = load_quantized_model(w4a4_dir)
    assert len(model.gq_kernels) == 1 and set(model.gq_kernels) <= {"w4a4-int", "w4a4-cpu-avx512vnni", "w4a4-cpu-avx512", "w4a4-cpu-avx2"}  # this CPU's integer kernel
    assert model.gq_kv_bits == 4
    with torch.no_grad():
        got = model(ids, use_cache=False).logits
        hf = AutoModelForCausalLM.from_pretrained(w4a4_dir, dtype=torch.float32).eval()(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(hf, want, rtol=1e-4, atol=1e-4)


def test_sensitivity_script_raises_one_kind_of_linear_at_a_time(w4a4_dir, corpus, tmp_path):
    """scripts/w4a4_sensitivity.py: the baseline row is the checkpoint as loaded, each row raises
    exactly the linears it names, and a rerun measures nothing again."""
    from gq_serve.checkpoint import load_quantized_model
    from gq_serve.util import import_file

    mod = import_file("w4a4_sensitivity", Path(__file__).resolve().parent.parent / "scripts" / "w4a4_sensitivity.py")
    out = tmp_path / "sens.json"
    argv = [str(w4a4_dir), "--data", str(corpus), "--ctx", "16", "--windows", "2", "--act-bits", "16",
            "--per-layer", "down", "--out", str(out)]
    assert mod.main(argv) == 0
    rows = {(r["kind"], r["layer"]): r for r in json.loads(out.read_text())}
    n_layers = load_quantized_model(w4a4_dir).config.num_hidden_layers
    assert len(rows) == 1 + len(mod.KINDS) + n_layers
    assert rows[("all", None)]["linears_raised"] == 7 * n_layers
    assert rows[("gate_up", None)]["linears_raised"] == 2 * n_layers
    assert all(rows[("down", i)]["linears_raised"] == 1 for i in range(n_layers))
    assert rows[("all", None)]["ppl"] != rows[("none", None)]["ppl"]

    from gq_quantize.data import eval_windows
    from gq_serve.evaluate import perplexity
    from transformers import AutoTokenizer

    w = eval_windows(AutoTokenizer.from_pretrained(w4a4_dir), str(corpus), 16, 32)
    got = perplexity(load_quantized_model(w4a4_dir), w, progress=False)["ppl"]
    assert got == pytest.approx(rows[("none", None)]["ppl"], rel=1e-6)
    before = out.read_text()
    assert mod.main(argv) == 0 and out.read_text() == before
    render = import_file("render_results", Path(__file__).resolve().parent.parent / "scripts" / "render_results.py")
    table = render.w4a4_sensitivity_table(json.loads(before))
    assert f"| raised to float | {rows[('qkv', None)]['ppl']:.2f} |" in table
    assert f"One layer's down activations raised to float (layer: perplexity): 0: {rows[('down', 0)]['ppl']:.2f}," in table
    with pytest.raises(SystemExit, match="fewer than --windows"):
        mod.main([str(w4a4_dir), "--data", str(corpus), "--ctx", "16", "--windows", "100000", "--out", str(out)])


def test_clip_search_tries_each_kind_and_keeps_the_best(w4a4_dir, corpus, tmp_path):
    """scripts/w4a4_sensitivity.py --clip-search: one pass of coordinate descent over the kinds, each
    row measured with exactly its clip ratios, the best carried forward; a rerun measures nothing."""
    from gq_quantize.data import eval_windows
    from gq_serve.checkpoint import load_quantized_model
    from gq_serve.evaluate import perplexity
    from gq_serve.util import import_file
    from transformers import AutoTokenizer

    scripts = Path(__file__).resolve().parent.parent / "scripts"
    mod = import_file("w4a4_sensitivity", scripts / "w4a4_sensitivity.py")
    out = tmp_path / "clips.json"
    argv = [str(w4a4_dir), "--data", str(corpus), "--ctx", "16", "--windows", "2", "--clip-search", "kind",
            "--clip-grid", "0.5", "1.0", "--out", str(out)]
    assert mod.main(argv) == 0
    rows = json.loads(out.read_text())
    start = rows[0]["checkpoint_act_clip"]
    tried = [c for c in (0.5, 1.0) if c != start]
    assert len(rows) == 1 + 4 * len(tried) and all(r["kind"] == "clips" for r in rows)
    # each kind's trials start from the best clips found before it
    best, clips = rows[0]["ppl"], rows[0]["clips"]
    for i, kind in enumerate(("gate_up", "down", "qkv", "o")):
        for r in rows[1 + i * len(tried): 1 + (i + 1) * len(tried)]:
            assert {k: v for k, v in r["clips"].items() if k != kind} == {k: v for k, v in clips.items() if k != kind}
            if r["ppl"] < best:
                best, clips = r["ppl"], r["clips"]
    # a row's perplexity is the model's with those clip ratios, set independently here
    model = load_quantized_model(w4a4_dir).eval()
    row = rows[-1]
    for name, m in mod.activation_linears(model).items():
        kind = next(k for k in row["clips"] if name.endswith(mod.KINDS[k]))
        m.params = m.params.model_copy(update={"act_clip": row["clips"][kind]})
        m.reset_cache()
    w = eval_windows(AutoTokenizer.from_pretrained(w4a4_dir), str(corpus), 16, 32)
    assert perplexity(model, w, progress=False)["ppl"] == pytest.approx(row["ppl"], rel=1e-6)
    before = out.read_text()
    assert mod.main(argv) == 0 and out.read_text() == before
    render = import_file("render_results", scripts / "render_results.py")
    assert f"{best:.2f}, against {rows[0]['ppl']:.2f}" in render.w4a4_sensitivity_table(rows)
    with pytest.raises(SystemExit):
        mod.main(argv[:-2] + ["--clip-grid", "1.5", "--out", str(out)])


def test_clip_search_per_linear_picks_the_least_output_error(w4a4_dir, corpus, tmp_path):
    """--clip-search linear: every activation linear gets the grid ratio with the least output error on
    the calibration windows, checked here for one linear from its own captured inputs."""
    from gq_quantize.data import eval_windows
    from gq_serve.checkpoint import load_quantized_model
    from gq_serve.util import import_file
    from transformers import AutoTokenizer

    mod = import_file("w4a4_sensitivity", Path(__file__).resolve().parent.parent / "scripts" / "w4a4_sensitivity.py")
    out = tmp_path / "clips.json"
    assert mod.main([str(w4a4_dir), "--data", str(corpus), "--ctx", "16", "--windows", "2", "--clip-search", "linear",
                     "--clip-grid", "0.3", "1.0", "--clip-data", str(corpus), "--clip-windows", "3",
                     "--out", str(out)]) == 0
    rows = {r["kind"]: r for r in json.loads(out.read_text())}
    chosen = rows["clips_linear"]["clips"]
    model = load_quantized_model(w4a4_dir).eval()
    linears = mod.activation_linears(model)
    assert set(chosen) == set(linears) and set(chosen.values()) <= {0.3, 1.0}
    name = "model.layers.0.mlp.down_proj"
    m, seen = linears[name], []
    h = m.register_forward_pre_hook(lambda m, a: seen.append(a[0].reshape(-1, a[0].shape[-1]).clone()))
    with torch.inference_mode():
        for w in eval_windows(AutoTokenizer.from_pretrained(w4a4_dir), str(corpus), 16, 48):
            model(input_ids=w[None], use_cache=False)
    h.remove()
    x, p0 = torch.cat(seen), m.params
    with torch.inference_mode():
        m.params = p0.model_copy(update={"act_bits": 16})
        m.reset_cache()
        want = m(x)
        errs = {}
        for c in (0.3, 1.0):
            m.params = p0.model_copy(update={"act_clip": c})
            m.reset_cache()
            errs[c] = (m(x).double() - want.double()).pow(2).sum().item()
    assert errs[0.3] != errs[1.0] and chosen[name] == min(errs, key=errs.get)
    assert rows["clips_linear"]["ppl"] != rows["clips"]["ppl"] or len(set(chosen.values())) == 1
    render = import_file("render_results", Path(__file__).resolve().parent.parent / "scripts" / "render_results.py")
    table = render.w4a4_sensitivity_table(json.loads(out.read_text()))
    assert (f"(`--clip-search linear`), `{w4a4_dir.name}` on {rows['clips']['eval_data']}, last 2 x 16 tokens: "
            f"{rows['clips_linear']['ppl']:.2f}, against {rows['clips']['ppl']:.2f}") in table
    assert "coordinate descent" not in table  # no kind search was run


def test_clip_search_per_linear_can_share_one_ratio_per_input(w4a4_dir, corpus, tmp_path):
    """--clip-share: q/k/v (gate/up) of a layer take one ratio, that of their summed output error."""
    from gq_serve.util import import_file

    mod = import_file("w4a4_sensitivity", Path(__file__).resolve().parent.parent / "scripts" / "w4a4_sensitivity.py")
    out = tmp_path / "clips.json"
    args = [str(w4a4_dir), "--data", str(corpus), "--ctx", "16", "--windows", "2", "--clip-search", "linear",
            "--clip-grid", "0.8", "0.9", "0.95", "1.0", "--clip-data", str(corpus), "--clip-windows", "3",
            "--out", str(out)]
    assert mod.main(args) == 0 and mod.main(args + ["--clip-share"]) == 0
    rows = [r for r in json.loads(out.read_text()) if r["kind"] == "clips_linear"]
    own, shared = (next(r for r in rows if bool(r.get("clip_share")) == s) for s in (False, True))
    owners = {mod.input_owner(n) for n in shared["clips"]}
    assert len(owners) == 4 * len({n.split(".self_attn.")[0].split(".mlp.")[0] for n in shared["clips"]})
    for o in owners:
        assert len({c for n, c in shared["clips"].items() if mod.input_owner(n) == o}) == 1, o
    assert own["clips"] != shared["clips"]  # some q/k/v or gate/up disagree alone
    render = import_file("render_results", Path(__file__).resolve().parent.parent / "scripts" / "render_results.py")
    assert "(`--clip-share`: q/k/v one ratio, gate/up one)" in render.w4a4_sensitivity_table(json.loads(out.read_text()))


def test_per_linear_act_clip_is_chosen_by_output_error_and_served(w4a4_dir, tiny_lm_dir, corpus, tmp_path):
    """gq quantize --per-linear-act-clip: the codes of the run without it; every linear a ratio of the
    grid with the least output error against float activations on the inputs the served checkpoint
    (at the starting ratio) gives it on the first calibration windows (recomputed here through the
    served kernel); the loaded kernels clip with it."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from gq_quantize import pipeline
    from gq_quantize.config import CalibrationConfig, QuantizeConfig
    from gq_quantize.data import calibration_windows
    from gq_quantize.methods.spinquant import ACT_CLIP_GRID
    from gq_serve.checkpoint import load_quantized_model
    from gq_serve.quant_linear import GQLinear

    calib = CalibrationConfig(data=str(corpus), n_samples=N, seq_len=SEQ)
    cfg = QuantizeConfig(method="spinquant", bits=4, guided=True, groups=1, act_clip=1.0, kv_clip=1.0,
                         per_linear_act_clip=True, act_clip_windows=2, calibration=calib)
    out, cache = tmp_path / "ckpt", tmp_path / "cache"
    pipeline.quantize_model(tiny_lm_dir, cfg, out, cache, progress=False)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["per_linear_act_clip"] is True and qc["act_clip"] == 1.0

    def tensors(d):
        t = {}
        for f in Path(d).glob("*.safetensors"):
            t.update(load_file(str(f)))
        return t

    new, old = tensors(out), tensors(w4a4_dir)
    assert set(new) - set(old) == {k.replace(".qweight", ".act_clip") for k in new if k.endswith(".qweight")}
    assert all(torch.equal(new[k], old[k]) for k in old)  # the weights are those of the run without it
    # stored as float32: the grid value to float32 precision
    clips = {k.removesuffix(".act_clip"): min(ACT_CLIP_GRID, key=lambda c: abs(c - float(v)))
             for k, v in new.items() if k.endswith(".act_clip")}
    assert all(abs(clips[k.removesuffix(".act_clip")] - float(v)) < 1e-7 for k, v in new.items()
               if k.endswith(".act_clip"))
    assert len(set(clips.values())) > 1  # the test below then tells the ratios apart

    # The errors recomputed for every linear from the served checkpoint at ratio 1.0.
    model = load_quantized_model(w4a4_dir).eval()
    lin = {n: m for n, m in model.named_modules() if isinstance(m, GQLinear)}
    seen = {n: [] for n in lin}
    hooks = [lin[n].register_forward_pre_hook(lambda m, a, n=n: seen[n].append(a[0].reshape(-1, a[0].shape[-1])))
             for n in seen]
    windows = calibration_windows(AutoTokenizer.from_pretrained(tiny_lm_dir), str(corpus), N, SEQ, calib.seed, cache)
    with torch.inference_mode():
        for w in windows[:2]:
            model(input_ids=w[None], use_cache=False)
    for h in hooks:
        h.remove()
    with torch.inference_mode():
        for n, m in lin.items():
            p0, x, errs = m.params, torch.cat(seen[n]), {}
            m.params = p0.model_copy(update={"act_bits": 16})
            m.reset_cache()
            want = m(x).double()
            for c in ACT_CLIP_GRID:
                m.params = p0.model_copy(update={"act_clip": c})
                m.reset_cache()
                errs[c] = (m(x).double() - want).pow(2).sum().item()
            assert clips[n] == min(errs, key=errs.get), (n, errs)

    served = load_quantized_model(out)
    for n, m in served.named_modules():
        if isinstance(m, GQLinear):
            assert m.select_kernel("cpu", torch.float32).act_clip == pytest.approx(clips[n])
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(torch.tensor([[5, 6, 7]])).logits, served(torch.tensor([[5, 6, 7]])).logits)


def test_per_linear_act_clip_without_gptq_and_not_streamed(tiny_lm_dir, corpus, tmp_path):
    """--rtn needs no Hessians, but the clip search still reads calibration windows; --streamed never
    holds the model the search runs, so it is refused before anything is written."""
    from gq_quantize import pipeline
    from gq_quantize.config import CalibrationConfig, QuantizeConfig

    cfg = QuantizeConfig(method="spinquant", bits=4, rtn=True, per_linear_act_clip=True,
                         calibration=CalibrationConfig(data=str(corpus), n_samples=N, seq_len=SEQ))
    with pytest.raises(pipeline.QuantizeError, match="--streamed cannot hold: pass --no-per-linear-act-clip"):
        pipeline.quantize_model(tiny_lm_dir, cfg, tmp_path / "s", tmp_path / "cache", streamed=True, progress=False)
    assert not list(tmp_path.iterdir())
    summary = pipeline.quantize_model(tiny_lm_dir, cfg, tmp_path / "ckpt", tmp_path / "cache", progress=False)
    assert summary["timings_s"]["after_quantize_s"] >= 0
    layers = json.loads((tmp_path / "ckpt" / "gq_manifest.json").read_text())["layers"]
    from safetensors.torch import load_file

    stored = load_file(str(tmp_path / "ckpt" / "model.safetensors"))
    assert {n: pytest.approx(float(stored[f"{n}.act_clip"])) for n in layers} == \
        {n: s["act_clip"] for n, s in layers.items()}


# --------------------------------------------------------------------------- end-to-end fine-tune
def _w4a4_results(model, weight_group=0, clip=1.0):
    """Round-to-nearest w4a4 results of every decoder linear of ``model`` (the method's layouts)."""
    from gq_quantize.calibration import quantizable_linears

    cfg = SpinQuantConfig(rtn=True, act_clip=clip, kv_clip=1.0, weight_group=weight_group, kv_group=4)
    return {n: quantize_w4a4(lin.weight.detach().float(), None, cfg.for_layer(n, model.config))
            for n, lin in quantizable_linears(model).items()}


def test_w4a4_train_forward_is_the_spec_with_straight_through_gradients():
    from gq_kernels.hadamard import hadamard_transform

    g = torch.Generator().manual_seed(0)
    cfg = SpinQuantConfig(rtn=True, act_clip=0.9, weight_group=16)
    r = quantize_w4a4(torch.randn(12, 64, generator=g), None,
                      cfg.for_layer("model.layers.0.mlp.down_proj", SimpleNamespace(head_dim=8)))
    r = dataclasses.replace(r, per_linear_act_clip=True, linear_act_clip=0.7)
    x = torch.randn(3, 5, 64, generator=g, requires_grad=True)
    bias = torch.randn(12, generator=g)
    scale = r.scale.float().requires_grad_(True)
    y = dataclasses.replace(r, scale=scale).train_forward(x, bias)
    want = ref.matmul(x.detach(), r.codes, r.scale, 4, 0, True, 0.7, bias)   # its own ratio, R4 on the input
    torch.testing.assert_close(y, want)
    assert not torch.equal(want, ref.matmul(x.detach(), r.codes, r.scale, 4, 0, True, 0.9, bias))
    y.pow(2).sum().backward()
    assert scale.grad is not None and scale.grad.abs().sum() > 0
    # straight through: d/dx of quantize(x R4) W^T is the float path's (dy W) R4^T
    w = ref.dequantize_weight(r.codes, r.scale)
    torch.testing.assert_close(x.grad, hadamard_transform(2 * y.detach() @ w, transpose=True), rtol=1e-4, atol=1e-4)


def _served_kl(model, results, ids):
    """KL(fp || fake-quant w4a4 model of ``results``) per token: every linear the reference matmul at
    its own ratio, the KV cache fake-quantized (KV groups of 4, unclipped)."""
    import copy

    from gq_quantize.finetune import token_kl

    sim = copy.deepcopy(model)
    for name, r in results.items():
        lin = sim.get_submodule(name)
        lin.forward = (lambda r, b: lambda x: ref.matmul(x, r.codes, r.scale, r.act_bits, r.act_group_size,
                                                         r.input_hadamard, r.own_act_clip(), b))(r, lin.bias)
    with torch.no_grad():
        cache = QuantizedKVCache(model.config.num_hidden_layers, 4, 1.0, store=False, group_size=4)
        return float(token_kl(sim(ids, past_key_values=cache).logits, model(ids).logits))


def test_finetune_trains_the_w4a4_model_as_served(tiny_lm):
    """The fine-tune's student is the served model (inputs quantized at each linear's own ratio, the
    4-bit KV cache): its first loss is that model's KL; the scales move, the codes stay, the KL falls."""
    from gq_quantize.finetune import FinetuneConfig, finetune_results

    model = tiny_lm[0]
    results = _w4a4_results(model, weight_group=16)
    results = {n: dataclasses.replace(r, per_linear_act_clip=True, linear_act_clip=0.6 + 0.1 * (i % 4))
               for i, (n, r) in enumerate(results.items())}
    windows = torch.randint(3, model.config.vocab_size, (8, 16), generator=torch.Generator().manual_seed(1))
    first = windows[torch.randint(0, 8, (2,), generator=torch.Generator().manual_seed(0))]   # the fine-tune's draw
    _, _, one = finetune_results(model, results, windows, FinetuneConfig(steps=1, batch=2, precision="float32"),
                                 progress=False)
    assert one["kl_first10"] == pytest.approx(_served_kl(model, results, first), rel=1e-4)
    assert one["lr"] == W4A4Quant.finetune_lr   # the format's default: a relative step
    unclipped = {n: dataclasses.replace(r, per_linear_act_clip=False) for n, r in results.items()}
    assert one["kl_first10"] != pytest.approx(_served_kl(model, unclipped, first), rel=1e-3)  # the ratios count

    # The scales are tuned as logarithms: Adam's first step (+-lr per element) moves each by the same
    # fraction, whatever its size, and keeps it positive.
    stepped, _, _ = finetune_results(model, results, windows, FinetuneConfig(steps=1, lr=0.05, precision="float32"),
                                     progress=False)
    for n, r in stepped.items():
        ratio = (r.scale.float() / results[n].scale.float()).flatten()
        moved = (ratio - 1).abs() > 0.01
        assert moved.float().mean() > 0.5, n
        torch.testing.assert_close(ratio[moved].log().abs(), torch.full_like(ratio[moved], 0.05), atol=2e-3, rtol=0)

    tuned, _, stats = finetune_results(model, results, windows, FinetuneConfig(steps=40, lr=1e-3, batch=4,
                                                                               precision="float32"), progress=False)
    assert stats["kl_last10"] < 0.8 * stats["kl_first10"], stats
    for n, r in tuned.items():
        assert torch.equal(r.codes, results[n].codes) and r.scale.dtype == torch.float16
        assert r.scale.shape == results[n].scale.shape and not torch.equal(r.scale, results[n].scale)
        assert r.own_act_clip() == results[n].own_act_clip()
    assert _served_kl(model, tuned, windows) < _served_kl(model, results, windows)
    assert all(p.grad is None for p in model.parameters())


def test_gq_quantize_spinquant_finetune_serves_the_tuned_scales(w4a4_dir, tiny_lm_dir, corpus, tmp_path,
                                                                 monkeypatch):
    """--finetune-steps with --method spinquant: the codes of the run without it, other scales, the
    manifest's fine-tune stats; the loaded checkpoint is the fake-quant model of its tensors; the
    per-linear clip pass runs first and its ratios are the ones of the run without a fine-tune."""
    from safetensors.torch import load_file

    from gq_quantize import pipeline
    from gq_quantize.config import CalibrationConfig, QuantizeConfig
    from gq_quantize.finetune import FinetuneConfig
    from gq_serve.checkpoint import load_quantized_model

    calib = CalibrationConfig(data=str(corpus), n_samples=N, seq_len=SEQ)
    common = dict(method="spinquant", bits=4, guided=True, groups=1, act_clip=1.0, kv_clip=1.0, calibration=calib)
    out = tmp_path / "ft"
    cfg = QuantizeConfig(**common, per_linear_act_clip=False, finetune=FinetuneConfig(steps=4, lr=1e-3))
    summary = pipeline.quantize_model(tiny_lm_dir, cfg, out, tmp_path / "cache", progress=False)
    assert summary["timings_s"]["finetune_s"] > 0
    manifest = json.loads((out / "gq_manifest.json").read_text())
    assert manifest["finetune"]["steps"] == 4
    new, old = load_file(str(out / "model.safetensors")), load_file(str(w4a4_dir / "model.safetensors"))
    assert set(new) == set(old)
    q = [k for k in new if k.endswith(".qweight")]
    assert all(torch.equal(new[k], old[k]) for k in q)
    assert all(new[k.replace("qweight", "scale")].dtype == torch.float16 for k in q)
    assert sum(not torch.equal(new[k.replace("qweight", "scale")], old[k.replace("qweight", "scale")]) for k in q) \
        == len(q)
    ids = torch.randint(3, 40, (2, 10))
    with torch.no_grad():
        got = load_quantized_model(out)(ids, use_cache=False).logits
    torch.testing.assert_close(got, _simulated(tiny_lm_dir, out, ids), rtol=1e-4, atol=1e-4)

    # With --per-linear-act-clip the fine-tune trains the ratios the checkpoint keeps: it receives
    # results whose ratios are chosen, and those are the ones of the same run without a fine-tune.
    from gq_quantize import finetune

    seen = {}

    def spy(model, results, *args, **kwargs):
        seen.update({n: r.linear_act_clip for n, r in results.items()})
        return real(model, results, *args, **kwargs)

    real = finetune.finetune_results
    monkeypatch.setattr(finetune, "finetune_results", spy)
    lin = tmp_path / "lin"
    cfg = QuantizeConfig(**common, per_linear_act_clip=True, finetune=FinetuneConfig(steps=2, lr=1e-3))
    pipeline.quantize_model(tiny_lm_dir, cfg, lin, tmp_path / "cache", progress=False)
    plain = tmp_path / "lin-plain"
    pipeline.quantize_model(tiny_lm_dir, cfg.model_copy(update={"finetune": FinetuneConfig()}), plain,
                            tmp_path / "cache", progress=False)
    a, b = load_file(str(lin / "model.safetensors")), load_file(str(plain / "model.safetensors"))
    assert seen and {n: pytest.approx(float(b[f"{n}.act_clip"])) for n in seen} == seen
    assert all(torch.equal(a[k], b[k]) for k in a if k.endswith(".act_clip"))


def test_weight_groups_quantize_export_load_and_serve(tiny_lm_dir, corpus, tmp_path):
    """--weight-group 16 on the tiny model (o_proj's activation groups of head_dim 8 are finer, the
    MLP's per-token ranges coarser): the loaded model equals the fake-quant reference of its tensors."""
    from gq_quantize import pipeline
    from gq_quantize.config import CalibrationConfig, QuantizeConfig
    from gq_serve.checkpoint import load_quantized_model

    cfg = QuantizeConfig(method="spinquant", bits=4, weight_group=16, kv_group=4, act_clip=1.0, kv_clip=1.0,
                         per_linear_act_clip=False,
                         calibration=CalibrationConfig(data=str(corpus), n_samples=N, seq_len=SEQ))
    pipeline.quantize_model(tiny_lm_dir, cfg, tmp_path / "ckpt", tmp_path / "cache", progress=False)
    qc = json.loads((tmp_path / "ckpt" / "config.json").read_text())["quantization_config"]
    assert qc["weight_group_size"] == 16 and qc["kv_group_size"] == 4
    model = load_quantized_model(tmp_path / "ckpt")
    o = model.model.layers[0].self_attn.o_proj
    assert o.scale.shape == (o.out_features, o.in_features // 16)
    ids = torch.randint(3, 40, (2, 10))
    want = _simulated(tiny_lm_dir, tmp_path / "ckpt", ids)
    with torch.no_grad():
        got = model(ids, use_cache=False).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        cache = model(ids[:, :3], use_cache=True).past_key_values
    assert isinstance(cache, QuantizedKVCache) and {layer.group_size for layer in cache.layers} == {4}


def test_default_clip_ratios_reach_the_loaded_model(tiny_lm_dir, corpus, tmp_path):
    from gq_quantize import pipeline
    from gq_quantize.config import CalibrationConfig, QuantizeConfig
    from gq_serve.checkpoint import load_quantized_model

    cfg = QuantizeConfig(method="spinquant", bits=4, rtn=True,
                         calibration=CalibrationConfig(data=str(corpus), n_samples=N, seq_len=SEQ))
    assert (cfg.options.act_clip, cfg.options.kv_clip, cfg.options.per_linear_act_clip) == (0.8, 0.95, True)
    pipeline.quantize_model(tiny_lm_dir, cfg, tmp_path / "ckpt", tmp_path / "cache", progress=False)
    qc = json.loads((tmp_path / "ckpt" / "config.json").read_text())["quantization_config"]
    assert (qc["act_clip"], qc["kv_clip"], qc["per_linear_act_clip"]) == (0.8, 0.95, True)
    model = load_quantized_model(tmp_path / "ckpt")
    lin = model.model.layers[0].mlp.down_proj
    assert (lin.params.act_clip, lin.params.kv_clip) == (0.8, 0.95)
    assert lin.select_kernel("cpu", torch.float32).act_clip == pytest.approx(float(lin.act_clip))
    with torch.no_grad():
        cache = model(torch.tensor([[5, 6, 7]]), use_cache=True).past_key_values
    assert isinstance(cache, QuantizedKVCache) and {layer.clip for layer in cache.layers} == {0.95}


def test_w4a4_generates_with_its_4bit_cache(w4a4_dir):
    from gq_serve.checkpoint import load_quantized_model
    from gq_serve.decode import DynamicDecoder, make_decoder
    from gq_serve.sampling import SamplingParams

    model = load_quantized_model(w4a4_dir)
    dec = make_decoder(model, "auto")
    assert isinstance(dec, DynamicDecoder)
    prompt = [5, 6, 7, 8]
    tokens = list(dec.iter_tokens(prompt, SamplingParams(max_tokens=6, temperature=0.0)))
    # Greedy from one full forward per token through the same quantizers: the cache changes nothing.
    ids, want = torch.tensor([prompt]), []
    with torch.no_grad():
        for _ in range(6):
            nxt = int(model(ids, use_cache=False).logits[0, -1].argmax())
            want.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
    assert [int(t) for t in tokens] == want
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False)
    assert out[0, 4:].tolist() == want
    with pytest.raises(ValueError, match="KV cache"):
        make_decoder(model, "static")


# ---------------------------------------------------------------------------------------------- GPU
CUDA = torch.cuda.is_available()


@pytest.mark.parametrize("rows", [1, 16, 17, 64, 2048])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_gpu_int_kernel_matches_the_reference(rows, dtype):
    """Every path of the integer kernel on CUDA (the exact float carrier at <= 16 rows, torch._int_mm
    above), per-token, per-head and Hadamard layers of Llama-2-7B shapes."""
    g = torch.Generator(device="cuda").manual_seed(rows)
    params = FMT.params(bits=4)
    for (in_f, out_f), had, group in (((4096, 11008), 0, 0), ((11008, 4096), 1, 0), ((4096, 4096), 0, 128)):
        t = FMT.example_tensors(params, out_f, in_f, g)
        t["layout"] = torch.tensor([had, group], dtype=torch.int32, device="cuda")
        # Pinned: on CUDA the registry prefers w4a4-triton (tests/test_w4a4_triton.py).
        kernel = choose_kernel(LinearSpec(params, out_f, in_f), "cuda", dtype, prefer="w4a4-int")
        x = torch.randn(rows, in_f, device="cuda", generator=g).to(dtype)
        got = kernel.apply(kernel.prepare(t), x).float()
        want = FMT.matmul(x.float(), t, params, in_f)
        assert torch.isfinite(got).all()
        assert float((got - want).norm() / want.norm()) < 4 * 2.0**-8


def test_a_checkpoint_missing_a_scale_is_refused_by_name(w4a4_dir, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from gq_serve.checkpoint import load_quantized_model

    bad = tmp_path / "bad"
    shutil.copytree(w4a4_dir, bad)
    (bad / "gq_manifest.json").unlink()  # else the checksums refuse it first (tested elsewhere)
    f = next(bad.glob("*.safetensors"))
    tensors = load_file(str(f))
    del tensors["model.layers.1.self_attn.q_proj.scale"]
    save_file(tensors, str(f), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.q_proj\.scale"):
        load_quantized_model(bad)


def test_a_head_dim_without_hadamard_has_no_4bit_kv_cache():
    from transformers import LlamaConfig

    with pytest.raises(ValueError, match="head_dim 50"):
        FMT.kv_cache(FMT.params(bits=4), LlamaConfig(hidden_size=200, num_attention_heads=4))
    assert FMT.kv_cache(FMT.params(bits=4, kv_bits=16), LlamaConfig(hidden_size=96, num_attention_heads=4)) is None


def test_spinquant_refuses_guided_groups_above_one():
    from gq_quantize.config import QuantizeConfig

    with pytest.raises(ValueError, match="up to 1"):
        QuantizeConfig(method="spinquant", bits=4, guided=True, groups=4)
    assert QuantizeConfig(method="spinquant", bits=4, rtn=True).needs() == frozenset()
