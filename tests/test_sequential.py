"""Sequential calibration (`gq quantize --sequential`) on a tiny random Llama: the Hessians it takes,
the objective it writes, resuming, and the per-layer call capture it shares with the cached pass."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gq_quantize import pipeline
from gq_quantize.calibration import CalibrationCache
from gq_quantize.calibration.hessians import capture_layer_calls
from gq_quantize.config import CalibrationConfig, QuantizeConfig
from gq_quantize.data import calibration_windows
from gq_quantize.methods.objective import quadratic_objective
from gq_serve.checkpoint import load_quantized_model


N, SEQ = 4, 16



def qconfig(corpus: Path, **kw) -> QuantizeConfig:
    return QuantizeConfig(calibration=CalibrationConfig(data=str(corpus), n_samples=N, seq_len=SEQ), **kw)


class Spy:
    """Wraps pipeline.quantize_layer: records the Hessian each layer was quantized with."""

    def __init__(self, monkeypatch):
        self.hessians: list[torch.Tensor] = []
        real = pipeline.quantize_layer

        def spy(w, cfg, hessian, fisher, *layer):
            self.hessians.append(hessian.clone())
            return real(w, cfg, hessian, fisher, *layer)

        monkeypatch.setattr(pipeline, "quantize_layer", spy)


def cached_hessians(model_dir: Path, corpus: Path, cache: Path, guided: bool, groups: int) -> dict:
    """The calibration cache's Hessians of the unquantized model, by linear name."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gq_quantize.calibration import quantizable_linears

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    windows = calibration_windows(AutoTokenizer.from_pretrained(model_dir), str(corpus), N, SEQ, 0, cache)
    c = CalibrationCache.open_or_build(cache, model, model_dir, windows, groups=groups, need_guided=guided,
                                       need_fisher=False, progress=False)
    return {n: c.hessian(n, guided=guided, groups=groups if guided else 1) for n in quantizable_linears(model)}


@pytest.mark.parametrize("guided", [False, True], ids=["plain", "guided-g2"])
def test_sequential_with_nothing_quantized_is_the_cached_pass(tiny_lm_dir, corpus, tmp_path, monkeypatch, guided):
    """With the quantized weights never applied, every Hessian the sequential pass hands the
    quantizer is the cached pass's (same windows, unquantized model): the stage order, the per-stage
    forward passes cut short and the saliency coarsening change nothing."""
    groups = 2 if guided else 1
    ref = cached_hessians(tiny_lm_dir, corpus, tmp_path / "cache", guided, groups)
    spy = Spy(monkeypatch)
    monkeypatch.setattr(pipeline, "apply_quantized", lambda lin, result: None)
    cfg = qconfig(corpus, method="gptq", bits=3, guided=guided, groups=groups, sequential=True)
    pipeline.quantize_model(tiny_lm_dir, cfg, tmp_path / "out", tmp_path / "cache", progress=False)
    assert len(spy.hessians) == len(ref) == 14
    # Quantized in GPTQ's true-sequential order: q/k/v, o, gate/up, down, layer by layer.
    manifest = json.loads((tmp_path / "out" / "gq_manifest.json").read_text())
    assert manifest["calibration"]["sequential"] is True
    for h, (name, want) in zip(spy.hessians, ref.items()):
        assert h.shape == (groups, *want.shape[1:]), name
        torch.testing.assert_close(h, want, rtol=1e-5, atol=1e-6 * float(want.abs().max()))


def test_sequential_hessians_come_from_the_quantized_layers(tiny_lm_dir, corpus, tmp_path, monkeypatch):
    """Layer 1's Hessian is X^T X of its inputs in the model whose layer 0 holds the checkpoint's
    W_hat, and the objective in the manifest is the one under the Hessian the quantizer used."""
    spy = Spy(monkeypatch)
    out = tmp_path / "out"
    pipeline.quantize_model(tiny_lm_dir, qconfig(corpus, method="gptq", bits=2, sequential=True), out,
                            tmp_path / "cache", progress=False)
    names = [f"model.layers.{i}.{m}" for i in range(2) for m in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    by_name = dict(zip(names, spy.hessians))
    manifest = json.loads((out / "gq_manifest.json").read_text())

    from transformers import AutoModelForCausalLM, AutoTokenizer

    fp = AutoModelForCausalLM.from_pretrained(tiny_lm_dir, dtype=torch.float32).eval()
    quant = load_quantized_model(out)
    for name in names:  # objective = quadratic objective of the stored W_hat under that Hessian
        w = fp.get_submodule(name).weight.detach()
        w_hat = quant.get_submodule(name).dequantize()
        assert manifest["objectives"][name] == pytest.approx(quadratic_objective(w, w_hat, by_name[name]), rel=1e-6)

    # Independent check for layer 1's q_proj: run the fp model with layer 0's weights set to W_hat.
    with torch.no_grad():
        for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                  "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
            name = f"model.layers.0.{m}"
            fp.get_submodule(name).weight.copy_(quant.get_submodule(name).dequantize())
    windows = calibration_windows(AutoTokenizer.from_pretrained(tiny_lm_dir), str(corpus), N, SEQ, 0,
                                  tmp_path / "cache")
    xs = []
    hook = fp.model.layers[1].self_attn.q_proj.register_forward_hook(lambda _m, inp, _o: xs.append(inp[0][0]))
    with torch.no_grad():
        for w in windows:
            fp(input_ids=w[None], use_cache=False)
    hook.remove()
    x = torch.cat(xs)
    want = (x.T @ x / x.shape[0]).unsqueeze(0)
    got = by_name["model.layers.1.self_attn.q_proj"]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6 * float(want.abs().max()))
    # ... and it differs from the unquantized model's (layer 0 really was quantized first).
    ref = cached_hessians(tiny_lm_dir, corpus, tmp_path / "cache2", False, 1)["model.layers.1.self_attn.q_proj"]
    assert (got - ref).abs().max() > 1e-3 * ref.abs().max()


def test_killed_sequential_run_resumes_to_the_same_checkpoint(tiny_lm_dir, corpus, tmp_path, monkeypatch):
    cfg = qconfig(corpus, method="lnq", bits=2, guided=True, groups=2, sequential=True)
    pipeline.quantize_model(tiny_lm_dir, cfg, tmp_path / "whole", tmp_path / "cache", progress=False)
    calls = []
    real = pipeline.quantize_layer

    def dying(*args, **kwargs):
        calls.append(1)
        if len(calls) == 9:  # in layer 1, after its q/k/v group: resume mid-layer, from saved inputs
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "quantize_layer", dying)
    with pytest.raises(KeyboardInterrupt):
        pipeline.quantize_model(tiny_lm_dir, cfg, tmp_path / "resumed", tmp_path / "cache", progress=False)
    calls.clear()
    monkeypatch.setattr(pipeline, "quantize_layer", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    summary = pipeline.quantize_model(tiny_lm_dir, cfg, tmp_path / "resumed", tmp_path / "cache", progress=False)
    assert summary["layers_resumed"] == 8 and len(calls) == 6
    a = load_quantized_model(tmp_path / "whole")
    b = load_quantized_model(tmp_path / "resumed")
    from gq_serve.quant_linear import GQLinear

    pairs = [(n, m, b.get_submodule(n)) for n, m in a.named_modules() if isinstance(m, GQLinear)]
    assert len(pairs) == 14
    for name, ma, mb in pairs:
        assert torch.equal(ma.dequantize(), mb.dequantize()), name


def test_sequential_refused_for_methods_without_a_hessian(corpus):
    with pytest.raises(ValueError, match="--sequential"):
        qconfig(corpus, method="rtn", bits=3, sequential=True)
    with pytest.raises(ValueError, match="--sequential"):
        qconfig(corpus, method="squeezellm", bits=3, sequential=True)


def test_layer_calls_are_captured_per_layer():
    """Gemma 3 mixes sliding-window and global layers with different rotary embeddings: each layer
    must get its own call arguments, not layer 0's."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=4,
                           layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                           max_position_embeddings=64)
    model = Gemma3ForCausalLM(cfg).eval()
    windows = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    first, calls = capture_layer_calls(model, windows, "cpu")
    assert first.shape == (2, 8, 32) and [len(c) for c in calls] == [2, 2, 2]
    cos0 = calls[0][0].kwargs["position_embeddings"][0]
    cos1 = calls[1][0].kwargs["position_embeddings"][0]
    assert calls[2][0].kwargs["position_embeddings"][0] is cos0 and not torch.equal(cos0, cos1)
    assert "forward" not in vars(model.model.layers[0])  # the stubs are gone
    # Running the layers on the captured calls reproduces the model's own forward.
    h = first
    for idx, layer in enumerate(model.model.layers):
        h = torch.cat([layer(h[w : w + 1], **calls[idx][w].kwargs) for w in range(2)])
    with torch.no_grad():
        ref = model(input_ids=windows, output_hidden_states=True).hidden_states[-1]
    torch.testing.assert_close(model.model.norm(h), ref, rtol=1e-5, atol=1e-5)


def test_linear_groups_are_found_the_same_every_time(tiny_lm_dir):
    """The true-sequential groups of a Llama layer, found by execution, on every one of many tries:
    keying the groups by id() of the input tensors merged o_proj into gate/up now and then (a freed
    input's id reused by the next one), which made a resumed run differ from a whole one."""
    from transformers import AutoModelForCausalLM

    from gq_quantize.calibration.hessians import decoder_layers

    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir, dtype=torch.float32).eval()
    layers, prefix = decoder_layers(model)
    windows = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    first, calls = capture_layer_calls(model, windows, "cpu")
    want = [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
            ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]
    for i in range(300):
        stages = pipeline._stages(layers[0], f"{prefix}.0", first, calls[0][0], "cpu")
        assert [[n.removeprefix(f"{prefix}.0.") for n in s] for s in stages] == want, f"try {i}"
