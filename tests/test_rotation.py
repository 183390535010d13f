"""SpinQuant rotations (gq_quantize.spinquant): exact identities in fp32, Cayley SGD, training with
resume, rotated model directories and `gq rotate`. Tiny random Llamas on the CPU; the real SmolLM2
check is marked `model`."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from gq_quantize.spinquant.cayley import cayley_step, orthonormalize
from gq_quantize.spinquant.rotate import (
    RotationError,
    apply_rotations,
    center_embeddings,
    fuse_norms,
    random_hadamard,
    untie_lm_head,
)
from gq_quantize.spinquant.train import (
    LOSS_JSON,
    LOSS_PNG,
    ROTATION_JSON,
    ROTATIONS_FILE,
    STATE_FILE,
    activation_quantizers,
    initial_rotations,
    quantized_loss,
    train,
    training_quantizers,
    write_rotated_model,
)


def tiny_config(tied: bool = True, **kw) -> LlamaConfig:
    base = dict(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, tie_word_embeddings=tied, initializer_range=0.2,
                max_position_embeddings=128, architectures=["LlamaForCausalLM"])
    return LlamaConfig(**{**base, **kw})


def tiny_model(tied: bool = True, seed: int = 0, **kw) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config(tied, **kw)).eval()
    with torch.no_grad():  # non-trivial gains, or fuse_norms would be tested on ones
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def random_orthogonal(n: int, g: torch.Generator) -> torch.Tensor:
    return orthonormalize(torch.randn(n, n, generator=g, dtype=torch.float64))


def ids(n: int = 2, t: int = 12, vocab: int = 100, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------- identities
@pytest.mark.parametrize("tied", [True, False])
def test_fused_and_rotated_model_keeps_logits(tied):
    model = tiny_model(tied)
    x = ids()
    with torch.no_grad():
        ref = model(x).logits
    fuse_norms(model)
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    assert model.config.tie_word_embeddings is False
    assert torch.all(model.model.norm.weight == 1) and torch.all(model.model.layers[0].input_layernorm.weight == 1)
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, ref, atol=1e-4, rtol=0)
    g = torch.Generator().manual_seed(1)
    r1 = random_orthogonal(64, g)
    r2 = [random_orthogonal(16, g) for _ in range(2)]
    apply_rotations(model, r1, r2)
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, ref, atol=1e-4, rtol=0)
    # The rotation did change the weights (not a silent no-op).
    assert not torch.allclose(model.model.layers[0].self_attn.v_proj.weight,
                              tiny_model(tied).model.layers[0].self_attn.v_proj.weight, atol=1e-2)


def test_gqa_and_biases_with_hadamard_rotations():
    model = tiny_model(False, num_attention_heads=8, num_key_value_heads=2, head_dim=8, attention_bias=True)
    with torch.no_grad():
        for layer in model.model.layers:
            for lin in (layer.self_attn.v_proj, layer.self_attn.o_proj):
                lin.bias.normal_(0, 0.3)
    x = ids()
    with torch.no_grad():
        ref = model(x).logits
    fuse_norms(model)
    apply_rotations(model, *initial_rotations(model, seed=5))
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, ref, atol=1e-4, rtol=0)


def test_apply_rotations_refuses_tied_and_wrong_shapes():
    model = tiny_model(True)
    with pytest.raises(RotationError, match="fuse_norms"):
        apply_rotations(model, torch.eye(64, dtype=torch.float64))
    fuse_norms(model)
    with pytest.raises(RotationError, match=r"R1 has shape \[32, 32\], expected \[64, 64\]"):
        apply_rotations(model, torch.eye(32))
    with pytest.raises(RotationError, match="R2.1 has shape"):
        apply_rotations(model, torch.eye(64), [torch.eye(16), torch.eye(8)])


def test_refuses_non_llama_like():
    class Odd(torch.nn.Module):
        pass

    with pytest.raises(RotationError, match="not Llama-like"):
        fuse_norms(Odd())
    model = tiny_model(False)
    del model.model.layers[1].mlp.up_proj
    with pytest.raises(RotationError, match="layer 1 has no mlp.up_proj"):
        fuse_norms(model)


@pytest.mark.parametrize("n", [64, 576, 1536])
def test_random_hadamard_orthogonal(n):
    h = random_hadamard(n, torch.Generator().manual_seed(0))
    assert h.shape == (n, n) and h.dtype == torch.float64
    torch.testing.assert_close(h @ h.t(), torch.eye(n, dtype=torch.float64), atol=1e-10, rtol=0)
    # Entries +-1/sqrt(n): a Hadamard, signs drawn per row.
    torch.testing.assert_close(h.abs(), torch.full((n, n), n ** -0.5, dtype=torch.float64))


@pytest.mark.parametrize("n", [50, 100])
def test_random_hadamard_unsupported_size(n):
    with pytest.raises(ValueError, match=rf"R1 \(hidden_size\): no Hadamard matrix of size {n}.*--rotation none"):
        random_hadamard(n, what="R1 (hidden_size)")


# ----------------------------------------------------------------------------------- Cayley SGD
def test_cayley_stays_orthogonal_and_descends():
    g = torch.Generator().manual_seed(0)
    target = random_orthogonal(32, g).float()
    if torch.det(target) < 0:  # reachable from the identity (same connected component)
        target[:, 0] = -target[:, 0]
    r = torch.eye(32)
    loss = lambda m: float(((m - target) ** 2).sum())  # noqa: E731
    first = loss(r)
    for _ in range(50):
        r = cayley_step(r, 2 * (r - target), lr=0.1, generator=g)
    assert loss(r) < 0.05 * first
    assert float((r @ r.t() - torch.eye(32)).abs().max()) < 1e-4
    # Many big random steps: still orthogonal.
    for _ in range(100):
        r = cayley_step(r, torch.randn(32, 32, generator=g), lr=1.5, generator=g)
    assert float((r @ r.t() - torch.eye(32)).abs().max()) < 1e-4


# ----------------------------------------------------------------------------------- training
def test_quantized_objective_at_16_bits_is_the_model_loss():
    """rotated_parameters + the embedding/lm_head shortcut + W_down R4 reproduce the model's CE."""
    model = fuse_norms(tiny_model(True))
    x = ids(1, 16)
    with torch.no_grad():
        ref = model(x, labels=x).loss
        r1, r2 = initial_rotations(model, seed=3)
        with activation_quantizers(model, bits=16):
            got = quantized_loss(model, x, r1.float(), [r.float() for r in r2], kv_bits=16)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


def test_train_writes_curve_and_resumes_identically(tmp_path):
    windows = ids(3, 16, seed=4)
    full = train(fuse_norms(tiny_model(True)), windows, steps=3, state_dir=tmp_path / "a", save_every=1,
                 progress=False)
    assert len(full.losses) == 3
    assert (tmp_path / "a" / LOSS_PNG).stat().st_size > 1000
    assert json.loads((tmp_path / "a" / LOSS_JSON).read_text())["losses"] == pytest.approx(full.losses)

    part = train(fuse_norms(tiny_model(True)), windows, steps=3, state_dir=tmp_path / "b", save_every=1,
                 progress=False, stop_after=2)  # "killed" after step 2
    assert len(part.losses) == 2 and not (tmp_path / "b" / LOSS_PNG).exists()
    assert torch.load(tmp_path / "b" / STATE_FILE, weights_only=True)["step"] == 2
    resumed = train(fuse_norms(tiny_model(True)), windows, steps=3, state_dir=tmp_path / "b", save_every=1,
                    progress=False)
    assert resumed.losses == full.losses
    assert torch.equal(resumed.r1, full.r1)
    assert all(torch.equal(a, b) for a, b in zip(resumed.r2, full.r2))
    r1 = resumed.r1.double()
    torch.testing.assert_close(r1 @ r1.t(), torch.eye(64, dtype=torch.float64), atol=1e-5, rtol=0)

    with pytest.raises(RotationError, match=r"different settings \(lr: 1.5 -> 1.0\).*--overwrite"):
        train(fuse_norms(tiny_model(True)), windows, steps=3, lr=1.0, state_dir=tmp_path / "b", progress=False)


def test_training_quantizers_are_the_served_ones():
    """With a clip and activation groups, each linear's hook quantizes exactly as the w4a4 format does
    for those settings: q/k/v, gate/up and down_proj (after R4) in groups, o_proj per head or per
    group when that is smaller."""
    from gq_kernels.w4a4.reference import fake_quant_act, prepare_input

    model = fuse_norms(tiny_model(True))
    layer = model.model.layers[0]
    lins = {"q": layer.self_attn.q_proj, "o": layer.self_attn.o_proj, "down": layer.mlp.down_proj}
    raw, seen = {}, {}
    # Registered before the quantizers' hooks: sees the raw input; after: the quantized one.
    handles = [m.register_forward_pre_hook(lambda m, a, k=k: raw.__setitem__(k, a[0].detach().clone()))
               for k, m in lins.items()]
    for group, o_group in ((8, 8), (32, 16)):  # head_dim 16: groups of 32 keep o_proj per head
        with activation_quantizers(model, clip=0.8, group=group), torch.no_grad():
            inner = [m.register_forward_pre_hook(lambda m, a, k=k: seen.__setitem__(k, a[0].detach().clone()))
                     for k, m in lins.items()]
            model(ids(1, 12))
            for h in inner:
                h.remove()
        torch.testing.assert_close(seen["q"], fake_quant_act(raw["q"], 4, group, 0.8), atol=0, rtol=0)
        torch.testing.assert_close(seen["o"], fake_quant_act(raw["o"], 4, o_group, 0.8), atol=0, rtol=0)
        want = fake_quant_act(prepare_input(raw["down"], True), 4, group, 0.8)
        torch.testing.assert_close(seen["down"], want, atol=0, rtol=0)
        assert not torch.equal(seen["q"], fake_quant_act(raw["q"], 4, 0, 1.0))  # the settings took effect
    for h in handles:
        h.remove()


def test_train_under_clipped_quantizers_is_its_own_run(tmp_path):
    windows = ids(2, 16, seed=4)
    plain = train(fuse_norms(tiny_model(True)), windows, steps=2, progress=False)
    clipped = train(fuse_norms(tiny_model(True)), windows, steps=2, state_dir=tmp_path, progress=False,
                    act_clip=0.8, kv_clip=0.95, stop_after=1)
    assert clipped.losses[0] != plain.losses[0]
    assert torch.load(tmp_path / STATE_FILE, weights_only=True)["fingerprint"]["act_clip"] == 0.8
    with pytest.raises(RotationError, match=r"act_clip: 0.8 -> 0.9"):
        train(fuse_norms(tiny_model(True)), windows, steps=2, state_dir=tmp_path, progress=False,
              act_clip=0.9, kv_clip=0.95)


def test_train_under_kv_groups_is_its_own_run(tmp_path):
    """--kv-group reaches the training cache (a different loss from one range per head) and joins the
    resume fingerprint only when set, so runs saved before KV groups existed still resume."""
    windows = ids(2, 16, seed=4)
    per_head = train(fuse_norms(tiny_model(True)), windows, steps=2, state_dir=tmp_path / "a", progress=False,
                     stop_after=1)
    assert "kv_group" not in torch.load(tmp_path / "a" / STATE_FILE, weights_only=True)["fingerprint"]
    grouped = train(fuse_norms(tiny_model(True)), windows, steps=2, state_dir=tmp_path / "b", progress=False,
                    kv_group=8, stop_after=1)   # head_dim 16: two ranges per head
    assert grouped.losses[0] != per_head.losses[0]
    assert torch.load(tmp_path / "b" / STATE_FILE, weights_only=True)["fingerprint"]["kv_group"] == 8
    with pytest.raises(RotationError, match=r"kv_group: 8 -> None"):
        train(fuse_norms(tiny_model(True)), windows, steps=2, state_dir=tmp_path / "b", progress=False)


def test_training_quantizers_default_to_the_spinquant_method():
    from gq_quantize.methods.spinquant import SpinQuantConfig

    d = SpinQuantConfig()
    assert training_quantizers(None, None, None) == (d.act_clip, d.kv_clip, d.act_group, d.kv_group)
    assert training_quantizers(1.0, None, 32, 8) == (1.0, d.kv_clip, 32, 8)
    with pytest.raises(RotationError, match="act_clip"):
        training_quantizers(1.5, None, None)


# ----------------------------------------------------------------------------------- directories
@pytest.fixture(scope="module")
def tied_model_dir(tmp_path_factory, tiny_lm_dir):
    """A tied tiny Llama (hidden 64, 4 heads / 2 KV heads of 16) with the serving fixtures' tokenizer."""
    d = tmp_path_factory.mktemp("tied-llama")
    for f in tiny_lm_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy2(f, d / f.name)
    vocab = json.loads((tiny_lm_dir / "config.json").read_text())["vocab_size"]
    tiny_model(True, vocab_size=vocab).save_pretrained(d)
    return d


def _logits(model_dir, x):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(x).logits


@pytest.mark.parametrize("mode", ["none", "hadamard", "learned"])
def test_write_rotated_model_keeps_logits(tied_model_dir, tmp_path, mode):
    out = tmp_path / f"rot-{mode}"
    x = ids(2, 10, vocab=30)
    windows = ids(2, 16, vocab=30, seed=7) if mode == "learned" else None
    rec = write_rotated_model(tied_model_dir, out, mode, steps=2, windows=windows, progress=False)
    assert rec["mode"] == mode and len(rec["source_weights_sha256"]) == 64 and rec["dtype"] == "float32"
    assert json.loads((out / ROTATION_JSON).read_text())["mode"] == mode
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    assert (out / "tokenizer.json").is_file() and (out / ROTATIONS_FILE).is_file()
    assert not (out / STATE_FILE).exists() and not list(tmp_path.glob(".*partial"))
    if mode == "learned":
        assert (out / LOSS_PNG).is_file() and rec["final_loss"] is not None
        # trained under the quantizers gq quantize --method spinquant serves by default
        assert (rec["train_act_clip"], rec["train_kv_clip"], rec["train_act_group"],
                rec["train_kv_group"]) == training_quantizers(None, None, None)
    torch.testing.assert_close(_logits(out, x), _logits(tied_model_dir, x), atol=1e-4, rtol=0)
    with pytest.raises(FileExistsError, match="--overwrite"):
        write_rotated_model(tied_model_dir, out, mode, progress=False)


def test_centred_embeddings_are_the_only_change(tied_model_dir, tmp_path):
    out = tmp_path / "centred"
    x = ids(2, 10, vocab=30)
    rec = write_rotated_model(tied_model_dir, out, "hadamard", progress=False, center=True)
    assert rec["center_embeddings"] is True
    # Reference: the source model, untied, with only its embedding rows centred (no rotation).
    ref = AutoModelForCausalLM.from_pretrained(tied_model_dir, dtype=torch.float32).eval()
    with pytest.raises(RotationError, match="fuse_norms first"):
        center_embeddings(ref)
    untie_lm_head(ref)
    center_embeddings(ref)
    e = ref.model.embed_tokens.weight
    assert e.mean(dim=1).abs().max() < 1e-6 and ref.lm_head.weight.mean(dim=1).abs().max() > 1e-3
    with torch.no_grad():
        want = ref(x).logits
    got = _logits(out, x)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    assert (got - _logits(tied_model_dir, x)).abs().max() > 1e-3  # not an identity under RMSNorm


def test_rotation_file_reuse_and_mismatch(tied_model_dir, tiny_lm_dir, tmp_path):
    first = tmp_path / "first"
    write_rotated_model(tied_model_dir, first, "hadamard", seed=3, progress=False)
    again = tmp_path / "again"
    write_rotated_model(tied_model_dir, again, "learned", rotation_file=first / ROTATIONS_FILE, progress=False)
    from safetensors.torch import load_file

    a, b = load_file(str(first / ROTATIONS_FILE)), load_file(str(again / ROTATIONS_FILE))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # tiny_lm_dir: hidden 32, head_dim 8 -> R1 does not fit.
    with pytest.raises(RotationError, match=r"tensor R1 has shape \[64, 64\], expected \[32, 32\]"):
        write_rotated_model(tiny_lm_dir, tmp_path / "bad", "learned", rotation_file=first / ROTATIONS_FILE,
                            progress=False)


def test_saved_dtype_follows_the_source(tied_model_dir, tmp_path):
    src = tmp_path / "fp16"
    shutil.copytree(tied_model_dir, src)
    AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).half().save_pretrained(src)
    rec = write_rotated_model(src, tmp_path / "out", "hadamard", progress=False)
    assert rec["dtype"] == "float16"
    from safetensors import safe_open

    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.float16


def test_cli_rotate(tied_model_dir, tmp_path, capsys):
    from gq_serve.cli import main

    out = tmp_path / "cli-rot"
    assert main(["rotate", str(tied_model_dir), str(out), "--rotation", "hadamard", "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["mode"] == "hadamard"
    assert main(["rotate", str(tied_model_dir), str(out), "--rotation", "hadamard", "--quiet"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["rotate", str(tied_model_dir), str(out), "--rotation", "none", "--overwrite", "--quiet",
                 "--center-embeddings"]) == 0
    assert json.loads(capsys.readouterr().out)["center_embeddings"] is True
    assert main(["rotate", str(tied_model_dir), str(out), "--rotation", "learned", "--overwrite", "--quiet",
                 "--act-clip", "0"]) == 2
    assert "act_clip" in capsys.readouterr().err and out.is_dir()  # refused before the old output was touched
    assert main(["rotate", str(tied_model_dir), str(out), "--rotation", "learned", "--overwrite", "--quiet",
                 "--kv-group", "12"]) == 2
    assert "KV groups of 12 channels do not divide head_dim 16" in capsys.readouterr().err
    assert json.loads((out / ROTATION_JSON).read_text())["mode"] == "none"  # the old output is whole


# ----------------------------------------------------------------------------------- real model
@pytest.mark.model
@pytest.mark.slow
def test_smollm2_hadamard_rotation_keeps_logits(smollm2_dir, smollm2_tokenizer, tmp_path):
    out = tmp_path / "smollm2-hadamard"
    write_rotated_model(smollm2_dir, out, "hadamard", dtype="float32", progress=False)
    x = smollm2_tokenizer("The state of the union is strong, and the economy", return_tensors="pt")["input_ids"]
    ref, got = _logits(smollm2_dir, x), _logits(out, x)
    scale = float(ref.abs().max())
    assert float((got - ref).abs().max()) < 1e-3 * scale
    assert torch.equal(got[0].argmax(-1), ref[0].argmax(-1))
