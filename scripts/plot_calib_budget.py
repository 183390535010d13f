"""Calibration budget curve: validation perplexity and cost against calibration tokens.

    python scripts/quality_variants.py --model smollm2 --bits 3 --variants fp16 lnq-gq4-seq --val \\
        --calib sotu:train --n-samples N --seq-len L          # once per (N, L) of the grid
    python scripts/plot_calib_budget.py                      # -> docs/results/calib_budget.png

Reads the sotu:val rows of docs/results/quality_variants.json (calibrated on sotu:train, never on
held-out text) and plots, per window length, perplexity and wall time against windows x length.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def curve_rows(rows: list[dict], model: str, variant: str, bits: int) -> list[dict]:
    return sorted((r for r in rows if r["model"] == model and r["variant"] == variant and r["bits"] == bits
                   and r["eval_data"] == "sotu:val" and r["eval_protocol"] == "last32x512"
                   and r["calib"] == "sotu:train"),
                  key=lambda r: (r["seq_len"], r["n_samples"]))


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="SmolLM2-135M-Instruct")
    p.add_argument("--variant", default="lnq-gq4")
    p.add_argument("--bits", type=int, default=3)
    p.add_argument("--out", default=str(ROOT / "docs/results/calib_budget.png"))
    args = p.parse_args()
    rows = json.loads((ROOT / "docs/results/quality_variants.json").read_text())
    sel = curve_rows(rows, args.model, args.variant, args.bits)
    if not sel:
        print("no sotu:val rows calibrated on sotu:train yet; run scripts/quality_variants.py --val first",
              file=sys.stderr)
        return 1
    fp16 = next((r["ppl"] for r in rows if r["model"] == args.model and r["variant"] == "fp16"
                 and r["eval_data"] == "sotu:val" and r["eval_protocol"] == "last32x512"), None)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for seq in sorted({r["seq_len"] for r in sel}):
        pts = [r for r in sel if r["seq_len"] == seq]
        tokens = [r["n_samples"] * r["seq_len"] for r in pts]
        a.plot(tokens, [r["ppl"] for r in pts], "o-", label=f"windows of {seq} tokens")
        b.plot(tokens, [r.get("quantize_wall_s") or float("nan") for r in pts], "o-", label=f"windows of {seq} tokens")
    if fp16:
        a.axhline(fp16, color="gray", ls="--", label="fp16 (dequantized GGUF)")
    for ax, label in ((a, "perplexity on sotu:val (ctx 512)"), (b, "calibration + quantization (s)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("calibration tokens (windows x length)")
        ax.set_ylabel(label)
        ax.legend()
    fig.suptitle(f"{args.model}, {args.variant}, {args.bits}-bit: calibration budget")
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
