"""Reproduce docs/results/quality.json: SmolLM2-135M at 2/3/4 bits, every method, two eval texts.

    python scripts/reproduce_quality.py [--bits 2 3 4] [--out docs/results/quality.json]

Each row is computed by the public commands' functions (quantize_model -> checkpoint on disk ->
load_quantized_model -> perplexity), so the table measures what users get. Rows already in the
output file with the same settings are kept (the script resumes), and every row is written as soon
as it is measured. The calibration cache is shared by all methods.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent

from gq_serve.checkpoint import load_quantized_model  # noqa: E402
from gq_serve.evaluate import perplexity  # noqa: E402
from gq_serve.util import cache_root  # noqa: E402
from gq_quantize.config import CalibrationConfig, QuantizeConfig  # noqa: E402
from gq_quantize.data import eval_windows  # noqa: E402
from gq_quantize.pipeline import quantize_model  # noqa: E402
from results_io import provenance, write_json  # noqa: E402

MODEL = "SmolLM2-135M-Instruct"
# (method, guided, groups) in table order; a fourth entry: method options that differ from the defaults
# (stored in the row as "options" and part of its key), with the label suffix --methods selects it by.
METHODS = [("rtn", False, 1), ("gptq", False, 1), ("squeezellm", False, 1), ("lnq", False, 1),
           ("lnq", True, 1), ("lnq", True, 4),
           ("qtip", False, 1), ("qtip", True, 1), ("qtip", True, 4),
           # QTIP + GQ as GuidedQuant's code pairs it: one output transform, group k of rotated rows
           ("qtip", True, 4, {"qtip_group_rht": False}, "-onerht"),
           # QTIP + GQ with the guided Hessians pulled halfway toward the plain one (--guided-shrink)
           ("qtip", True, 4, {"guided_shrink": 0.5}, "-shrink0.5")]


def row_key(row: dict) -> tuple:
    return (row["method"], row["guided"], row["groups"], row["bits"], row["eval_data"], row["ctx"],
            row["calib"], json.dumps(row.get("options") or {}, sort_keys=True))


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4])
    p.add_argument("--methods", nargs="+", help="subset, e.g. rtn gptq lnq lnq+gq1 lnq+gq4 squeezellm qtip qtip+gq4 "
                   "qtip+gq4-onerht")
    p.add_argument("--calib", default="sotu:calib")
    p.add_argument("--n-samples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--eval-data", nargs="+", default=["sotu:heldout", "brown:heldout"])
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--max-tokens", type=int, default=8192)
    p.add_argument("--out", default=str(ROOT / "docs/results/quality.json"))
    p.add_argument("--keep-checkpoints", action="store_true",
                   help="keep each checkpoint under $GQ_CACHE/results/checkpoints/<label>-<bits>bit (default: "
                   "deleted once evaluated)")
    args = p.parse_args()

    torch.manual_seed(0)
    cache = cache_root()
    model_dir = cache / "models" / MODEL
    ckpt_root = cache / "results" / "checkpoints"
    out = Path(args.out)
    rows: list[dict] = json.loads(out.read_text()) if out.exists() else []
    done = {row_key(r) for r in rows}
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    windows = {d: eval_windows(tokenizer, d, args.ctx, args.max_tokens, cache) for d in args.eval_data}
    meta = provenance()

    def save() -> None:
        write_json(out, rows)

    def evaluate(model, base: dict, timings: dict | None) -> None:
        for d, w in windows.items():
            row = {**base, "eval_data": d, "ctx": args.ctx}
            if row_key(row) in done:
                continue
            res = perplexity(model, w, batch_size=4, progress=False)
            row.update(ppl=round(res["ppl"], 4), eval_tokens=res["tokens"], eval_seconds=round(res["seconds"], 1),
                       quantize_timings_s=timings, **meta)
            rows.append(row)
            done.add(row_key(row))
            save()
            print(json.dumps(row), flush=True)

    base = {"model": MODEL, "method": "fp16", "guided": False, "groups": 0, "bits": 16, "calib": args.calib}
    if any(row_key({**base, "eval_data": d, "ctx": args.ctx}) not in done for d in args.eval_data):
        evaluate(load_quantized_model(model_dir, dtype=torch.float32), base, None)

    for bits in args.bits:
        for method, guided, groups, *extra in METHODS:
            options, suffix = (extra[0], extra[1]) if extra else ({}, "")
            label = method + (f"+gq{groups}" if guided else "") + suffix
            if args.methods and label not in args.methods:
                continue
            base = {"model": MODEL, "method": method, "guided": guided, "groups": groups, "bits": bits,
                    "calib": args.calib}
            if options:
                base["options"] = options
            if all(row_key({**base, "eval_data": d, "ctx": args.ctx}) in done for d in args.eval_data):
                continue
            qconfig = QuantizeConfig(method=method, bits=bits, guided=guided, groups=groups,
                                     calibration=CalibrationConfig(data=args.calib, n_samples=args.n_samples,
                                                                   seq_len=args.seq_len), **options)
            ckpt = ckpt_root / f"{label}-{bits}bit"
            summary = quantize_model(model_dir, qconfig, ckpt, cache, overwrite=True)
            evaluate(load_quantized_model(ckpt, dtype=torch.float32), base, summary["timings_s"])
            if not args.keep_checkpoints:
                shutil.rmtree(ckpt)
    return 0


if __name__ == "__main__":
    sys.exit(main())
