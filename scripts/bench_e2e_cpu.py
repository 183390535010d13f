"""Embedded-engine decode speed on the CPU: SmolLM2 fp16 vs its LNQ+GuidedQuant checkpoints.

    python scripts/bench_e2e_cpu.py [--threads 2]      -> rows appended to docs/results/e2e.json

Paper protocol (Table 2): batch 1, a short prompt, exactly 100 new tokens (EOS ignored), median of
3 runs after a warm-up, every model measured in this one process. On the CPU a quantized linear
dequantizes once and runs a dense fp32 matmul (the reference path), so the ratio shows the
engine's overhead for the quantized modules, not a kernel speedup. The checkpoints are those of
scripts/reproduce_quality.py.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent

from gq_serve.bench import bench_offline  # noqa: E402
from gq_serve.checkpoint import load_model, load_tokenizer  # noqa: E402
from gq_serve.util import cache_root  # noqa: E402
from results_io import provenance, write_json  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4])
    p.add_argument("--out", default=str(ROOT / "docs/results/e2e.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cache = cache_root()
    paths = {"fp16": cache / "models" / "SmolLM2-135M-Instruct"}
    for b in args.bits:
        paths[f"lut{b}"] = cache / "results" / "checkpoints" / f"lnq+gq4-{b}bit"
    missing = [str(v) for v in paths.values() if not v.is_dir()]
    if missing:
        raise SystemExit(f"missing {missing}: run `gq prepare` and scripts/reproduce_quality.py first")
    models = {k: (load_model(str(v), "cpu", torch.float32), load_tokenizer(str(v))) for k, v in paths.items()}
    rows = bench_offline(models, new_tokens=100, runs=3)
    fp16 = rows[0]["tok_per_s"]
    out_rows = []
    for r in rows:
        out_rows.append({
            "device": f"CPU ({platform.machine()}, {args.threads} threads)", "engine": "hf",
            "model": "SmolLM2-135M-Instruct", "format": "fp16" if r["label"] == "fp16" else "lut",
            "bits": 16 if r["label"] == "fp16" else int(r["label"][3:]), "batch": 1, "new_tokens": 100,
            "tok_s": round(r["tok_per_s"], 1), "fp16_tok_s": round(fp16, 1),
            "ratio": round(r["tok_per_s"] / fp16, 3), "compute_dtype": "float32", **provenance(),
        })
    out = Path(args.out)
    old = json.loads(out.read_text()) if out.exists() else []
    keep = [r for r in old if not (r["engine"] == "hf" and r["device"].startswith("CPU"))]
    write_json(out, keep + out_rows)
    print(json.dumps(out_rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
