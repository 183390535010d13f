"""Calibration caches: saliency / Fisher pass, Hessian pass, on-disk cache (tiny random Llama)."""
from __future__ import annotations

import json
import weakref

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from gq_quantize.calibration import (
    GRAD_SCALE,
    CalibrationCache,
    CalibrationCacheError,
    coarsen_groups,
    guided_update,
    plain_update,
    quantizable_linears,
)
from gq_quantize.calibration import hessians as hessians_mod

VOCAB = 64


def make_model(layers=2, hidden=32, inter=64, heads=4, kv=2, seed=0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # HF init is tiny (std 0.02): widen it so gradients are not all ~0
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    return model


def make_windows(n=3, seq=12, seed=1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, seq), generator=torch.Generator().manual_seed(seed))


def build(root, model, windows, groups=4, guided=True, fisher=True, **kw) -> CalibrationCache:
    return CalibrationCache.open_or_build(root, model, None, windows, groups, guided, fisher,
                                          progress=False, **kw)


def direct_grads(model, windows):
    """Per window: {name: (x [T,in], dL/dz [T,out], dL/dW [out,in])} by plain autograd."""
    lins = quantizable_linears(model)
    result = []
    for w in range(windows.shape[0]):
        ids = windows[w : w + 1]
        xs, zs = {}, {}

        def keep(name):
            def hook(_mod, inp, out):  # returns None: the output is not replaced
                xs[name], zs[name] = inp[0], out
            return hook

        hooks = [m.register_forward_hook(keep(n)) for n, m in lins.items()]
        logits = model(input_ids=ids, use_cache=False).logits
        for h in hooks:
            h.remove()
        loss = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])
        names = list(lins)
        grads = torch.autograd.grad(loss, [zs[n] for n in names] + [lins[n].weight for n in names])
        gz, gw = grads[: len(names)], grads[len(names):]
        result.append({n: (xs[n][0].detach(), gz[i][0], gw[i]) for i, n in enumerate(names)})
    return result


def test_quantizable_linears_names():
    lins = quantizable_linears(make_model(layers=2))
    assert len(lins) == 14 and all(n.startswith("model.layers.") for n in lins)
    assert "model.layers.1.mlp.down_proj" in lins and not any("lm_head" in n for n in lins)


def test_saliency_and_fisher_match_autograd(tmp_path):
    model, windows = make_model(), make_windows()
    cache = build(tmp_path, model, windows, groups=4)
    ref = direct_grads(model, windows)
    for name in quantizable_linears(model):
        gz = torch.cat([r[name][1] for r in ref])  # [n*seq, out]
        s_ref = (gz * GRAD_SCALE).square().reshape(gz.shape[0], 4, -1).mean(-1)
        torch.testing.assert_close(cache.saliency(name), s_ref, rtol=1e-4, atol=1e-6)
        f_ref = sum(r[name][2].square() for r in ref)
        torch.testing.assert_close(cache.weight_fisher(name), f_ref, rtol=1e-4, atol=1e-12)
    # the last token predicts nothing: zero saliency
    assert cache.saliency("model.layers.0.self_attn.q_proj")[11].abs().max() == 0


def test_guided_update_with_ones_is_plain():
    x = torch.randn(50, 8, dtype=torch.float64)
    torch.testing.assert_close(guided_update(x, torch.ones(50, 1))[0], plain_update(x))


def test_updates_accumulate_in_place_as_sums():
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(30, 8, generator=g) for _ in range(3)]
    ss = [torch.rand(30, 2, generator=g) for _ in range(3)]
    acc_p, acc_g = plain_update(xs[0]), guided_update(xs[0], ss[0])
    for x, s in zip(xs[1:], ss[1:]):
        assert plain_update(x, acc_p) is acc_p and guided_update(x, s, acc_g) is acc_g
    x, s = torch.cat(xs), torch.cat(ss)
    torch.testing.assert_close(acc_p, x.T @ x, rtol=1e-5, atol=1e-5)
    for k in range(2):
        torch.testing.assert_close(acc_g[k], x.T @ (s[:, k:k + 1] * x), rtol=1e-5, atol=1e-5)


def test_hessian_pass_ones_saliency_equals_plain():
    model, windows = make_model(), make_windows()
    n_tok = windows.numel()
    got = {}
    hessians_mod.hessian_pass(
        model, windows, lambda idx, names: {nm: torch.ones(n_tok, 1) for nm in names}, "cpu",
        lambda idx, hess, out: got.__setitem__(idx, hess))
    assert set(got) == {0, 1}
    for hess in got.values():
        assert len(hess.plain) == 4  # q/k/v share one input, gate/up share one, o and down
        for name, owner in hess.plain_owner.items():
            torch.testing.assert_close(hess.guided[name][0], hess.plain[owner], rtol=1e-5, atol=1e-6)
    # and plain equals X^T X / N from a direct capture of layer-0 q_proj inputs
    ref = direct_grads(model, windows)
    x = torch.cat([r["model.layers.0.self_attn.q_proj"][0] for r in ref])
    torch.testing.assert_close(got[0].plain["model.layers.0.self_attn.q_proj"], x.T @ x / n_tok,
                               rtol=1e-5, atol=1e-6)


def test_g4_averaged_to_g1_equals_direct_g1(tmp_path):
    model, windows = make_model(), make_windows()
    c4 = build(tmp_path / "a", model, windows, groups=4, fisher=False)
    c1 = build(tmp_path / "b", model, windows, groups=1, fisher=False)
    assert c4.manifest["g"] == 4 and c1.manifest["g"] == 1
    for name in quantizable_linears(model):
        h4, h1 = c4.hessian(name, True, 1), c1.hessian(name, True, 1)
        # fp32 sums in a different order: compare relative to the matrix's scale
        torch.testing.assert_close(h4, h1, rtol=1e-5, atol=1e-6 * h1.abs().max().item())
        assert c4.hessian(name, True, 2).shape[0] == 2
        assert c4.hessian(name, False, 1).shape[0] == 1
    with pytest.raises(CalibrationCacheError, match="does not divide"):
        c4.hessian("model.layers.0.mlp.up_proj", True, 3)
    with pytest.raises(ValueError):
        coarsen_groups(torch.zeros(4, 2, 2), 3)


def test_remark_3_1_fisher_block_quadratic_form(tmp_path):
    # every linear has 32 outputs so g = out_features (one channel per group) is one global g
    model, windows = make_model(hidden=32, inter=32, heads=4, kv=4), make_windows()
    cache = build(tmp_path, model, windows, groups=32, fisher=False)
    lins = quantizable_linears(model)
    gen = torch.Generator().manual_seed(3)
    dws = {n: 1e-3 * torch.randn(m.weight.shape, generator=gen, dtype=torch.float64) for n, m in lins.items()}
    n_tok = windows.numel()
    lhs = 0.0
    for name, dw in dws.items():
        h = cache.hessian(name, True, 32).double()  # [out, in, in], H_k for channel k
        lhs += torch.einsum("ki,kij,kj->", dw, h, dw).item() * n_tok
    rhs = 0.0
    for r in direct_grads(model, windows):
        for name, dw in dws.items():
            x, gz, _ = r[name]
            rhs += ((GRAD_SCALE * gz.double()).square() * (x.double() @ dw.T).square()).sum().item()
    assert rhs > 0
    assert lhs == pytest.approx(rhs, rel=1e-4)


class Killed(Exception):
    pass


def test_resume_after_kill_matches_uninterrupted(tmp_path):
    model, windows = make_model(layers=3), make_windows(n=5)
    ref = build(tmp_path / "ref", model, windows, groups=4, chunk_windows=2)

    def kill_at(stage, idx):
        def on_event(s, i):
            if (s, i) == (stage, idx):
                raise Killed
        return on_event

    root = tmp_path / "run"
    with pytest.raises(Killed):  # killed after the 2nd saliency chunk (4 of 5 windows)
        build(root, model, windows, groups=4, chunk_windows=2, on_event=kill_at("saliency", 4))
    with pytest.raises(Killed):  # resumed, then killed after Hessian layer 1
        build(root, model, windows, groups=4, chunk_windows=2, on_event=kill_at("hessians", 1))
    # a crash in the middle of layer 2's computation (not at a checkpoint)
    boom = model.model.layers[2].mlp.register_forward_hook(lambda *a: (_ for _ in ()).throw(Killed()))
    events = []
    with pytest.raises(Killed):
        build(root, model, windows, groups=4, chunk_windows=2, on_event=lambda s, i: events.append((s, i)))
    boom.remove()
    assert events == []  # saliency and layers 0-1 were skipped, layer 2 died
    man = json.loads((root / "calibration" / ref.path.name / "manifest.json").read_text())
    assert man["hessians"]["layers_done"] == [0, 1] and man["hessians"]["activations"]
    cache = build(root, model, windows, groups=4, chunk_windows=2, on_event=lambda s, i: events.append((s, i)))
    assert events == [("hessians", 2)]
    assert cache.manifest["hessians"]["complete"] and not (cache.path / "activations").exists()
    for name in quantizable_linears(model):
        assert torch.equal(cache.hessian(name, True, 4), ref.hessian(name, True, 4))
        assert torch.equal(cache.hessian(name, False, 1), ref.hessian(name, False, 1))
        assert torch.equal(cache.weight_fisher(name), ref.weight_fisher(name))
    # reopening a complete cache computes nothing
    events.clear()
    build(root, model, windows, groups=4, chunk_windows=2, on_event=lambda s, i: events.append((s, i)))
    assert events == []


def test_mismatched_or_unreadable_manifest_raises(tmp_path):
    model, windows = make_model(), make_windows()
    cache = build(tmp_path, model, windows, groups=1, guided=False, fisher=False)
    mpath = cache.path / "manifest.json"
    man = json.loads(mpath.read_text())
    man["seq_len"] = 99
    mpath.write_text(json.dumps(man))
    with pytest.raises(CalibrationCacheError, match=r"seq_len.*--recalibrate") as e:
        build(tmp_path, model, windows, groups=1, guided=False, fisher=False)
    assert str(mpath) in str(e.value)
    mpath.write_text("{not json")
    with pytest.raises(CalibrationCacheError, match="unreadable"):
        build(tmp_path, model, windows, groups=1, guided=False, fisher=False)


def test_different_model_or_data_gets_its_own_cache(tmp_path):
    model, windows = make_model(), make_windows()
    a = build(tmp_path, model, windows, groups=1, guided=False, fisher=False)
    b = build(tmp_path, model, make_windows(seed=2), groups=1, guided=False, fisher=False)
    c = build(tmp_path, make_model(seed=5), windows, groups=1, guided=False, fisher=False)
    assert len({a.path, b.path, c.path}) == 3


def test_corrupt_or_truncated_file_raises(tmp_path):
    model, windows = make_model(), make_windows()
    cache = build(tmp_path, model, windows, groups=4, fisher=False)
    f = cache.path / "hessians" / "layer_01.safetensors"
    data = bytearray(f.read_bytes())
    data[-3] ^= 0xFF  # same size, different bytes
    f.write_bytes(bytes(data))
    fresh = build(tmp_path, model, windows, groups=4, fisher=False)  # size check passes
    with pytest.raises(CalibrationCacheError, match=r"layer_01\.safetensors is corrupt.*--recalibrate"):
        fresh.hessian("model.layers.1.mlp.up_proj", True, 4)
    fresh.hessian("model.layers.0.mlp.up_proj", True, 4)  # other files still fine
    f.write_bytes(bytes(data[:100]))
    with pytest.raises(CalibrationCacheError, match=r"layer_01\.safetensors is missing or truncated"):
        build(tmp_path, model, windows, groups=4, fisher=False)


def test_upgrade_adds_fisher_without_recomputing_hessians(tmp_path):
    model, windows = make_model(), make_windows()
    build(tmp_path, model, windows, groups=4, fisher=False)
    events = []
    cache = build(tmp_path, model, windows, groups=2, fisher=True, on_event=lambda s, i: events.append(s))
    assert set(events) == {"saliency"} and cache.manifest["g"] == 4
    assert cache.weight_fisher("model.layers.0.mlp.down_proj").shape == (32, 64)
    with pytest.raises(ValueError, match="does not divide"):
        build(tmp_path, model, windows, groups=5)


def test_hessian_pass_holds_one_layer_of_activations(tmp_path, monkeypatch):
    model, windows = make_model(layers=4), make_windows()
    seen_inputs = []
    real_run_layer = hessians_mod.run_layer

    def spy(layer, prefix, inputs, *args, **kw):
        # when layer l runs, the inputs of layer l-1 must already be freed
        assert all(ref() is None for ref in seen_inputs[:-1])
        assert inputs.shape == (windows.shape[0], windows.shape[1], 32)
        seen_inputs.append(weakref.ref(inputs))
        return real_run_layer(layer, prefix, inputs, *args, **kw)

    def on_event(stage, idx):
        if stage == "hessians":
            files = list((cache_dir() / "activations").glob("*")) if cache_dir() else []
            assert len(files) <= 1  # only the next layer's inputs are kept on disk

    def cache_dir():
        found = list((tmp_path / "calibration").glob("*"))
        return found[0] if found else None

    monkeypatch.setattr(hessians_mod, "run_layer", spy)
    build(tmp_path, model, windows, groups=1, guided=False, fisher=False, on_event=on_event)
    assert len(seen_inputs) == 4


@pytest.mark.parametrize("stagewise", [False, True])
def test_hessian_pass_drops_a_layers_hessians_before_the_next_layer(stagewise):
    # A finished layer's Hessians are the pass's largest tensors (1.1 GB per layer of a 1B model
    # at g=4): once handed to on_layer_done they must not live on through the next layer.
    model, windows = make_model(layers=3), make_windows()
    n_tok = windows.numel()
    handed: list[weakref.ref] = []
    alive_at_start: list[bool] = []

    def saliency_for_layer(idx, names):  # called as each layer starts
        alive_at_start.append(any(ref() is not None for ref in handed))
        return {nm: torch.ones(n_tok, 2) for nm in names}

    def on_layer_done(idx, hess, outputs):
        handed.extend(weakref.ref(t) for t in [*hess.plain.values(), *hess.guided.values()])

    hessians_mod.hessian_pass(model, windows, saliency_for_layer, "cpu", on_layer_done, stagewise=stagewise)
    assert alive_at_start == [False, False, False]


def test_model_dtype_device_and_grad_flags_restored(tmp_path):
    model = make_model().half()
    model.model.norm.weight.requires_grad_(False)
    build(tmp_path, model, make_windows(n=1), groups=4)
    p = next(model.parameters())
    assert p.dtype == torch.float16 and p.device.type == "cpu"
    assert not model.model.norm.weight.requires_grad and model.lm_head.weight.requires_grad


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu(tmp_path):
    model, windows = make_model(), make_windows()
    cpu = build(tmp_path / "cpu", model, windows, groups=4)
    gpu = build(tmp_path / "gpu", model, windows, groups=4, device="cuda")
    assert next(model.parameters()).device.type == "cpu"
    for name in quantizable_linears(model):
        for guided, g in ((True, 4), (False, 1)):
            h_c, h_g = cpu.hessian(name, guided, g), gpu.hessian(name, guided, g)
            torch.testing.assert_close(h_g, h_c, rtol=1e-3, atol=1e-4 * h_c.abs().max().item())
        f_c = cpu.weight_fisher(name)
        torch.testing.assert_close(gpu.weight_fisher(name), f_c, rtol=1e-3, atol=1e-4 * f_c.abs().max().item())


def test_concurrent_builder_is_refused(tmp_path):
    import fcntl

    model, windows = make_model(), make_windows(n=1)
    cache = build(tmp_path, model, windows, groups=1, guided=False, fisher=False)
    with open(cache.path / ".lock", "w") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)  # a separate open file description: conflicts
        with pytest.raises(CalibrationCacheError, match="another process"):
            build(tmp_path, model, windows, groups=1, guided=False, fisher=True)  # the Fisher is missing


def test_complete_parts_are_read_while_another_process_builds(tmp_path):
    """A run that needs only what the cache already holds (saliency + Fisher for a sequential run)
    does not wait for the build lock another process holds to add the Hessians."""
    import fcntl

    model, windows = make_model(), make_windows()
    build(tmp_path, model, windows, groups=2, guided=True, fisher=True, need_hessians=False)
    path = next((tmp_path / "calibration").iterdir())
    with open(path / ".lock", "w") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)  # "another process" building
        c = build(tmp_path, model, windows, groups=2, guided=True, fisher=True, need_hessians=False)
        assert c.saliency("model.layers.0.mlp.up_proj").shape[1] == 2
        with pytest.raises(CalibrationCacheError, match="being built by another process"):
            build(tmp_path, model, windows, groups=2, guided=True, fisher=True)  # Hessians missing: must build
