"""The registries: formats, the checkpoint schema, kernels and their choice, methods and the CLI
flags generated from their configs, and what export writes (objective, file modes)."""
from __future__ import annotations

import json
import os
import stat

import pytest
import torch

from gq_kernels.format import LinearSpec
from gq_kernels.kernel import DenseKernel, LinearKernel, ReferenceKernel
from gq_kernels.registry import choose_kernel, format_names, get_format, kernel_names, kernels, register_format
from gq_kernels.schema import QuantizationConfig, parse_quantization_config
from gq_quantize.config import QuantizeConfig
from gq_quantize.methods.registry import get_method, method_names, option_fields

# A quantization_config as gq-serve wrote it before the registries (format_version 1, every
# method's options flat): it must keep loading.
V1_LNQ = {
    "bits": 3, "calibration": {"data": "sotu:calib", "n_samples": 32, "seed": 0, "seq_len": 512},
    "format": "lut", "format_version": 1, "gptq_block": 128, "gptq_damp": 0.01, "group_size": -1, "groups": 4,
    "guided": True, "kmeans_iters": 50, "lnq_cd_sweeps": 4, "lnq_iters": 2, "lnq_lambda": 1e-07, "method": "lnq",
    "modules_to_not_convert": ["lm_head"], "quant_method": "guidedquant", "sym": False,
}


# ----------------------------------------------------------------------------- formats + schema
def test_builtin_formats_and_their_layout():
    assert {"lut", "bcq"} <= set(format_names())
    lut = get_format("lut")
    specs = lut.tensors(lut.params(bits=3), 24, 70)
    assert {n: (s.shape, s.dtype) for n, s in specs.items()} == {
        "qweight": ((3, 24, 3), torch.int32), "codebook": ((24, 8), torch.float16)}
    bcq = get_format("bcq")
    specs = bcq.tensors(bcq.params(bits=2, group_size=32), 24, 70)
    assert specs["scales"].shape == (24, 3) and specs["scales"].in_unit == 32 and specs["qweight"].in_unit == 32
    assert bcq.tensors(bcq.params(bits=2), 24, 70)["scales"].in_dim is None  # per channel: every column
    with pytest.raises(ValueError, match="unknown quantization format 'nope'"):
        get_format("nope")


def test_v1_checkpoint_config_still_parses():
    qc = parse_quantization_config(V1_LNQ)
    assert qc.format == "lut" and qc.bits == 3 and qc.params == get_format("lut").params(bits=3)
    assert qc.modules_to_not_convert == ["lm_head"] and qc.kernel is None
    assert qc.to_dict() == V1_LNQ  # provenance rides along unchanged
    assert parse_quantization_config(qc.to_dict()) == qc


@pytest.mark.parametrize("change, field", [
    ({"format_version": 2}, "quantization_config.format_version is 2"),
    ({"format_version": "1"}, "quantization_config.format_version"),
    ({"bits": 5}, "quantization_config.bits is 5"),
    ({"bits": True}, "quantization_config.bits"),
    ({"group_size": 128}, "quantization_config.group_size"),  # lut codebooks are per row
    ({"format": "no-such-format"}, "not served"),
    ({"quant_method": "gptq"}, "quantization_config.quant_method"),
    ({"modules_to_not_convert": "lm_head"}, "quantization_config.modules_to_not_convert"),
    ({"kernel": 3}, "quantization_config.kernel"),
])
def test_schema_refuses_with_the_field_named(change, field):
    with pytest.raises(ValueError, match=field):
        parse_quantization_config({**V1_LNQ, **change})
    with pytest.raises(ValueError, match="JSON object"):
        parse_quantization_config([1])


def test_for_export_writes_loader_fields_params_and_provenance():
    params = get_format("bcq").params(bits=4, group_size=16)
    qc = QuantizationConfig.for_export(params, ["lm_head"], provenance={"method": "rtn", "bits": 99, "sym": True})
    d = qc.to_dict()
    assert d == {"quant_method": "guidedquant", "format_version": 1, "format": "bcq", "bits": 4, "group_size": 16,
                 "modules_to_not_convert": ["lm_head"], "method": "rtn", "sym": True}  # params win over provenance
    assert parse_quantization_config(d).params == params


def test_a_format_name_cannot_be_taken_twice():
    class Impostor(type(get_format("lut"))):
        pass

    with pytest.raises(ValueError, match="already registered"):
        register_format(Impostor())
    assert register_format(get_format("lut")) is get_format("lut")  # same class again: a no-op


# ----------------------------------------------------------------------------- kernels
def _spec(fmt="lut", n=24, k=40, **kw):
    kw.setdefault("bits", 3)
    return LinearSpec(get_format(fmt).params(**kw), n, k)


def test_kernel_choice_on_the_cpu_and_by_name():
    assert kernel_names()[-2:] == ["dense", "reference"]  # generic kernels last
    assert isinstance(choose_kernel(_spec(bits=8), "cpu", torch.float32), DenseKernel)  # no packed CPU kernel at 8 bits
    assert isinstance(choose_kernel(_spec(), "cpu", torch.float32, prefer="reference"), ReferenceKernel)
    with pytest.raises(ValueError, match="unknown kernel 'fast'.*'dense'"):
        choose_kernel(_spec(), "cpu", torch.float32, prefer="fast")
    with pytest.raises(ValueError, match=r"no kernel serves format lut.*\n  lut-triton: needs a CUDA device"):
        choose_kernel(_spec(), "cpu", torch.float16, prefer="lut-triton")


def test_no_kernel_fits_lists_every_reason():
    with pytest.raises(ValueError) as e:
        choose_kernel(_spec("bcq", group_size=8), "cpu", torch.int32)
    lines = str(e.value).splitlines()
    assert "24x40 on cpu for torch.int32" in lines[0]
    auto = [k.name for k in kernels() if k.auto]
    assert [line.split(":")[0].strip() for line in lines[1:]] == auto
    assert "serves formats ['lut']" in str(e.value) and "activations must be one of" in str(e.value)


def test_kernels_compute_the_reference_and_prepare_once():
    torch.manual_seed(0)
    fmt = get_format("bcq")
    spec = _spec("bcq", group_size=8)
    tensors = {n: (torch.randint(-2**31, 2**31 - 1, s.shape, dtype=torch.int64).to(s.dtype) if not s.dtype.is_floating_point
                   else torch.randn(s.shape).to(s.dtype)) for n, s in spec.tensors().items()}
    x = torch.randn(3, 40)
    want = fmt.matmul(x, tensors, spec.params, 40)
    for name in ("dense", "reference"):
        k = choose_kernel(spec, "cpu", torch.float32, prefer=name)
        runtime = k.prepare(tensors)
        assert torch.equal(k.apply(runtime, x), want), name
    assert set(choose_kernel(spec, "cpu", torch.float32, prefer="dense").prepare(tensors)) == {"weight"}


def test_gqlinear_chooses_once_per_device_and_dtype(monkeypatch):
    from gq_serve.quant_linear import GQLinear

    calls = []
    real = DenseKernel.prepare
    monkeypatch.setattr(DenseKernel, "prepare", lambda self, t: calls.append(self.dtype) or real(self, t))
    layer = GQLinear(40, 24, get_format("lut").params(bits=8))  # 8 bits: dense serves on the CPU
    x = torch.randn(2, 40)
    layer(x), layer(x), layer(x.bfloat16()), layer(x.bfloat16())
    assert calls == [torch.float32, torch.bfloat16] and layer.kernel.name == "dense"
    layer.kernel_preference = "reference"
    layer.reset_cache()
    layer(x)
    assert layer.kernel.name == "reference" and "kernel=reference" in repr(layer)


def test_a_new_kernel_class_plugs_in():
    class Doubler(LinearKernel):
        name = "test-only-never-auto"
        auto = False

        def apply(self, tensors, x, bias=None):
            return 2 * x[..., :1]

    from gq_kernels.registry import register_kernel

    register_kernel(Doubler)
    assert kernel_names().index("test-only-never-auto") < kernel_names().index("dense")
    k = choose_kernel(_spec(), "cpu", torch.float32, prefer="test-only-never-auto")
    assert torch.equal(k.apply({}, torch.ones(1, 40)), torch.full((1, 1), 2.0))
    assert choose_kernel(_spec(), "cpu", torch.float32).name != "test-only-never-auto"  # not auto: never chosen unasked


# ----------------------------------------------------------------------------- methods + CLI flags
def test_methods_declare_format_and_needs():
    assert {"rtn", "gptq", "squeezellm", "lnq"} <= set(method_names())
    assert {m: (get_method(m).config.format, set(get_method(m).config.needs)) for m in ("rtn", "gptq", "squeezellm", "lnq")} == {
        "rtn": ("bcq", set()), "gptq": ("bcq", {"hessian"}), "squeezellm": ("lut", {"fisher"}),
        "lnq": ("lut", {"hessian", "fisher"})}


def test_every_option_is_a_flag_that_reaches_the_config(monkeypatch):
    import gq_serve.cli as cli

    parser = cli.build_parser()
    seen = {}
    monkeypatch.setattr("gq_quantize.pipeline.quantize_model", lambda model_dir, qconfig, *a, **k: seen.update(q=qconfig) or {})
    for method, flags, want in [
        ("gptq", ["--gptq-damp", "0.05", "--gptq-block", "64", "--group-size", "32", "--sym"],
         {"gptq_damp": 0.05, "gptq_block": 64, "group_size": 32, "sym": True}),
        ("lnq", ["--lnq-iters", "3", "--lnq-cd-sweeps", "2", "--lnq-lambda", "1e-5", "--kmeans-iters", "7"],
         {"lnq_iters": 3, "lnq_cd_sweeps": 2, "lnq_lambda": 1e-5, "kmeans_iters": 7}),
        ("squeezellm", ["--kmeans-iters", "9"], {"kmeans_iters": 9}),
    ]:
        args = parser.parse_args(["quantize", "/nonexistent", "--method", method, "--bits", "3", "--out", "/x", *flags])
        assert cli.cmd_quantize(args) == 0
        assert {k: getattr(seen["q"].options, k) for k in want} == want
    for name in option_fields():
        assert "--" + name.replace("_", "-") in parser._subparsers._group_actions[0].choices["quantize"].format_help()


def test_a_flag_of_another_method_is_refused(capsys):
    from gq_serve.cli import main

    assert main(["quantize", "/nonexistent", "--method", "lnq", "--bits", "3", "--out", "/x", "--gptq-damp", "0.1"]) == 2
    assert "--gptq-damp does not apply to --method lnq" in capsys.readouterr().err


def test_quantize_config_round_trips_flat():
    q = QuantizeConfig(method="gptq", bits=3, group_size=128, guided=True, groups=2)
    assert q.format == "bcq" and q.format_params() == get_format("bcq").params(bits=3, group_size=128)
    flat = q.flat()
    assert flat["gptq_damp"] == 0.01 and flat["groups"] == 2 and "lnq_iters" not in flat
    again = QuantizeConfig(**{k: v for k, v in flat.items()})
    assert again == q and again.needs() == {"hessian"} and again.hessian_groups() == 2


# ----------------------------------------------------------------------------- export
def test_manifest_objective_is_the_float64_objective(tiny_lm_dir, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from gq_quantize.methods.objective import quadratic_objective
    from gq_serve.checkpoint import load_quantized_model
    from gq_serve.cli import main

    corpus = tmp_path / "c.txt"
    corpus.write_text(" ".join(["the cat sat on the mat and the dog ran"] * 60))
    out = tmp_path / "ckpt"
    assert main(["--cache", str(tmp_path / "cache"), "quantize", str(tiny_lm_dir), "--method", "gptq", "--bits", "3",
                 "--calib", str(corpus), "--n-samples", "4", "--seq-len", "16", "--out", str(out), "--quiet"]) == 0
    manifest = json.loads((out / "gq_manifest.json").read_text())
    name = "model.layers.1.mlp.down_proj"
    (hfile,) = (tmp_path / "cache" / "calibration").glob("*/hessians/layer_01.safetensors")
    H = load_file(hfile)[f"{name}.plain"]
    w = AutoModelForCausalLM.from_pretrained(tiny_lm_dir, dtype=torch.float32).get_submodule(name).weight
    w_hat = load_quantized_model(out).get_submodule(name).dequantize()
    assert manifest["objectives"][name] == quadratic_objective(w.detach(), w_hat, H)

    umask = os.umask(0)
    os.umask(umask)
    for f in [out, *out.iterdir()]:
        want = (0o777 if f.is_dir() else 0o666) & ~umask
        assert stat.S_IMODE(f.stat().st_mode) == want, f  # readable by another user (containers)
