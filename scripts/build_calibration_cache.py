"""Build (or complete) the calibration cache that every quantization of a model reuses.

    python scripts/build_calibration_cache.py [--model smollm2] [--calib sotu:calib] [--n-samples 32]
        [--seq-len 512] [--groups 4]

`gq quantize` builds the same cache on demand; running this first lets several methods and
bit-widths (scripts/reproduce_quality.py) start from a finished cache.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from gq_serve.cli import resolve_model_path
from gq_serve.util import cache_root
from gq_quantize.calibration import CalibrationCache
from gq_quantize.data import calibration_windows


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2")
    p.add_argument("--calib", default="sotu:calib")
    p.add_argument("--n-samples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--groups", type=int, default=4)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    cache = cache_root()
    model_dir = resolve_model_path(args.model, cache)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(args.device).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    windows = calibration_windows(tokenizer, args.calib, args.n_samples, args.seq_len, args.seed, cache)
    t0 = time.perf_counter()
    cc = CalibrationCache.open_or_build(cache, model, model_dir, windows, groups=args.groups,
                                        need_guided=True, need_fisher=True, device=args.device)
    print(json.dumps({"seconds": round(time.perf_counter() - t0, 1), "manifest_keys": sorted(cc.manifest)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
