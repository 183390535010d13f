"""`gq quantize --finetune-steps`: the codes fixed, codebooks / scales tuned end to end (quantize/finetune.py)."""
from __future__ import annotations

import contextlib
import json

import pytest
import torch
import torch.nn.functional as F

from gq_kernels.lut.format import LutQuant
from gq_serve.checkpoint import load_quantized_model
from gq_serve.cli import main
from gq_quantize.finetune import finetune_results, token_kl
from gq_kernels.packing import unpack_bitplanes
from test_pipeline_cli import cache, quantize_args  # noqa: F401  (fixture)


def test_token_kl_is_the_mean_kl_per_token():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 11, generator=g), torch.randn(2, 5, 11, generator=g)
    want = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="sum") / 10
    assert torch.allclose(token_kl(s, t), want)
    assert float(token_kl(t, t)) == pytest.approx(0.0, abs=1e-6)


def _lut_results(model, bits=2, seed=0):
    """Round-to-nearest lut results of every decoder linear: codes and per-row codebooks."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and ".layers." in name:
            w = mod.weight.detach()
            lo, hi = w.min(1, keepdim=True).values, w.max(1, keepdim=True).values
            levels = lo + (hi - lo) * torch.linspace(0, 1, 1 << bits)[None]
            codes = (w[:, :, None] - levels[:, None, :]).abs().argmin(-1).to(torch.uint8)
            noisy = levels + 0.3 * (hi - lo) * torch.randn(levels.shape, generator=g) / (1 << bits)
            out[name] = LutQuant(codes=codes, codebook=noisy.half(), bits=bits)
    return out


def test_finetune_lowers_the_kl_and_keeps_the_codes(tiny_lm):
    model = tiny_lm[0]
    torch.manual_seed(0)
    results = _lut_results(model)
    windows = torch.randint(0, model.config.vocab_size, (8, 16))
    from gq_quantize.finetune import FinetuneConfig

    before = {n: r.codebook.clone() for n, r in results.items()}
    tuned, _, stats = finetune_results(model, results, windows, FinetuneConfig(steps=40, lr=3e-3, batch=4),
                                    progress=False)
    assert stats["kl_last10"] < 0.7 * stats["kl_first10"], stats
    assert finetune_results(model, results, windows, FinetuneConfig(steps=1), progress=False)[2]["lr"] == 3e-4
    for n, r in tuned.items():
        assert torch.equal(r.codes, results[n].codes) and r.codebook.dtype == torch.float16
        assert not torch.equal(r.codebook, before[n])
    assert all(p.grad is None for p in model.parameters())  # the teacher is left as it was


@pytest.mark.parametrize("base, tunable", [
    (["--method", "lnq", "--bits", "2"], "codebook"),
    (["--method", "gptq", "--bits", "3", "--group-size", "16"], "scales"),
], ids=["lnq", "gptq"])
def test_gq_quantize_finetune_writes_the_tuned_tensors(tiny_lm_dir, corpus, cache, tmp_path, base, tunable):  # noqa: F811
    plain, tuned = tmp_path / "plain", tmp_path / "tuned"
    assert main(quantize_args(cache, tiny_lm_dir, corpus, plain, *base)) == 0
    assert main(quantize_args(cache, tiny_lm_dir, corpus, tuned, *base, "--finetune-steps", "6",
                              "--finetune-lr", "1e-3")) == 0
    qc = json.loads((tuned / "config.json").read_text())["quantization_config"]
    assert qc["finetune"] == {"steps": 6, "lr": 1e-3, "batch": 2, "windows": 0, "seed": 0, "precision": "auto",
                               "norms": False}
    manifest = json.loads((tuned / "gq_manifest.json").read_text())
    assert manifest["finetune"]["steps"] == 6 and manifest["timings"]["finetune_s"] > 0
    assert manifest["finetune"]["windows"] == manifest["calibration"]["n_samples"]
    a, b = load_quantized_model(plain), load_quantized_model(tuned)
    la, lb = a.model.layers[0].mlp.down_proj, b.model.layers[0].mlp.down_proj
    # the same codes (the layer-wise quantization is deterministic), other codebooks / scales
    assert torch.equal(unpack_bitplanes(la.qweight, la.in_features), unpack_bitplanes(lb.qweight, lb.in_features))
    assert not torch.equal(getattr(la, tunable), getattr(lb, tunable))


@pytest.mark.parametrize("extra, needles", [
    (["--method", "qtip", "--bits", "2", "--finetune-steps", "3"], ["--finetune-steps", "'trellis'", "lnq"]),
    (["--method", "lnq", "--bits", "2", "--finetune-steps", "3", "--finetune-lr", "0"], ["--finetune-lr"]),
    (["--method", "lnq", "--bits", "2", "--finetune-steps", "-1"], ["--finetune-steps"]),
    (["--method", "lnq", "--bits", "2", "--finetune-steps", "3", "--streamed"], ["--streamed"]),
    (["--method", "lnq", "--bits", "2", "--finetune-steps", "3", "--finetune-windows", "100000"],
     ["fewer than n*seq_len", "100000"]),
])
def test_bad_finetune_options_are_refused(tiny_lm_dir, corpus, cache, tmp_path, capsys, extra, needles):  # noqa: F811
    assert main(quantize_args(cache, tiny_lm_dir, corpus, tmp_path / "o", *extra)) != 0
    err = capsys.readouterr().err
    for needle in needles:
        assert needle in err, err
    assert not (tmp_path / "o").exists()


def test_finetune_in_bfloat16_lowers_the_kl_and_reports_its_dtype(tiny_lm):
    from gq_quantize.finetune import FinetuneConfig

    model = tiny_lm[0]
    torch.manual_seed(0)
    results = _lut_results(model)
    windows = torch.randint(0, model.config.vocab_size, (8, 16))
    tuned, _, stats = finetune_results(model, results, windows,
                                    FinetuneConfig(steps=40, lr=3e-3, batch=4, precision="bfloat16"), progress=False)
    assert stats["dtype"] == "bfloat16" and stats["windows"] == 8
    assert stats["kl_last10"] < 0.7 * stats["kl_first10"], stats
    assert all(r.codebook.dtype == torch.float16 for r in tuned.values())


@contextlib.contextmanager
def _killed_at_step(monkeypatch, step: int):
    """Within the block, the fine-tune's loss raises KeyboardInterrupt at step ``step`` (0-based)."""
    from gq_quantize import finetune

    real, calls = finetune.token_kl, []

    def kl(*args):
        calls.append(1)
        if len(calls) == step + 1:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(finetune, "token_kl", kl)
    try:
        yield
    finally:
        monkeypatch.setattr(finetune, "token_kl", real)


def test_a_killed_finetune_resumes_to_the_same_result(tiny_lm, tmp_path, monkeypatch):
    import shutil

    from gq_quantize import finetune

    model = tiny_lm[0]
    results = _lut_results(model)
    windows = torch.randint(0, model.config.vocab_size, (8, 16), generator=torch.Generator().manual_seed(0))
    cfg = finetune.FinetuneConfig(steps=7, lr=3e-3, norms=True, precision="float32")
    monkeypatch.setattr(finetune, "SAVE_EVERY", 2)
    want, want_gains, want_stats = finetune.finetune_results(model, results, windows, cfg, progress=False)

    state = tmp_path / "finetune_state.pt"
    with _killed_at_step(monkeypatch, 5), pytest.raises(KeyboardInterrupt):
        finetune.finetune_results(model, results, windows, cfg, progress=False, state_path=state)
    assert torch.load(state, weights_only=True)["step"] == 4 and not list(tmp_path.glob(".*tmp*"))

    other = tmp_path / "other.pt"   # a state of other settings is not used
    shutil.copy(state, other)
    assert "resumed_at" not in finetune.finetune_results(model, results, windows, cfg.model_copy(update={"lr": 1e-3}),
                                                         progress=False, state_path=other)[2]
    got, gains, stats = finetune.finetune_results(model, results, windows, cfg, progress=False, state_path=state)
    assert stats["resumed_at"] == 4
    assert all(torch.equal(got[n].codebook, want[n].codebook) for n in want)
    assert gains.keys() == want_gains.keys() and all(torch.equal(gains[n], want_gains[n]) for n in gains)
    assert (stats["kl_first10"], stats["kl_last10"]) == (want_stats["kl_first10"], want_stats["kl_last10"])


def test_gq_quantize_killed_in_the_finetune_resumes_it(tiny_lm_dir, corpus, cache, tmp_path, monkeypatch):  # noqa: F811
    from gq_quantize import finetune

    monkeypatch.setattr(finetune, "SAVE_EVERY", 2)
    out = tmp_path / "tuned"
    args = quantize_args(cache, tiny_lm_dir, corpus, out, "--method", "lnq", "--bits", "2", "--finetune-steps", "5")
    with _killed_at_step(monkeypatch, 3):
        assert main(args) == 130   # "interrupted; rerun the same command to resume"
    assert not out.exists()
    assert main(args) == 0
    manifest = json.loads((out / "gq_manifest.json").read_text())
    assert manifest["finetune"]["resumed_at"] == 2 and manifest["finetune"]["steps"] == 5
    assert not list(tmp_path.glob("*.partial*")) and not list(out.rglob("finetune_state.pt"))


def test_auto_precision_is_bfloat16_only_where_it_is_fast(monkeypatch):
    from gq_quantize import finetune

    cpu = torch.device("cpu")
    assert finetune.resolve_precision("float32", cpu) == torch.float32
    assert finetune.resolve_precision("bfloat16", cpu) == torch.bfloat16
    for fast, want in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(finetune, "bf16_is_fast", lambda device, fast=fast: fast)
        assert finetune.resolve_precision("auto", cpu) == want


def test_finetune_windows_draws_its_own_windows(tiny_lm_dir, corpus, cache, tmp_path):  # noqa: F811
    out = tmp_path / "tuned"
    assert main(quantize_args(cache, tiny_lm_dir, corpus, out, "--method", "lnq", "--bits", "2",
                              "--finetune-steps", "3", "--finetune-windows", "5", "--finetune-precision",
                              "float32")) == 0
    manifest = json.loads((out / "gq_manifest.json").read_text())
    assert manifest["finetune"]["windows"] == 5 and manifest["finetune"]["dtype"] == "float32"


def test_finetune_step_benchmark_writes_both_precisions(tiny_lm_dir, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "ft.json"
    subprocess.run([sys.executable, str(root / "benchmarks" / "finetune_step.py"), "--model", str(tiny_lm_dir),
                    "--steps", "1", "--seq-len", "16", "--out", str(out)], check=True, capture_output=True)
    data = json.loads(out.read_text())
    rows = {r["precision"]: r for r in data["rows"]}
    assert rows["float32"]["speedup_vs_float32"] == 1.0 and rows["bfloat16"]["dtype"] == "bfloat16"
    assert rows["bfloat16"]["seconds_per_step"] > 0
    # the same start: the first-step KLs differ only by bf16 rounding
    assert rows["bfloat16"]["kl_first"] == pytest.approx(rows["float32"]["kl_first"], rel=0.1)


def test_finetune_norms_tunes_every_gain_and_leaves_the_teacher(tiny_lm):
    from gq_quantize.finetune import FinetuneConfig, norm_weights

    model = tiny_lm[0]
    torch.manual_seed(0)
    results = _lut_results(model)
    before = {n: p.detach().clone() for n, p in norm_weights(model).items()}
    assert before and all(n.endswith("norm.weight") for n in before)  # input/post-attention layernorms, final norm
    windows = torch.randint(0, model.config.vocab_size, (8, 16))
    _, gains, stats = finetune_results(model, results, windows,
                                       FinetuneConfig(steps=10, lr=3e-3, batch=4, norms=True), progress=False)
    assert set(gains) == set(before) and stats["norms"] == len(before)
    assert all(not torch.equal(gains[n], before[n]) for n in before)
    assert all(torch.equal(p, before[n]) for n, p in norm_weights(model).items())


def test_gq_quantize_finetune_norms_writes_the_gains(tiny_lm_dir, corpus, cache, tmp_path):  # noqa: F811
    from safetensors.torch import load_file

    out = tmp_path / "tuned"
    assert main(quantize_args(cache, tiny_lm_dir, corpus, out, "--method", "lnq", "--bits", "2",
                              "--finetune-steps", "4", "--finetune-lr", "1e-2", "--finetune-norms")) == 0
    src = {k: v for f in tiny_lm_dir.glob("*.safetensors") for k, v in load_file(f).items()}
    got = {k: v for f in out.glob("*.safetensors") for k, v in load_file(f).items()}
    norms = [k for k in src if k.endswith("norm.weight")]
    assert norms and all(got[k].dtype == src[k].dtype and not torch.equal(got[k], src[k]) for k in norms)
    assert torch.equal(got["model.embed_tokens.weight"], src["model.embed_tokens.weight"])
    model = load_quantized_model(out)
    assert torch.equal(model.model.norm.weight.detach().to(src["model.norm.weight"].dtype), got["model.norm.weight"])
