"""The computed memory needs of `gq quantize` (quantize/memory.py) and `--dry-run` /
`--max-device-memory` on the command line."""
from __future__ import annotations

import pytest

from gq_quantize import memory
from gq_serve import plan
from gq_serve.cli import main


def test_parameter_counts_add_up_to_gq_plans():
    for m in list(plan.BUNDLED_MODELS.values()) + list(memory.LARGE_MODELS.values()):
        total = memory.layer_params(m) * m.num_hidden_layers + memory.head_params(m)
        assert total == plan.parameter_count(m), m.name


def test_hessian_accumulators_are_what_the_pass_holds(tiny_lm_dir):
    """The plain + guided Hessians of one tiny layer, counted from the tensors the pass makes."""
    import torch
    from transformers import AutoModelForCausalLM

    from gq_quantize.calibration.hessians import capture_layer_calls, run_layer

    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir, dtype=torch.float32).eval()
    windows = torch.randint(0, model.config.vocab_size, (1, 8))
    first, calls = capture_layer_calls(model, windows, "cpu")
    sal = {f"model.layers.0.{n}": torch.ones(8, 2) for n, m in model.model.layers[0].named_modules()
           if isinstance(m, torch.nn.Linear)}
    hess, _ = run_layer(model.model.layers[0], "model.layers.0", first, calls[0], sal, "cpu")
    held = sum(t.numel() * 4 for t in [*hess.plain.values(), *hess.guided.values()])
    shape = memory.model_shape(str(tiny_lm_dir))
    assert held == memory.hessian_bytes(shape, memory.Settings(1, 8, groups=2, guided=True))


def test_streaming_fits_a_13b_model_on_a_24_gib_card_and_in_memory_does_not():
    m = memory.model_shape("llama-2-13b")
    s = memory.Settings(n_samples=128, seq_len=2048, groups=4, guided=True)
    p = memory.needs(m, s)
    assert memory.peak(p, "in_memory") > 24 * memory.GIB >= memory.peak(p, "streamed")
    assert memory.choose_mode(p, 24 * memory.GIB) == "streamed"
    assert memory.choose_mode(p, None) == "in_memory"
    with pytest.raises(ValueError, match="--max-device-memory 2.0 GiB"):
        memory.choose_mode(p, 2 * memory.GIB)


def test_offloading_moves_the_layer_inputs_off_the_host():
    m = memory.model_shape("llama-2-7b")
    base = memory.Settings(n_samples=32, seq_len=1024, groups=4, guided=True)
    host = memory.needs(m, base)["gradients"]["streamed"]["host"]
    off = memory.needs(m, memory.Settings(**{**base.__dict__, "offload": True}))["gradients"]["streamed"]["host"]
    assert off < host / 5


def test_dry_run_prints_each_pass_and_the_mode(capsys):
    rc = main(["quantize", "llama-2-70b", "--method", "gptq", "--guided", "--groups", "4", "--bits", "3",
               "--n-samples", "128", "--seq-len", "2048", "--dry-run", "--max-device-memory", "24"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "Llama-2-70B" in out and "computed" in out
    for word in ("gradients", "hessians", "quantize", "with --max-device-memory 24.0 GiB: streamed"):
        assert word in out


def test_quantize_without_out_or_with_a_bad_budget_is_refused(capsys, tiny_lm_dir):
    assert main(["quantize", str(tiny_lm_dir), "--method", "rtn", "--bits", "4"]) == 2
    assert "--out is required" in capsys.readouterr().err
    assert main(["quantize", str(tiny_lm_dir), "--method", "rtn", "--bits", "4", "--out", "x",
                 "--max-device-memory", "0"]) == 2
    assert "--max-device-memory must be a positive" in capsys.readouterr().err


def test_max_device_memory_streams_when_in_memory_would_not_fit(capsys, tiny_lm_dir, tmp_path):
    import random

    from conftest import _TINY_WORDS

    rng = random.Random(0)
    corpus = tmp_path / "text.txt"
    corpus.write_text("\n\n".join(" ".join(rng.choices(_TINY_WORDS, k=200)) for _ in range(4)))
    shape = memory.model_shape(str(tiny_lm_dir))
    p = memory.needs(shape, memory.Settings(n_samples=4, seq_len=16, groups=2, guided=True))
    between = (memory.peak(p, "in_memory") + memory.peak(p, "streamed")) / 2 / memory.GIB
    args = ["--cache", str(tmp_path / "c"), "quantize", str(tiny_lm_dir), "--method", "gptq", "--guided", "--groups",
            "2", "--bits", "3", "--n-samples", "4", "--seq-len", "16", "--calib", str(corpus), "--quiet"]
    assert main([*args, "--out", str(tmp_path / "q"), "--max-device-memory", f"{between:.9f}"]) == 0
    assert "streamed (one decoder layer at a time)" in capsys.readouterr().err
    assert (tmp_path / "q" / "config.json").is_file()
    tiny = memory.peak(p, "streamed") / 2 / memory.GIB
    assert main([*args, "--out", str(tmp_path / "r"), "--max-device-memory", f"{tiny:.9f}"]) == 2
    assert "even streamed" in capsys.readouterr().err and not (tmp_path / "r").exists()
