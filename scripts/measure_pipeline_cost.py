"""Wall time of each stage of the SmolLM2 pipeline on this machine -> docs/results/pipeline_cost.json.

    python scripts/measure_pipeline_cost.py [--n-samples 32] [--seq-len 512]

Stages measured here, from nothing, in a fresh temporary cache: `gq prepare` (download + GGUF
conversion + corpora), the calibration passes (gradient saliency + weight Fisher, then the
layer-by-layer Hessians, g=4), and one perplexity evaluation. The quantization time of every
method and bit-width is taken from docs/results/quality.json (scripts/reproduce_quality.py
records it per checkpoint), so it is not measured twice.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent

from gq_serve.checkpoint import load_quantized_model  # noqa: E402
from gq_serve.evaluate import perplexity  # noqa: E402
from gq_quantize.assets import prepare_assets  # noqa: E402
from gq_quantize.calibration import CalibrationCache  # noqa: E402
from gq_quantize.data import calibration_windows, eval_windows  # noqa: E402
from results_io import provenance, write_json  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--n-samples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--groups", type=int, default=4)
    p.add_argument("--out", default=str(ROOT / "docs/results/pipeline_cost.json"))
    args = p.parse_args()
    meta = provenance()
    rows = []
    cache = Path(tempfile.mkdtemp(prefix="gq-cost-"))
    try:
        t0 = time.perf_counter()
        prepare_assets(cache)
        rows.append({"stage": "prepare (model + sotu + brown, from nothing)", "seconds": time.perf_counter() - t0})

        from transformers import AutoModelForCausalLM, AutoTokenizer

        model_dir = cache / "models" / "SmolLM2-135M-Instruct"
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        windows = calibration_windows(tokenizer, "sotu:calib", args.n_samples, args.seq_len, 0, cache)
        marks: dict[str, float] = {}

        def on_event(stage: str, idx: int) -> None:
            marks[stage] = time.perf_counter()

        t0 = time.perf_counter()
        CalibrationCache.open_or_build(cache, model, model_dir, windows, groups=args.groups, need_guided=True,
                                       need_fisher=True, progress=False, on_event=on_event)
        t1 = time.perf_counter()
        detail = f"{args.n_samples} x {args.seq_len} tokens, g={args.groups}"
        rows.append({"stage": "calibration: gradient saliency + weight Fisher", "detail": detail,
                     "seconds": marks["saliency"] - t0})
        rows.append({"stage": "calibration: Hessians (plain + guided), layer by layer", "detail": detail,
                     "seconds": t1 - marks["saliency"]})

        ev = eval_windows(tokenizer, "sotu:heldout", 512, 8192, cache)
        t0 = time.perf_counter()
        perplexity(load_quantized_model(model_dir), ev, progress=False)
        rows.append({"stage": "eval: perplexity, 8192 tokens at ctx 512 (fp32)", "seconds": time.perf_counter() - t0})
    finally:
        shutil.rmtree(cache, ignore_errors=True)

    quality = ROOT / "docs/results/quality.json"
    if quality.exists():
        seen = set()
        for r in json.loads(quality.read_text()):
            t = r.get("quantize_timings_s")
            key = (r["method"], r["guided"], r["groups"], r["bits"])
            if not t or key in seen:
                continue
            seen.add(key)
            label = r["method"] + (f"+GQ g={r['groups']}" if r["guided"] else "")
            rows.append({"stage": f"quantize 210 layers: {label} {r['bits']}-bit", "seconds": t["quantize_s"],
                         "export_seconds": t["export_s"], "source": f"quality.json ({r['date']})"})
    for r in rows:
        r["seconds"] = round(r["seconds"], 1)
        r.setdefault("source", "measured by this script")
        r.update(meta)
    write_json(Path(args.out), rows)
    print(json.dumps(rows[:4], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
