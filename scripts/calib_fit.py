"""Do quantized checkpoints fit their calibration windows rather than their calibration corpus?

    python scripts/calib_fit.py fp16=MODEL_DIR qtip=CKPT qtip+gq4=CKPT --calib sotu:calib \
        --n-samples 32 --seq-len 512 --out docs/results/calib_fit.json

For every checkpoint: perplexity on the exact calibration windows its Hessians (and GuidedQuant's
saliency) were taken from, and on as many other windows of the same corpus (the next seed; a few
may overlap). A layer-wise objective that models the calibration loss well lowers the first; if a
method wins on the first and loses on the second, it fits the windows, not the text. Evaluation
text is never read here.

``--saliency-groups G`` also reports how many tokens GuidedQuant's weighted Hessians effectively
average: per linear and group k, the effective sample size (sum_t s_tk)^2 / sum_t s_tk^2 of the cached
saliency s as a fraction of the N tokens (the plain Hessian weights all N equally), and the share of
s_k on the windows' first tokens; read from the calibration cache of the first model (the
unquantized one; it must already be built).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from transformers import AutoTokenizer

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from results_io import provenance, write_json  # noqa: E402

from gq_quantize.data import calibration_windows  # noqa: E402
from gq_serve.checkpoint import load_quantized_model  # noqa: E402
from gq_serve.evaluate import perplexity  # noqa: E402
from gq_serve.util import cache_root  # noqa: E402


def effective_samples(model_dir: str, windows: torch.Tensor, groups: int) -> dict:
    """Per linear: the saliency's effective sample size per group as a fraction of the N tokens."""
    from transformers import AutoModelForCausalLM

    from gq_quantize.calibration.cache import CalibrationCache

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    cache = CalibrationCache.open_or_build(cache_root(), model, Path(model_dir), windows, groups=groups,
                                           need_guided=True, need_fisher=False, need_hessians=False,
                                           progress=False)
    out, first = {}, {}
    n, seq = windows.shape
    for name in cache.manifest["linears"]:
        s = cache.saliency(name).double()  # [N, G], window-major
        out[name] = [round(float(v), 4) for v in (s.sum(0) ** 2 / (s ** 2).sum(0) / s.shape[0])]
        # the share of each group's saliency on the first token of the windows (n of the N tokens)
        first[name] = [round(float(v), 4) for v in s.reshape(n, seq, -1)[:, 0].sum(0) / s.sum(0)]
    fractions = sorted(v for per in out.values() for v in per)
    summary = {"tokens": int(windows.numel()), "groups": groups, "min": fractions[0],
               "median": fractions[len(fractions) // 2], "max": fractions[-1]}
    print(json.dumps({"saliency_ess_fraction": summary}), flush=True)
    return {"summary": summary, "per_linear": out, "first_token_share": first}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+", help="LABEL=PATH (a checkpoint or the unquantized model directory)")
    p.add_argument("--calib", default="sotu:calib")
    p.add_argument("--n-samples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--seed", type=int, default=0, help="the calibration seed; the other windows use seed + 1")
    p.add_argument("--saliency-groups", type=int, default=0,
                   help="also report the effective sample size of the cached g=G saliency")
    p.add_argument("--out")
    args = p.parse_args()
    pairs = [m.split("=", 1) for m in args.models]
    if any(len(pair) != 2 for pair in pairs):
        p.error("models are LABEL=PATH")
    tokenizer = AutoTokenizer.from_pretrained(pairs[0][1])
    sets = {name: calibration_windows(tokenizer, args.calib, args.n_samples, args.seq_len, seed, cache_root())
            for name, seed in (("calibration", args.seed), ("other", args.seed + 1))}
    rows = []
    for label, path in pairs:
        model = load_quantized_model(path, dtype=torch.float32)
        row = {"label": label, "path": path}
        for name, windows in sets.items():
            row[f"ppl_{name}"] = round(perplexity(model, windows, batch_size=4, progress=False)["ppl"], 4)
        rows.append(row)
        print(json.dumps(row), flush=True)
    ess = effective_samples(pairs[0][1], sets["calibration"], args.saliency_groups) if args.saliency_groups else None
    if args.out:
        write_json(Path(args.out), {"calib": args.calib, "n_samples": args.n_samples, "seq_len": args.seq_len,
                                    "seed": args.seed, "rows": rows, "saliency_ess": ess, **provenance()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
