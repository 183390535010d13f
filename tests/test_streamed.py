"""Models larger than memory (quantize/calibration/streamed.py): the layer-streamed gradient pass,
streamed Hessians and quantization, their resumption after a kill, on a tiny random Llama."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from gq_quantize import pipeline
from gq_quantize.calibration import CalibrationCache
from gq_quantize.calibration.saliency import saliency_for_windows
from gq_quantize.calibration.streamed import StreamedModel, StreamingError, streamed_saliency
from gq_quantize.config import CalibrationConfig, QuantizeConfig
from gq_serve.checkpoint import load_quantized_model

from conftest import write_tiny_corpus

N, SEQ = 4, 16


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_tiny_corpus(tmp_path_factory.mktemp("corpus") / "text.txt", seed=1)


def in_memory(model_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def random_windows(vocab: int, n: int = 3, seq: int = SEQ) -> torch.Tensor:
    return torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(0))


def assert_close(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6 * float(a[k].abs().max()), msg=k)


# ---------------------------------------------------------------- the skeleton
def test_streamed_model_holds_no_weights_outside_a_resident_block(tiny_lm_dir):
    sm = StreamedModel(tiny_lm_dir)
    assert all(p.device.type == "meta" for p in sm.model.parameters())
    with sm.layer(1):
        real = {n for n, p in sm.model.named_parameters() if p.device.type != "meta"}
        assert real and all(n.startswith("model.layers.1.") for n in real)
        ref = in_memory(tiny_lm_dir).model.layers[1].mlp.up_proj.weight
        assert torch.equal(sm.model.model.layers[1].mlp.up_proj.weight, ref)
    assert all(p.device.type == "meta" for p in sm.model.parameters())
    with sm.embeddings():
        real = {n for n, p in sm.model.named_parameters() if p.device.type != "meta"}
        assert "model.embed_tokens.weight" in real and not any(".layers." in n for n in real)


def test_a_checkpoint_with_other_tensor_names_is_refused_with_the_fix(tiny_lm_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    d = tmp_path / "renamed"
    d.mkdir()
    (d / "config.json").write_bytes((tiny_lm_dir / "config.json").read_bytes())
    tensors = load_file(tiny_lm_dir / "model.safetensors")
    tensors = {k.replace("model.", "transformer.", 1): v for k, v in tensors.items()}
    save_file(tensors, str(d / "model.safetensors"))
    with pytest.raises(StreamingError, match="save_pretrained"):
        StreamedModel(d)


# ---------------------------------------------------------------- the gradient pass
@pytest.mark.parametrize("offload", [False, True])
def test_streamed_saliency_and_fisher_equal_the_in_memory_pass(tiny_lm_dir, tmp_path, offload):
    model = in_memory(tiny_lm_dir)
    windows = random_windows(model.config.vocab_size)
    ref_s, ref_f = saliency_for_windows(model, windows, groups=2, need_fisher=True)
    offload_dir = tmp_path / "acts" if offload else None
    got_s, got_f = streamed_saliency(StreamedModel(tiny_lm_dir), windows, 2, True, offload_dir=offload_dir)
    assert_close(ref_s, got_s)
    assert_close(ref_f, got_f)
    if offload:  # every layer's inputs were written there, and read back and removed
        assert offload_dir.is_dir() and not list(offload_dir.iterdir())


def test_streamed_saliency_of_a_model_with_tied_embeddings(tiny_lm_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = json.loads((tiny_lm_dir / "config.json").read_text())
    cfg["tie_word_embeddings"] = True
    d = tmp_path / "tied"
    torch.manual_seed(1)
    from transformers import LlamaConfig

    AutoModelForCausalLM.from_config(LlamaConfig(**{k: v for k, v in cfg.items() if k != "architectures"},
                                                 architectures=["LlamaForCausalLM"])).save_pretrained(d)
    windows = random_windows(cfg["vocab_size"])
    ref, _ = saliency_for_windows(in_memory(d), windows, groups=1, need_fisher=False)
    got, none = streamed_saliency(StreamedModel(d), windows, 1, False)
    assert none is None
    assert_close(ref, got)


@pytest.mark.model
def test_streamed_saliency_on_smollm2(smollm2_dir):
    model = in_memory(smollm2_dir)
    windows = random_windows(model.config.vocab_size, n=2, seq=32)
    ref, _ = saliency_for_windows(model, windows, groups=4, need_fisher=False)
    del model
    got, _ = streamed_saliency(StreamedModel(smollm2_dir), windows, 4, False)
    assert_close(ref, got)


# ---------------------------------------------------------------- the cache and quantization
def qconfig(corpus: Path, **kw) -> QuantizeConfig:
    return QuantizeConfig(calibration=CalibrationConfig(data=str(corpus), n_samples=N, seq_len=SEQ), **kw)


def build_cache(model_dir: Path, corpus: Path, root: Path, streamed: bool, device: str = "cpu",
                **kw) -> CalibrationCache:
    from transformers import AutoTokenizer

    from gq_quantize.data import calibration_windows

    windows = calibration_windows(AutoTokenizer.from_pretrained(model_dir), str(corpus), N, SEQ, 0, root)
    sm = StreamedModel(model_dir, device=device) if streamed else None
    model = sm.model if streamed else in_memory(model_dir)
    return CalibrationCache.open_or_build(root, model, model_dir, windows, groups=2, need_guided=True,
                                          need_fisher=True, progress=False, chunk_windows=2, streamed=sm,
                                          device=device, **kw)


def test_streamed_cache_is_the_in_memory_cache(tiny_lm_dir, corpus, tmp_path):
    a = build_cache(tiny_lm_dir, corpus, tmp_path / "a", streamed=False)
    b = build_cache(tiny_lm_dir, corpus, tmp_path / "b", streamed=True, offload_dir=tmp_path / "off")
    assert a.manifest["model_hash"] == b.manifest["model_hash"]  # one cache serves both modes
    for name in a.manifest["linears"]:
        torch.testing.assert_close(a.hessian(name, guided=True, groups=2), b.hessian(name, guided=True, groups=2),
                                   rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(a.hessian(name, guided=False), b.hessian(name, guided=False), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(a.weight_fisher(name), b.weight_fisher(name), rtol=1e-5, atol=1e-9)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_streamed_cache_on_cuda_is_the_cpu_cache(tiny_lm_dir, corpus, tmp_path):
    # The 24 GB-card case: one layer on the GPU at a time, the rest on the host; same results.
    cpu = build_cache(tiny_lm_dir, corpus, tmp_path / "cpu", streamed=False)
    gpu = build_cache(tiny_lm_dir, corpus, tmp_path / "gpu", streamed=True, device="cuda",
                      offload_dir=tmp_path / "off")
    for name in cpu.manifest["linears"]:
        for a, b in ((cpu.hessian(name, guided=True, groups=2), gpu.hessian(name, guided=True, groups=2)),
                     (cpu.hessian(name, guided=False), gpu.hessian(name, guided=False)),
                     (cpu.weight_fisher(name), gpu.weight_fisher(name))):
            torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-4 * float(a.abs().max()), msg=name)


def dequantized(ckpt: Path) -> dict[str, torch.Tensor]:
    from gq_serve.quant_linear import GQLinear

    model = load_quantized_model(ckpt)
    return {n: m.dequantize() for n, m in model.named_modules() if isinstance(m, GQLinear)}


@pytest.mark.parametrize("sequential", [False, True])
def test_streamed_quantization_writes_the_in_memory_checkpoint(tiny_lm_dir, corpus, tmp_path, sequential):
    cfg = qconfig(corpus, method="gptq", bits=3, guided=True, groups=2, sequential=sequential)
    pipeline.quantize_model(tiny_lm_dir, cfg, tmp_path / "mem", tmp_path / "cache", progress=False)
    pipeline.quantize_model(tiny_lm_dir, cfg, tmp_path / "str", tmp_path / "cache2", progress=False, streamed=True)
    a, b = dequantized(tmp_path / "mem"), dequantized(tmp_path / "str")
    assert len(a) == 14 and list(a) == list(b)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-5, msg=name)


# ---------------------------------------------------------------- killed and resumed
_KILLER = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    from gq_quantize import pipeline
    from gq_quantize.config import CalibrationConfig, QuantizeConfig

    saves = []
    real = pipeline._save_result
    def dying(*args, **kwargs):
        real(*args, **kwargs)
        saves.append(1)
        if len(saves) == {after}:
            os.kill(os.getpid(), signal.SIGKILL)  # as the OOM killer or a lost machine would
    pipeline._save_result = dying
    cfg = QuantizeConfig.model_validate_json({cfg!r})
    pipeline.quantize_model(Path({model!r}), cfg, Path({out!r}), Path({cache!r}), progress=False, streamed=True)
""")


def test_a_killed_streamed_run_resumes_at_the_layer_it_reached(tiny_lm_dir, corpus, tmp_path):
    cfg = qconfig(corpus, method="gptq", bits=3, guided=True, groups=2, sequential=True)
    pipeline.quantize_model(tiny_lm_dir, cfg, tmp_path / "whole", tmp_path / "cache", progress=False, streamed=True)
    script = _KILLER.format(tests=str(Path(__file__).parent), after=9, cfg=cfg.model_dump_json(),
                            model=str(tiny_lm_dir), out=str(tmp_path / "resumed"), cache=str(tmp_path / "cache"))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == -9, proc.stderr[-2000:]
    partial = list(tmp_path.glob(".resumed.partial-*"))
    assert len(partial) == 1 and json.loads((partial[0] / "sequential.json").read_text()) == {"next_layer": 1}
    summary = pipeline.quantize_model(tiny_lm_dir, cfg, tmp_path / "resumed", tmp_path / "cache", progress=False,
                                      streamed=True)
    assert summary["layers_resumed"] == 9  # layer 0 (7 linears) and layer 1's q/k/v... saved before the kill
    a, b = dequantized(tmp_path / "whole"), dequantized(tmp_path / "resumed")
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_a_killed_streamed_calibration_resumes_at_the_next_layer(tiny_lm_dir, corpus, tmp_path):
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from pathlib import Path
        from test_streamed import build_cache
        def on_event(stage, idx):
            if stage == "hessians" and idx == 0:
                os.kill(os.getpid(), signal.SIGKILL)
        build_cache(Path({str(tiny_lm_dir)!r}), Path({str(corpus)!r}), Path({str(tmp_path / 'c')!r}), True,
                    on_event=on_event)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == -9, proc.stderr[-2000:]
    manifest = json.loads(next((tmp_path / "c" / "calibration").glob("*/manifest.json")).read_text())
    assert manifest["saliency"]["complete"] and manifest["hessians"]["layers_done"] == [0]
    events = []
    resumed = build_cache(tiny_lm_dir, corpus, tmp_path / "c", True, on_event=lambda s, i: events.append((s, i)))
    assert events == [("hessians", 1)]  # only the layer the kill left undone
    whole = build_cache(tiny_lm_dir, corpus, tmp_path / "w", True)
    for name in whole.manifest["linears"]:
        assert torch.equal(whole.hessian(name, guided=True, groups=2), resumed.hessian(name, guided=True, groups=2))


def test_a_killed_streamed_gradient_pass_resumes_at_the_layer_it_reached(tiny_lm_dir, corpus, tmp_path):
    """With --offload-dir the gradient pass keeps its state on disk: killed in the backward of layer
    0, it recomputes only that layer (the forward and layer 1's backward are not redone)."""
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from pathlib import Path
        from gq_quantize.calibration import streamed
        from test_streamed import build_cache
        calls = []
        real = streamed.layer_backward
        def dying(*args, **kwargs):
            calls.append(1)
            if len(calls) == 2:  # the first chunk's layer 0; layer 1 is done
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*args, **kwargs)
        streamed.layer_backward = dying
        build_cache(Path({str(tiny_lm_dir)!r}), Path({str(corpus)!r}), Path({str(tmp_path / 'c')!r}), True,
                    offload_dir=Path({str(tmp_path / 'off')!r}))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == -9, proc.stderr[-2000:]
    (state,) = (tmp_path / "off").glob("*/windows_0000_0002/state.json")
    assert {k: v for k, v in json.loads(state.read_text()).items() if k != "ident"} == {"phase": "backward", "next": 0}
    from gq_quantize.calibration import streamed

    counted = []
    real_backward, real_outputs = streamed.layer_backward, streamed.layer_outputs
    streamed.layer_backward = lambda *a, **k: (counted.append("backward"), real_backward(*a, **k))[1]
    streamed.layer_outputs = lambda *a, **k: (counted.append("forward"), real_outputs(*a, **k))[1]
    try:
        resumed = build_cache(tiny_lm_dir, corpus, tmp_path / "c", True, offload_dir=tmp_path / "off")
    finally:
        streamed.layer_backward, streamed.layer_outputs = real_backward, real_outputs
    # The killed chunk: layer 0's backward only; the second chunk: 2 forwards, 2 backwards.
    assert counted == ["backward", "forward", "forward", "backward", "backward"]
    assert not list((tmp_path / "off").glob("*/windows_*"))  # work files gone once stored
    ref = build_cache(tiny_lm_dir, corpus, tmp_path / "ref", False)
    for name in ref.manifest["linears"]:
        torch.testing.assert_close(ref.saliency(name), resumed.saliency(name), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ref.weight_fisher(name), resumed.weight_fisher(name), rtol=1e-5, atol=1e-9)
