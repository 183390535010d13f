"""Export -> load round trips, validation errors, atomicity, perplexity (tiny random Llama)."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from gq_serve.checkpoint import (
    load_quantized_model,
    read_quantization_config,
    verify_checkpoint_files,
)
from gq_serve.evaluate import perplexity
from gq_serve.quant_linear import GQLinear
from gq_kernels.bcq import reference as bcq_ref
from gq_quantize import export as export_mod
from gq_quantize.config import QuantizeConfig
from gq_quantize.export import export_checkpoint
from gq_kernels.bcq.format import UniformQuant
from gq_kernels.lut.format import LutQuant

VOCAB, HIDDEN, FFN = 96, 64, 80  # FFN 80: down_proj's input is not a multiple of 32


def _tiny_config(**kw):
    from transformers import LlamaConfig

    base = dict(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=True, attention_bias=True,  # bias: quantized linears keep theirs
    )
    base.update(kw)
    return LlamaConfig(**base)


@pytest.fixture(scope="module")
def fp16_dir(tmp_path_factory) -> Path:
    """A tiny random Llama saved as an fp16 HF directory, plus stand-in tokenizer files."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(_tiny_config())
    out = tmp_path_factory.mktemp("fp16") / "tiny-llama"
    model.half().save_pretrained(out)
    (out / "tokenizer.json").write_text('{"stand-in": true}\n')
    (out / "tokenizer_config.json").write_text("{}\n")
    return out


def _linears(model_dir: Path) -> dict[str, tuple[int, int]]:
    return {n: s[:2] for n, s in export_mod.linear_shapes(json.loads((model_dir / "config.json").read_text())).items()}


def _random_quant(model_dir: Path, fmt: str, bits: int, group_size: int = -1, seed: int = 0) -> dict:
    """A LutQuant / UniformQuant with random codes and parameters for every linear except lm_head."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, (o, i) in sorted(_linears(model_dir).items()):
        if name == "lm_head":
            continue
        codes = torch.randint(0, 1 << bits, (o, i), generator=g).to(torch.uint8)
        if fmt == "lut":
            out[name] = LutQuant(codes, (torch.randn(o, 1 << bits, generator=g) * 0.05).half(), bits,
                                 stats={"objective": torch.tensor(1.5)})
        else:
            n_g = bcq_ref.n_groups(i, group_size)
            out[name] = UniformQuant(codes, (torch.rand(o, n_g, generator=g) * 0.01).half(),
                                     (torch.randn(o, n_g, generator=g) * 0.02).half(), bits, group_size)
    return out


CASES = {
    "lut": (QuantizeConfig(method="squeezellm", bits=3), "lut", 3, -1),
    "bcq": (QuantizeConfig(method="rtn", bits=3, group_size=24), "bcq", 3, 24),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def exported(request, fp16_dir, tmp_path_factory):
    """(checkpoint dir, quantized dict, qconfig) for each format."""
    qconfig, fmt, bits, group_size = CASES[request.param]
    quantized = _random_quant(fp16_dir, fmt, bits, group_size)
    out = tmp_path_factory.mktemp(f"ckpt-{fmt}") / "q"
    extra = {"calibration": {"data_hash": "d" * 8, "model_hash": "m" * 8}, "objectives": {"x": 0.5}}
    export_checkpoint(fp16_dir, quantized, qconfig, out, manifest_extra=extra)
    return out, quantized, qconfig


def _reference_model(fp16_dir: Path, quantized: dict):
    """A plain fp32 model holding the dequantized weights W_hat."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(fp16_dir, dtype=torch.float32)
    with torch.no_grad():
        for name, q in quantized.items():
            model.get_submodule(name).weight.copy_(q.dequantize())
    return model.eval()


TOKENS = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))


# ----------------------------------------------------------------------------- round trips
def test_loaded_dequantize_is_bit_exact(exported):
    ckpt, quantized, _ = exported
    model = load_quantized_model(ckpt)
    gq = {n: m for n, m in model.named_modules() if isinstance(m, GQLinear)}
    assert set(gq) == set(quantized)
    for name, q in quantized.items():
        w = gq[name].dequantize()
        assert w.dtype == torch.float32
        assert torch.equal(w, q.dequantize()), name


def test_loaded_logits_equal_dense_model_with_w_hat(exported, fp16_dir):
    ckpt, quantized, _ = exported
    model = load_quantized_model(ckpt)
    ref = _reference_model(fp16_dir, quantized)
    with torch.inference_mode():
        assert torch.equal(model(TOKENS).logits, ref(TOKENS).logits)


def test_config_and_manifest(exported):
    ckpt, quantized, qconfig = exported
    qc = read_quantization_config(ckpt)
    assert qc.quant_method == "guidedquant" and qc.format_version == 1
    assert qc.format == qconfig.format and qc.bits == qconfig.bits
    assert qc.modules_to_not_convert == ["lm_head"]
    assert json.loads((ckpt / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert (ckpt / "tokenizer.json").is_file() and (ckpt / "generation_config.json").is_file()
    manifest = json.loads((ckpt / "gq_manifest.json").read_text())
    assert manifest["quantization"]["method"] == qconfig.method and manifest["quantization"]["g"] == 1
    assert manifest["calibration"]["data_hash"] == "d" * 8 and manifest["objectives"] == {"x": 0.5}
    assert set(manifest["layers"]) == set(quantized)
    assert "model.safetensors" in manifest["files"] and manifest["package"]["version"]
    assert f"{sorted(quantized)[0]}.qweight" in manifest["tensors"]
    verify_checkpoint_files(ckpt)


def test_sharded_export_loads(fp16_dir, tmp_path):
    qconfig, fmt, bits, gs = CASES["bcq"]
    quantized = _random_quant(fp16_dir, fmt, bits, gs, seed=5)
    out = export_checkpoint(fp16_dir, quantized, qconfig, tmp_path / "sharded", max_shard_bytes=8_000)
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2 and (out / "model.safetensors.index.json").is_file()
    assert not (out / "model.safetensors").exists()
    model = load_quantized_model(out)
    for name, q in quantized.items():
        assert torch.equal(model.get_submodule(name).dequantize(), q.dequantize())
    verify_checkpoint_files(out)


def test_plain_fp16_dir_loads(fp16_dir):
    from transformers import AutoModelForCausalLM

    model = load_quantized_model(fp16_dir)
    assert model.gq_quantization_config is None
    ref = AutoModelForCausalLM.from_pretrained(fp16_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        assert torch.equal(model(TOKENS).logits, ref(TOKENS).logits)


def test_cache_follows_dtype(exported):
    ckpt, quantized, _ = exported
    model = load_quantized_model(ckpt)
    layer = model.get_submodule(sorted(quantized)[0])
    x = torch.randn(3, layer.in_features)
    y32 = layer(x)
    y16 = layer(x.bfloat16())
    assert y16.dtype == torch.bfloat16 and y32.dtype == torch.float32
    torch.testing.assert_close(y16.float(), y32, rtol=5e-2, atol=5e-2)


# ----------------------------------------------------------------------------- validation
def _copy(ckpt: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "edited"
    shutil.copytree(ckpt, dst)
    return dst


def _edit_tensors(ckpt: Path, fn) -> None:
    path = ckpt / "model.safetensors"
    tensors = load_file(path)
    fn(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


QW = "model.layers.1.mlp.down_proj.qweight"


def test_wrong_dtype_names_tensor(exported, tmp_path):
    ckpt = _copy(exported[0], tmp_path)
    _edit_tensors(ckpt, lambda t: t.__setitem__(QW, t[QW].to(torch.int64)))
    with pytest.raises(ValueError, match=rf"{QW}: expected dtype torch.int32, found torch.int64"):
        load_quantized_model(ckpt)


def test_wrong_shape_names_tensor(exported, tmp_path):
    ckpt = _copy(exported[0], tmp_path)
    _edit_tensors(ckpt, lambda t: t.__setitem__(QW, t[QW][:, :, :2].contiguous()))
    with pytest.raises(ValueError, match=rf"{QW}: expected shape \[3, 64, 3\], found \[3, 64, 2\]"):
        load_quantized_model(ckpt)


def test_missing_tensor_names_it(exported, tmp_path):
    ckpt = _copy(exported[0], tmp_path)
    _edit_tensors(ckpt, lambda t: t.pop(QW))
    with pytest.raises(ValueError, match=rf"missing tensor '{QW}'"):
        load_quantized_model(ckpt)


def test_unexpected_tensor_names_it(exported, tmp_path):
    ckpt = _copy(exported[0], tmp_path)
    name = "model.layers.0.self_attn.q_proj.weight"
    _edit_tensors(ckpt, lambda t: t.__setitem__(name, torch.zeros(HIDDEN, HIDDEN, dtype=torch.float16)))
    with pytest.raises(ValueError, match=rf"unexpected tensor '{name}'"):
        load_quantized_model(ckpt)


def test_bad_format_version_refused(exported, tmp_path):
    ckpt = _copy(exported[0], tmp_path)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["quantization_config"]["format_version"] = 2
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="format_version is 2"):
        load_quantized_model(ckpt)


def test_export_rejects_mismatched_layer(fp16_dir, tmp_path):
    qconfig, fmt, bits, gs = CASES["lut"]
    quantized = _random_quant(fp16_dir, fmt, bits, gs)
    name = "model.layers.0.mlp.up_proj"
    quantized[name].codes = quantized[name].codes[:, :10].contiguous()
    with pytest.raises(ValueError, match=rf"{name}: codes must be uint8"):
        export_checkpoint(fp16_dir, quantized, qconfig, tmp_path / "bad")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name, shape, match", [
    ("model.layers.0.mlp.up_proj.weight", None, "not a non-quantized tensor"),
    ("model.layers.0.no_such_norm.weight", (8,), "not a non-quantized tensor"),
    ("model.norm.weight", (3,), r"has shape \(3,\), the source's is"),
])
def test_export_rejects_bad_tuned_tensors(fp16_dir, tmp_path, name, shape, match):
    qconfig, fmt, bits, gs = CASES["lut"]
    quantized = _random_quant(fp16_dir, fmt, bits, gs)
    value = torch.ones(shape or (1,))
    with pytest.raises(ValueError, match=match):
        export_checkpoint(fp16_dir, quantized, qconfig, tmp_path / "bad", tuned={name: value})
    assert list(tmp_path.iterdir()) == []


def test_export_writes_tuned_tensors_in_the_source_dtype(fp16_dir, tmp_path):
    qconfig, fmt, bits, gs = CASES["lut"]
    gain = torch.linspace(0.5, 1.5, HIDDEN)  # float32 in; the source's norms are float16
    src = load_file(next(fp16_dir.glob("*.safetensors")))
    assert src["model.norm.weight"].shape == gain.shape
    out = export_checkpoint(fp16_dir, _random_quant(fp16_dir, fmt, bits, gs), qconfig, tmp_path / "q",
                            tuned={"model.norm.weight": gain})
    got = load_file(out / "model.safetensors")
    assert got["model.norm.weight"].dtype == src["model.norm.weight"].dtype
    assert torch.equal(got["model.norm.weight"], gain.to(src["model.norm.weight"].dtype))
    assert torch.equal(got["model.layers.0.input_layernorm.weight"], src["model.layers.0.input_layernorm.weight"])


# ----------------------------------------------------------------------------- atomicity
def test_refuses_existing_dir_and_leaves_it(fp16_dir, tmp_path):
    qconfig, fmt, bits, gs = CASES["lut"]
    out = tmp_path / "q"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(FileExistsError, match="--overwrite"):
        export_checkpoint(fp16_dir, _random_quant(fp16_dir, fmt, bits, gs), qconfig, out)
    assert [p.name for p in tmp_path.iterdir()] == ["q"] and (out / "keep.txt").read_text() == "old"


def test_overwrite_replaces_old_dir(fp16_dir, tmp_path):
    qconfig, fmt, bits, gs = CASES["lut"]
    out = tmp_path / "q"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    export_checkpoint(fp16_dir, _random_quant(fp16_dir, fmt, bits, gs), qconfig, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["q"]


@pytest.mark.parametrize("pre_existing", [False, True])
def test_failure_mid_export_leaves_nothing(fp16_dir, tmp_path, monkeypatch, pre_existing):
    qconfig, fmt, bits, gs = CASES["lut"]
    out = tmp_path / "q"
    if pre_existing:
        out.mkdir()
        (out / "keep.txt").write_text("old")
    calls = []

    def failing_save(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full (simulated)")
        return save_file(*args, **kwargs)

    monkeypatch.setattr(export_mod, "save_file", failing_save)
    with pytest.raises(OSError, match="simulated"):
        export_checkpoint(fp16_dir, _random_quant(fp16_dir, fmt, bits, gs), qconfig, out,
                          overwrite=True, max_shard_bytes=8_000)
    left = sorted(p.name for p in tmp_path.iterdir())
    if pre_existing:
        assert left == ["q"] and [p.name for p in out.iterdir()] == ["keep.txt"]
    else:
        assert left == []


# ----------------------------------------------------------------------------- perplexity
def test_perplexity_matches_hand_computation(fp16_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(fp16_dir, dtype=torch.float32).eval()
    windows = torch.randint(0, VOCAB, (3, 9), generator=torch.Generator().manual_seed(7))
    res = perplexity(model, windows, batch_size=2, progress=False)
    nlls = []
    with torch.no_grad():
        for w in windows:
            logp = torch.log_softmax(model(w[None]).logits[0].double(), dim=-1)
            nlls += [-logp[t, w[t + 1]].item() for t in range(len(w) - 1)]
    assert res["tokens"] == len(nlls) == 3 * 8 and res["windows"] == 3 and res["ctx"] == 9
    assert res["nll"] == pytest.approx(sum(nlls) / len(nlls), rel=1e-5)
    assert res["ppl"] == pytest.approx(math.exp(sum(nlls) / len(nlls)), rel=1e-5)
    assert res["seconds"] >= 0


def test_untied_model_without_bias_round_trips(tmp_path):
    """Untied lm_head (stored dense) and bias-free linears."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(1)
    src = tmp_path / "untied"
    LlamaForCausalLM(_tiny_config(tie_word_embeddings=False, attention_bias=False)).half().save_pretrained(src)
    qconfig, fmt, bits, gs = CASES["lut"]
    quantized = _random_quant(src, fmt, bits, gs, seed=9)
    out = export_checkpoint(src, quantized, qconfig, tmp_path / "q")
    model = load_quantized_model(out)
    ref = _reference_model(src, quantized)
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    with torch.inference_mode():
        assert torch.equal(model(TOKENS).logits, ref(TOKENS).logits)


def test_transformers_from_pretrained_after_registration(exported):
    """STRETCH: AutoModelForCausalLM.from_pretrained reads the checkpoint once guidedquant is registered."""
    from transformers import AutoModelForCausalLM

    from gq_serve import hf_quantizer

    hf_quantizer.register()  # idempotent
    ckpt, quantized, _ = exported
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    for name, q in quantized.items():
        layer = model.get_submodule(name)
        assert isinstance(layer, GQLinear) and torch.equal(layer.dequantize(), q.dequantize()), name
    ref = load_quantized_model(ckpt)
    with torch.inference_mode():
        assert torch.equal(model(TOKENS).logits, ref(TOKENS).logits)


def test_model_dtype_cast_keeps_packed_params_exact(exported):
    ckpt, quantized, _ = exported
    model = load_quantized_model(ckpt).to(torch.bfloat16)
    for name, q in quantized.items():
        layer = model.get_submodule(name)
        assert layer.qweight.dtype == torch.int32
        assert torch.equal(layer.dequantize(), q.dequantize()), name
    assert model(TOKENS).logits.dtype == torch.bfloat16
