"""The ``trellis`` format (QTIP): Hadamard transforms, codes, circular bitstreams, the tail-biting
Viterbi search, BlockLDLQ, the format's tensors and checks, and export -> load -> dequantize.

Small shapes only: a tile is 16x16 and the C++ Viterbi quantizes ~50-100 tiles/s on two busy cores.
"""
from __future__ import annotations

import itertools

import pytest
import torch

from gq_kernels.registry import get_format
from gq_kernels.trellis import reference as ref
from gq_kernels.trellis.codes import CODES, VALUES_PER_STATE, code_rms, code_table, decode, default_tlut
from gq_kernels.hadamard import (K_ORDER, hadamard_factor, hadamard_k, hadamard_matrix, hadamard_transform,
                                         random_signs, rotate_hessian, rotate_weight, unrotate_weight)
from gq_quantize.methods import viterbi as vit
from gq_quantize.methods.objective import quadratic_objective
from gq_quantize.methods.qtip import block_ldl, qtip

FMT = get_format("trellis")
TLUT = default_tlut()


def _table(code):
    return code_table(code, TLUT if code == "hyb" else None)


# ============================================================================ Hadamard
@pytest.mark.parametrize("K", (1, *K_ORDER))
def test_every_small_hadamard_is_hadamard(K):
    H = hadamard_k(K, torch.float64)
    assert torch.equal(H @ H.t(), K * torch.eye(K, dtype=torch.float64))
    assert set(H.unique().tolist()) <= {-1.0, 1.0}


@pytest.mark.parametrize("n", [64, 1536])   # Sylvester alone; K = 12 times Sylvester
def test_hadamards_first_built_under_inference_mode_still_take_gradients(n):
    """The cached matrices are built outside inference mode whoever asks first: the w4a4 clip pass
    (inference_mode) runs before the fine-tune (autograd) in one process."""
    import gq_kernels.hadamard as had

    had._hadamard_k_cached.cache_clear()
    had._sylvester.cache_clear()
    with torch.inference_mode():
        hadamard_transform(torch.randn(2, n))
    x = torch.randn(2, n, requires_grad=True)
    hadamard_transform(x).pow(2).sum().backward()   # orthogonal: the gradient of |xH|^2 is 2x
    torch.testing.assert_close(x.grad, 2 * x.detach())


@pytest.mark.parametrize("n,K", [(576, 36), (1536, 12), (4096, 1), (5120, 20), (11008, 172), (12288, 12),
                                 (13824, 108), (14336, 28), (22016, 172), (28672, 28), (144, 36), (48, 12)])
def test_llama_sizes_have_a_fast_orthogonal_transform(n, K):
    assert hadamard_factor(n) == (K, n // K)
    x = torch.randn(2, n, dtype=torch.float64)
    y = hadamard_transform(x)
    assert torch.allclose(y.norm(dim=1), x.norm(dim=1))
    assert torch.allclose(hadamard_transform(y, transpose=True), x, atol=1e-10)


@pytest.mark.parametrize("n", [12, 20, 24, 48, 96])
def test_transform_is_the_kronecker_product_and_orthogonal(n):
    K, p = hadamard_factor(n)
    Hp = torch.ones(1, 1, dtype=torch.float64)
    while Hp.shape[0] < p:
        Hp = torch.cat([torch.cat([Hp, Hp], 1), torch.cat([Hp, -Hp], 1)])
    R = hadamard_matrix(n)
    assert torch.allclose(R, torch.kron(hadamard_k(K, torch.float64), Hp) / n**0.5)
    assert torch.allclose(R @ R.t(), torch.eye(n, dtype=torch.float64))
    x = torch.randn(3, n, dtype=torch.float64)
    assert torch.allclose(hadamard_transform(x, transpose=True), x @ R.t())  # H_12 is not symmetric


@pytest.mark.parametrize("n", [100, 44, 7, 2880])
def test_a_size_without_construction_is_refused_by_name(n):
    with pytest.raises(ValueError, match=f"no Hadamard construction for size {n}"):
        hadamard_factor(n)


def test_rotations_preserve_the_objective_and_invert():
    torch.manual_seed(0)
    m, n = 48, 96
    w = torch.randn(m, n)
    su, sv = random_signs(n), random_signs(m)
    X = torch.randn(300, n, dtype=torch.float64)
    H = X.t() @ X
    E = torch.randn(m, n, dtype=torch.float64)
    for blocks in (1, 3):
        assert torch.allclose(unrotate_weight(rotate_weight(w, su, sv, blocks), su, sv, blocks), w, atol=1e-5)
        Et = rotate_weight(E.float(), su, sv, blocks).double()
        Ht = rotate_hessian(H, su.double())
        assert torch.allclose(torch.trace(Et @ Ht @ Et.t()), torch.trace(E @ H @ E.t()), rtol=1e-5)


# ============================================================================ codes
def test_code_tables_match_the_spec():
    assert code_rms("1mad") == pytest.approx(1.0001, abs=2e-4)
    assert code_rms("3inst") == pytest.approx(1.2437, abs=2e-4)
    assert code_rms("hyb", TLUT) == pytest.approx(0.9684, abs=2e-3)
    t3 = _table("3inst")
    assert -3.97 < float(t3.min()) < -3.95 and 3.96 < float(t3.max()) < 3.98
    s = torch.arange(1 << 16)
    h = (s * (s + 1)) & 0xFFFFFFFF
    assert torch.equal(torch.bincount((h >> 6) & 511), torch.full((512,), 128))  # each LUT entry: 128 states
    th = _table("hyb")
    assert int((th[:, 0] != TLUT.float()[(h >> 6) & 511][:, 0]).sum()) == 1 << 15  # half of the states flip
    assert TLUT.dtype == torch.float16 and TLUT.shape == (512, 2)


# ============================================================================ bitstreams
@pytest.mark.parametrize("bits,code", list(itertools.product((2, 3, 4), CODES)))
def test_circular_streams_round_trip(bits, code):
    V = VALUES_PER_STATE[code]
    kV, N = bits * V, 256 // V
    stream = torch.randint(0, 2, (5, 256 * bits))
    pos = (torch.arange(N)[:, None] * kV + torch.arange(16)[None]) % (256 * bits)
    states = (stream[:, pos] << torch.arange(15, -1, -1)).sum(-1)
    assert ref.is_tail_biting(states, kV).all()
    words = ref.states_to_words(states, kV)
    assert words.dtype == torch.int16 and words.shape == (5, 16 * bits)
    assert torch.equal(ref.words_to_states(words, kV), states)
    # word 0 holds stream bits 0..15 MSB first
    assert int(words[0, 0]) & 0xFFFF == int((stream[0, :16] << torch.arange(15, -1, -1)).sum())
    broken = states.clone()
    broken[0, 3] ^= 1 << 15
    assert not ref.is_tail_biting(broken, kV)[0]


# ============================================================================ Viterbi
def _path_cost(x, table, states):
    return ((table[states] - x) ** 2).sum(dim=(-1, -2))


@pytest.mark.parametrize("impl", ["torch", "cpp"])
def test_viterbi_equals_brute_force_on_a_short_trellis(impl):
    if impl == "cpp" and not vit.cpp_available()[0]:
        pytest.skip(vit.cpp_available()[1])
    torch.manual_seed(1)
    kV, N = 2, 3  # every path: 2^16 * 4 * 4 = 2^20 sequences
    table = _table("1mad")
    x = torch.randn(2, N, 1)
    s0 = torch.arange(1 << 16)
    paths = torch.stack(torch.meshgrid(s0, torch.arange(4), torch.arange(4), indexing="ij"), -1).reshape(-1, 3)
    s1 = ((paths[:, 0] << kV) & 0xFFFF) | paths[:, 1]
    s2 = ((s1 << kV) & 0xFFFF) | paths[:, 2]
    seqs = torch.stack([paths[:, 0], s1, s2], 1)
    vals = table[seqs][..., 0]  # [P, N]
    for b in range(2):
        cost = ((vals - x[b, :, 0]) ** 2).sum(1)
        got = vit.viterbi(x[b:b + 1], table, kV, impl=impl)
        assert float(_path_cost(x[b:b + 1], table, got)) == pytest.approx(float(cost.min()), rel=1e-6)
        # constrained: the top bits of s_0 (init_top), or the low bits of s_{N-1} (end_low)
        o, e = 1234, 4321
        low = (1 << (16 - kV)) - 1
        got = vit.viterbi(x[b:b + 1], table, kV, init_top=torch.tensor([o]), impl=impl)
        assert int(got[0, 0]) >> kV == o
        ok = (seqs[:, 0] >> kV) == o
        assert float(_path_cost(x[b:b + 1], table, got)) == pytest.approx(float(cost[ok].min()), rel=1e-6)
        got = vit.viterbi(x[b:b + 1], table, kV, end_low=torch.tensor([e]), impl=impl)
        assert int(got[0, -1]) & low == e
        ok = (seqs[:, 2] & low) == e
        assert float(_path_cost(x[b:b + 1], table, got)) == pytest.approx(float(cost[ok].min()), rel=1e-6)


def test_cpp_and_torch_viterbi_agree():
    if not vit.cpp_available()[0]:
        pytest.skip(vit.cpp_available()[1])
    torch.manual_seed(2)
    table = _table("hyb")
    x = torch.randn(2, 16, 2) * 0.87  # short sequences: the PyTorch search is slow
    a = vit.quantize_tiles(x, table, 4, impl="torch")
    b = vit.quantize_tiles(x, table, 4, impl="cpp")
    assert torch.allclose(_path_cost(x, table, a), _path_cost(x, table, b), rtol=1e-6)


@pytest.mark.parametrize("kV", range(1, 9))
@pytest.mark.parametrize("code", ["1mad", "hyb"])
def test_cpp_viterbi_every_step_width_and_constraint(kV, code):
    # every template instance of the C++ step (J < 16 spreads one u over part of a vector) against
    # the PyTorch search, free and with both tail-biting constraints
    if not vit.cpp_available()[0]:
        pytest.skip(vit.cpp_available()[1])
    V = VALUES_PER_STATE[code]
    table = _table(code)
    gen = torch.Generator().manual_seed(kV)
    x = torch.randn(3, 6, V, generator=gen)
    path = torch.randint(0, 1 << 16, (3,), generator=gen)  # constraints a trellis path can meet
    top = path >> kV
    for _ in range(5):
        path = ((path << kV) & 0xFFFF) | torch.randint(0, 1 << kV, (3,), generator=gen)
    low = path & ((1 << (16 - kV)) - 1)
    for kw in ({}, {"init_top": top, "end_low": low}):
        a = vit.viterbi(x, table, kV, impl="torch", **kw)
        b = vit.viterbi(x, table, kV, impl="cpp", **kw)
        assert torch.allclose(_path_cost(x, table, a), _path_cost(x, table, b), rtol=1e-6)
        assert (((b[:, 1:] >> kV) ^ (b[:, :-1] & ((1 << (16 - kV)) - 1))) == 0).all()  # a trellis path
        if kw:
            assert ((b[:, 0] >> kV) == top).all() and ((b[:, -1] & ((1 << (16 - kV)) - 1)) == low).all()


# relative MSE on i.i.d. Gaussian input at 0.9 RMS(code), 32 tiles (spec section 6)
SPEC_MSE = {("hyb", 2): 0.0714, ("hyb", 3): 0.0188, ("hyb", 4): 0.0056,
            ("1mad", 2): 0.0699, ("1mad", 3): 0.0176, ("1mad", 4): 0.0045,
            ("3inst", 2): 0.0705, ("3inst", 3): 0.0178, ("3inst", 4): 0.0046}


@pytest.mark.parametrize("code,bits", list(SPEC_MSE))
def test_viterbi_mse_on_gaussian_is_within_5_percent_of_the_spec(code, bits):
    if not vit.cpp_available()[0]:  # the PyTorch search does ~0.2 tiles/s here: minutes per row
        pytest.skip(f"C++ Viterbi unavailable ({vit.cpp_available()[1]})")
    V = VALUES_PER_STATE[code]
    table = _table(code)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 256 // V, V, generator=g) * 0.9 * code_rms(code, TLUT if code == "hyb" else None)
    states = vit.quantize_tiles(x, table, bits * V)
    assert ref.is_tail_biting(states, bits * V).all()
    mse = float(((table[states] - x) ** 2).sum() / (x**2).sum())
    assert abs(mse / SPEC_MSE[(code, bits)] - 1) < 0.05, mse


# ============================================================================ BlockLDLQ
def _hessians(n, g=1, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for k in range(g):
        X = torch.randn(1000, n, generator=gen) @ torch.randn(n, n, generator=gen) * 0.3 \
            + torch.randn(1000, 1, generator=gen) * (k + 1)
        out.append(X.t() @ X / 1000)
    return torch.stack(out)


def test_block_ldl_factorises():
    H = _hessians(64)[0].double()
    L, D = block_ldl(H)
    assert torch.allclose(L @ torch.block_diag(*D) @ L.t(), H, atol=1e-9)
    assert torch.allclose(L[:16, :16], torch.eye(16, dtype=L.dtype)) and torch.all(L.triu(16) == 0)


def test_blockldlq_beats_feedback_free_tiles_and_decodes_bit_exactly():
    torch.manual_seed(0)
    w = torch.randn(32, 64) * 0.02
    H = _hessians(64)[0]
    q = qtip(w, H, 2)
    q0 = qtip(w, H, 2, feedback=False)
    assert q.stats["proxy_err"] < 0.8 * q0.stats["proxy_err"]
    assert quadratic_objective(w, q.dequantize(), H) < quadratic_objective(w, q0.dequantize(), H)
    assert set(q.stats) >= {"time_rht_s", "time_ldl_s", "time_viterbi_s", "proxy_err"}
    packed = FMT.pack(q)
    FMT.check_tensors(packed, q.params(), 32, 64)
    assert torch.equal(FMT.dequantize(packed, q.params(), 64), q.dequantize())
    x = torch.randn(3, 64)
    assert torch.allclose(FMT.matmul(x, packed, q.params(), 64), x @ q.dequantize().t(), atol=1e-5)
    assert ref.is_tail_biting(ref.words_to_states(q.trellis, 4), 4).all()


def test_group_rht_makes_the_guided_objective_exact():
    torch.manual_seed(0)
    w = torch.randn(128, 32) * 0.02
    Hg = _hessians(32, g=4)
    exact = qtip(w, Hg, 2, group_rht=True)
    paper = qtip(w, Hg, 2, group_rht=False)
    assert exact.out_rht_blocks == 4 and paper.out_rht_blocks == 1
    zero = quadratic_objective(w, torch.zeros_like(w), Hg)
    # exact: the proxy (rotated, damped) objective is the real one up to the damping
    assert quadratic_objective(w, exact.dequantize(), Hg) / zero == pytest.approx(exact.stats["proxy_err"], rel=0.1)
    assert quadratic_objective(w, exact.dequantize(), Hg) < quadratic_objective(w, paper.dequantize(), Hg)


@pytest.mark.parametrize("code", ["1mad", "3inst"])
def test_v1_codes_quantize_and_round_trip(code):
    torch.manual_seed(0)
    w = torch.randn(16, 32)
    q = qtip(w, _hessians(32)[0], 3, code=code)
    assert q.tlut.shape == (0, 2) and "tlut" not in FMT.pack(q)
    assert torch.equal(FMT.dequantize(FMT.pack(q), q.params(), 32), q.dequantize())
    assert float(((q.dequantize() - w) ** 2).mean() / (w**2).mean()) < 0.1


# ============================================================================ bad input
def test_bits_outside_2_to_4_and_bad_sizes_are_refused():
    from gq_quantize.config import QuantizeConfig

    for bits in (1, 5, 8):
        with pytest.raises(ValueError, match="not supported by method 'qtip'"):
            QuantizeConfig(method="qtip", bits=bits)
        with pytest.raises(ValueError, match="supports bits"):
            FMT.params(bits=bits)
    with pytest.raises(ValueError, match="trellis code"):
        QuantizeConfig(method="qtip", bits=2, trellis_code="2mad")
    with pytest.raises(ValueError, match="no Hadamard construction for size 176"):
        qtip(torch.randn(16, 176), torch.eye(176), 2)
    with pytest.raises(ValueError, match="multiple of 16"):
        qtip(torch.randn(16, 40), torch.eye(40), 2)


def _good(m=32, n=32):
    q = qtip(torch.randn(m, n), torch.eye(n), 2)
    return FMT.pack(q), q.params()


@pytest.mark.parametrize("mutate,needle", [
    (lambda t: t.pop("SU"), "missing tensor 'x.SU'"),
    (lambda t: t.pop("tlut"), "missing tensor 'x.tlut'"),
    (lambda t: t.pop("trellis"), "missing tensor 'x.trellis'"),
    (lambda t: t.update(SV=t["SV"][:-1]), "x.SV: expected shape [32]"),
    (lambda t: t.update(tlut=t["tlut"][:256]), "x.tlut: expected shape [512, 2]"),
    (lambda t: t.update(trellis=t["trellis"].int()), "x.trellis: expected dtype torch.int16"),
    (lambda t: t.update(trellis=t["trellis"][:, :16]), "x.trellis: expected shape [4, 32]"),
    (lambda t: t.update(SU=t["SU"] * 0.5), "x.SU: random signs must be"),
    (lambda t: t.update(Wscale=torch.tensor([float("nan")])), "x.Wscale"),
])
def test_bad_tensors_are_refused_by_name(mutate, needle):
    t, p = _good()
    mutate(t)
    with pytest.raises(ValueError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        FMT.check_tensors(t, p, 32, 32, prefix="x.")


def test_format_declares_no_row_or_column_slices():
    p = FMT.params(bits=3)
    assert not FMT.independent_rows
    assert all(s.out_dim is None and s.in_dim is None for s in FMT.tensors(p, 64, 32).values())
    t, p = _good()
    assert FMT.slice_columns(t, p, 32, 0, 16) is None


# ============================================================================ export -> load
def test_export_load_dequantize_is_the_quantizers_w_hat(tiny_lm_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from gq_quantize.config import QuantizeConfig
    from gq_quantize.export import export_checkpoint
    from gq_serve.checkpoint import load_quantized_model
    from gq_serve.quant_linear import GQLinear

    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir, dtype=torch.float32)
    qc = QuantizeConfig(method="qtip", bits=2)
    results = {}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and name.startswith("model.layers.0."):
            w = mod.weight.detach()
            results[name] = qtip(w, torch.eye(w.shape[1]) + 0.1, 2)
    export_checkpoint(tiny_lm_dir, results, qc, tmp_path / "ckpt")
    loaded = load_quantized_model(tmp_path / "ckpt")
    layers = {n: m for n, m in loaded.named_modules() if isinstance(m, GQLinear)}
    assert set(layers) == set(results)
    for name, q in results.items():
        assert torch.equal(layers[name].dequantize(), q.dequantize()), name


# ============================================================================ gq quantize -> serve
@pytest.fixture(scope="module")
def qtip_ckpt(tiny_lm_dir, tmp_path_factory):
    import random

    from conftest import _TINY_WORDS

    from gq_serve.cli import main

    root = tmp_path_factory.mktemp("qtip")
    rng = random.Random(0)
    corpus = root / "text.txt"
    corpus.write_text("\n\n".join(" ".join(rng.choices(_TINY_WORDS, k=200)) for _ in range(4)))
    out = root / "ckpt"
    assert main(["--cache", str(root / "cache"), "quantize", str(tiny_lm_dir), "--calib", str(corpus),
                 "--n-samples", "4", "--seq-len", "16", "--out", str(out), "--quiet", "--method", "qtip",
                 "--bits", "2", "--guided"]) == 0
    return out, corpus, root / "cache"


def _plain_with_w_hat(src, ckpt):
    from transformers import AutoModelForCausalLM

    from gq_serve.checkpoint import load_quantized_model
    from gq_serve.quant_linear import GQLinear

    quantized = load_quantized_model(ckpt)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, m in quantized.named_modules():
            if isinstance(m, GQLinear):
                model.get_submodule(name).weight.copy_(m.dequantize())
    return model


def test_gq_quantize_qtip_then_eval_and_the_engine(qtip_ckpt, tiny_lm_dir, capsys):
    import json

    from conftest import greedy_tokens

    from gq_serve.checkpoint import load_model, load_tokenizer
    from gq_serve.cli import main
    from gq_serve.engine import Engine

    ckpt, corpus, cache = qtip_ckpt
    qc = json.loads((ckpt / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "trellis" and qc["method"] == "qtip" and qc["trellis_code"] == "hyb"
    manifest = json.loads((ckpt / "gq_manifest.json").read_text())
    layer = manifest["layers"]["model.layers.0.mlp.up_proj"]
    assert layer["proxy_err"] > 0 and layer["time_viterbi_s"] > 0
    capsys.readouterr()
    assert main(["--cache", str(cache), "eval", str(ckpt), "--data", str(corpus), "--ctx", "16",
                 "--max-tokens", "64", "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["ppl"] > 1.0

    prompt = [3, 5, 7, 11, 13, 17]
    engine = Engine(load_model(ckpt), load_tokenizer(ckpt), "cpu")
    try:
        tokens = [e.token_id for e in engine.generate(prompt, max_tokens=10, ignore_eos=True)]
    finally:
        engine.shutdown()
    assert tokens == greedy_tokens(_plain_with_w_hat(tiny_lm_dir, ckpt), prompt, 10)


def test_transformers_loads_a_trellis_checkpoint(qtip_ckpt, tiny_lm_dir):
    from transformers import AutoModelForCausalLM

    import gq_serve  # noqa: F401  (registers guidedquant with transformers)

    ckpt = qtip_ckpt[0]
    via_hf = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    plain = _plain_with_w_hat(tiny_lm_dir, ckpt)
    x = torch.tensor([[3, 5, 7, 11]])
    with torch.inference_mode():  # the packed CPU kernel: the same values, another summation order
        assert torch.allclose(via_hf(x).logits, plain(x).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("suffix,change", [("SU", "drop"), ("tlut", "drop"), ("trellis", "shape"), ("SV", "dtype")])
def test_a_checkpoint_with_a_bad_trellis_tensor_is_refused_by_name(qtip_ckpt, tmp_path, suffix, change):
    import shutil

    from safetensors.torch import load_file, save_file

    from gq_serve.checkpoint import load_quantized_model

    src = qtip_ckpt[0]
    ckpt = tmp_path / "bad"
    shutil.copytree(src, ckpt)
    (ckpt / "gq_manifest.json").unlink()  # the tensors are edited on purpose: no checksums to compare
    tensors = load_file(ckpt / "model.safetensors")
    name = f"model.layers.1.mlp.up_proj.{suffix}"
    if change == "drop":
        del tensors[name]
    elif change == "shape":
        tensors[name] = tensors[name][:, :-1].contiguous()
    else:
        tensors[name] = tensors[name].float()
    save_file(tensors, ckpt / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        load_quantized_model(ckpt)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_viterbi_and_qtip_on_cuda():
    """The PyTorch Viterbi on CUDA tensors finds paths as good as the CPU's, and QTIP runs on CUDA."""
    table = _table("hyb")
    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, 128, 2, generator=g) * 0.87
    gpu = vit.quantize_tiles(x.cuda(), table.cuda(), 4)
    assert gpu.device.type == "cuda" and ref.is_tail_biting(gpu.cpu(), 4).all()
    cpu = vit.quantize_tiles(x, table, 4)
    assert torch.allclose(_path_cost(x, table, gpu.cpu()), _path_cost(x, table, cpu), rtol=1e-5)
    w = torch.randn(64, 96) * 0.02
    q = qtip(w.cuda(), _hessians(96)[0].cuda(), 2)
    q_cpu = qtip(w, _hessians(96)[0], 2)
    assert q.stats["proxy_err"] == pytest.approx(q_cpu.stats["proxy_err"], rel=0.05)
