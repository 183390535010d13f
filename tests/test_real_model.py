"""The main job on the real SmolLM2-135M (prepared by `gq prepare`): quantize, load, evaluate, generate.

Small calibration (4 x 256 tokens) so CI's 2 cores finish in minutes; the full-size numbers are
in docs/results.md (scripts/reproduce_quality.py).
"""
from __future__ import annotations

import json

import pytest
import torch

from gq_serve.checkpoint import load_quantized_model
from gq_serve.cli import main
from gq_serve.evaluate import perplexity
from gq_quantize.data import eval_windows

pytestmark = [pytest.mark.model, pytest.mark.slow]


def test_lnq_guided_4bit_on_smollm2(smollm2_dir, smollm2_tokenizer, gq_cache, tmp_path, capsys):
    out = tmp_path / "smollm2-lnq-gq4-4bit"
    assert main(["--cache", str(gq_cache), "quantize", str(smollm2_dir), "--method", "lnq", "--guided",
                 "--groups", "4", "--bits", "4", "--calib", "sotu:calib", "--n-samples", "4",
                 "--seq-len", "256", "--out", str(out), "--quiet"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["layers"] == 210

    windows = eval_windows(smollm2_tokenizer, "sotu:heldout", 256, 2048, gq_cache)
    fp16 = perplexity(load_quantized_model(smollm2_dir), windows, progress=False)["ppl"]
    model = load_quantized_model(out)
    quant = perplexity(model, windows, progress=False)["ppl"]
    # 4-bit per-channel LNQ+GQ must stay close to fp16 (full-size numbers: docs/results.md).
    assert fp16 < quant < 1.5 * fp16, (fp16, quant)

    # The quantized model generates through transformers' own generate (its answer's quality is the
    # perplexity's business: a 135M model at 4 bits may well get facts wrong).
    prompt = smollm2_tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True,
        return_tensors="pt", return_dict=True)
    with torch.inference_mode():
        ids = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    answer = smollm2_tokenizer.decode(ids[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert answer.strip(), ids
