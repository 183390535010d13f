"""`gq quantize` / `gq eval` end to end on a tiny random Llama, and their answers to bad input."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from gq_serve.checkpoint import load_quantized_model
from gq_serve.cli import main
from gq_quantize import pipeline




@pytest.fixture()
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("gq-cache")


def quantize_args(cache: Path, model: Path, corpus: Path, out: Path, *extra: str) -> list[str]:
    return ["--cache", str(cache), "quantize", str(model), "--calib", str(corpus), "--n-samples", "4",
            "--seq-len", "16", "--out", str(out), "--quiet", *extra]


@pytest.mark.parametrize("method_args", [
    ["--method", "rtn", "--bits", "3"],
    ["--method", "rtn", "--bits", "4", "--group-size", "16", "--sym"],
    ["--method", "gptq", "--bits", "3"],
    ["--method", "gptq", "--bits", "2", "--guided", "--groups", "2"],
    ["--method", "squeezellm", "--bits", "3"],
    ["--method", "lnq", "--bits", "2"],
    ["--method", "lnq", "--bits", "3", "--guided", "--groups", "4"],
    ["--method", "lnq", "--bits", "8", "--guided"],
], ids=lambda a: "-".join(x.strip("-") for x in a))
def test_quantize_then_eval(tiny_lm_dir, corpus, cache, tmp_path, capsys, method_args):
    out = tmp_path / "ckpt"
    assert main(quantize_args(cache, tiny_lm_dir, corpus, out, *method_args)) == 0
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["method"] == method_args[1] and qc["bits"] == int(method_args[3])
    manifest = json.loads((out / "gq_manifest.json").read_text())
    assert set(manifest["objectives"]) == {f"model.layers.{i}.{m}" for i in range(2) for m in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    # No leftovers of the resumable per-layer results once the export finished.
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".ckpt.partial")]

    capsys.readouterr()
    assert main(["--cache", str(cache), "eval", str(out), "--data", str(corpus), "--ctx", "16",
                 "--max-tokens", "128", "--quiet"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["tokens"] == 8 * 15 and rows[0]["ppl"] > 1.0


def test_quantized_weights_are_what_the_quantizer_produced(tiny_lm_dir, corpus, cache, tmp_path):
    """The checkpoint's dequantized weights change the model, and stay within the codebook."""
    out = tmp_path / "ckpt"
    assert main(quantize_args(cache, tiny_lm_dir, corpus, out, "--method", "lnq", "--bits", "2")) == 0
    model = load_quantized_model(out)
    lin = model.model.layers[0].mlp.up_proj
    w_hat = lin.dequantize()
    assert all(len(torch.unique(row)) <= 4 for row in w_hat)
    original = load_quantized_model(tiny_lm_dir).model.layers[0].mlp.up_proj.weight.float()
    assert (w_hat - original).abs().max() > 0
    assert (w_hat - original).abs().mean() < original.abs().mean()


def test_killed_run_resumes_without_redoing_layers(tiny_lm_dir, corpus, cache, tmp_path, monkeypatch):
    out = tmp_path / "ckpt"
    calls = []
    die = [True]
    real = pipeline.quantize_layer

    def dying(*args, **kwargs):
        calls.append(1)
        if die[0] and len(calls) == 5:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "quantize_layer", dying)
    args = quantize_args(cache, tiny_lm_dir, corpus, out, "--method", "gptq", "--bits", "3")
    assert main(args) == 130
    assert not out.exists()
    calls.clear()
    die[0] = False
    assert main(args) == 0
    assert len(calls) == 14 - 4  # the four finished layers were loaded, not recomputed
    assert (out / "config.json").exists()


def _expect_error(capsys, argv, *needles) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    for needle in needles:
        assert needle in err, err
    return err


@pytest.mark.parametrize("extra, needles", [
    (["--method", "awq", "--bits", "4"], ["method"]),
    (["--method", "lnq", "--bits", "5"], ["--bits 5", "[2, 3, 4, 8]"]),
    (["--method", "gptq", "--bits", "8"], ["--bits 8", "[2, 3, 4]"]),
    (["--method", "lnq", "--bits", "3", "--guided", "--groups", "3"], ["--groups 3", "does not divide"]),
    (["--method", "rtn", "--bits", "3", "--guided"], ["--guided"]),
    (["--method", "rtn", "--bits", "3", "--groups", "2"], ["--groups"]),
])
def test_bad_options_are_refused(tiny_lm_dir, corpus, cache, tmp_path, capsys, extra, needles):
    _expect_error(capsys, quantize_args(cache, tiny_lm_dir, corpus, tmp_path / "o", *extra), *needles)
    assert not (tmp_path / "o").exists()


def test_bad_model_directories(tmp_path, corpus, cache, capsys):
    args = ["--method", "rtn", "--bits", "3"]
    _expect_error(capsys, quantize_args(cache, tmp_path / "nope", corpus, tmp_path / "o", *args),
                  "does not exist")
    empty = tmp_path / "empty"
    empty.mkdir()
    _expect_error(capsys, quantize_args(cache, empty, corpus, tmp_path / "o", *args), "no config.json")
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"architectures": ["BertModel"], "model_type": "bert"}))
    _expect_error(capsys, quantize_args(cache, bert, corpus, tmp_path / "o", *args), "not a causal language model")
    _expect_error(capsys, ["--cache", str(cache), "quantize", "smollm2", "--method", "rtn", "--bits", "3",
                           "--out", str(tmp_path / "o")], "gq prepare")


def test_existing_output_needs_overwrite(tiny_lm_dir, corpus, cache, tmp_path, capsys):
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    args = quantize_args(cache, tiny_lm_dir, corpus, out, "--method", "rtn", "--bits", "3")
    _expect_error(capsys, args, "--overwrite")
    assert (out / "mine.txt").read_text() == "keep me"
    assert main(args + ["--overwrite"]) == 0
    assert not (out / "mine.txt").exists() and (out / "config.json").exists()


def test_corrupt_calibration_cache_is_refused_then_rebuilt(tiny_lm_dir, corpus, cache, tmp_path, capsys):
    args = ["--method", "gptq", "--bits", "3"]
    assert main(quantize_args(cache, tiny_lm_dir, corpus, tmp_path / "a", *args)) == 0
    hessians = sorted((cache / "calibration").glob("*/hessians/*.safetensors"))
    assert hessians
    hessians[0].write_bytes(b"\0" * hessians[0].stat().st_size)  # same size, wrong bytes
    err = _expect_error(capsys, quantize_args(cache, tiny_lm_dir, corpus, tmp_path / "b", *args), "--recalibrate")
    assert hessians[0].name in err
    assert not (tmp_path / "b").exists()
    assert main(quantize_args(cache, tiny_lm_dir, corpus, tmp_path / "b", *args, "--recalibrate")) == 0


def test_eval_of_missing_checkpoint(tmp_path, cache, capsys):
    _expect_error(capsys, ["--cache", str(cache), "eval", str(tmp_path / "nope")], "no config.json")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("method_args", [["--method", "gptq", "--bits", "3"],
                                         ["--method", "lnq", "--bits", "3", "--guided", "--groups", "2"]],
                         ids=["gptq3", "lnq3-gq2"])
def test_quantize_on_cuda_matches_cpu(tiny_lm_dir, corpus, tmp_path, capsys, method_args):
    """Calibration and quantization with --device cuda give the CPU's result within float tolerance:
    the same layer objectives (GPU GEMMs round differently, so a few codes on near-ties may flip)
    and the same perplexity."""
    runs = {}
    for device in ("cpu", "cuda"):
        out = tmp_path / device
        assert main(quantize_args(tmp_path / f"cache-{device}", tiny_lm_dir, corpus, out, *method_args,
                                  "--device", device)) == 0
        capsys.readouterr()
        assert main(["--cache", str(tmp_path / f"cache-{device}"), "eval", str(out), "--data", str(corpus),
                     "--ctx", "16", "--max-tokens", "128", "--device", "cpu", "--quiet"]) == 0
        ppl = json.loads(capsys.readouterr().out)[0]["ppl"]
        runs[device] = (json.loads((out / "gq_manifest.json").read_text())["objectives"], ppl)
    (obj_cpu, ppl_cpu), (obj_gpu, ppl_gpu) = runs["cpu"], runs["cuda"]
    assert obj_cpu.keys() == obj_gpu.keys()
    for name in obj_cpu:
        assert obj_gpu[name] == pytest.approx(obj_cpu[name], rel=0.05), name
    assert ppl_gpu == pytest.approx(ppl_cpu, rel=0.02)
