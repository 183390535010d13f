"""What int8 activations cost in perplexity: a checkpoint's decode numerics with ``--kernel lut-cpu-q8``
(and ``--head q8``) against the exact fp32 kernels, on whole evaluation windows.

    python scripts/q8_quality.py [--ckpt lnq+gq4-3bit] -> docs/results/q8_quality.json

A decode step sends one row per call, which the q8 kernels round to int8 per 64 columns; prompts
(more than 8 rows) are multiplied exactly. Perplexity is a prompt computation, so this script makes
the q8 kernels take every row (``q8_max_rows = None``): each window's logits are then what a decode
step would compute at that position. Variants: ``exact`` (the fp32 CPU kernels, the model's head),
``head-int8`` (``--head int8``: int8 weights, exact activations), ``q8`` (``--kernel lut-cpu-q8``),
``q8+head-q8`` (that and ``--head q8``: every matrix of a step with int8 activations). Perplexity as
in the results table (context 512, last 8192 tokens of held-out State of the Union and Brown text).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
MODEL = "SmolLM2-135M-Instruct"
VARIANTS = {"exact": (None, "model"), "head-int8": (None, "int8"), "q8": ("lut-cpu-q8", "model"),
            "q8+head-q8": ("lut-cpu-q8", "q8")}


def main() -> int:
    sys.path.insert(0, str(ROOT / "scripts"))
    from results_io import provenance, write_json

    from gq_kernels.cpu.q8 import BitplaneQ8CpuKernel
    from gq_quantize.data import eval_windows
    from gq_serve.checkpoint import load_model, load_tokenizer
    from gq_serve.evaluate import perplexity
    from gq_serve.head import Q8Head
    from gq_serve.util import cache_root

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default="lnq+gq4-3bit", help="checkpoint under results/checkpoints")
    p.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=list(VARIANTS))
    p.add_argument("--data", nargs="+", default=["sotu:heldout", "brown:heldout"])
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--max-tokens", type=int, default=8192)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "docs/results/q8_quality.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cache = cache_root()
    path = cache / "results" / "checkpoints" / args.ckpt
    if not path.is_dir():
        raise SystemExit(f"{path} is missing: quantize it first (scripts/reproduce_quality.py --keep-checkpoints "
                         "or gq quantize ... --out that directory)")
    tok = load_tokenizer(cache / "models" / MODEL)
    windows = {d: eval_windows(tok, d, args.ctx, args.max_tokens, cache) for d in args.data}
    BitplaneQ8CpuKernel.q8_max_rows = None  # every row: each position's logits as a decode step computes them
    rows = []
    for variant in args.variants:
        kernel, head = VARIANTS[variant]
        model = load_model(path, "cpu", torch.float32, kernel=kernel, head=head)
        if isinstance(model.lm_head, Q8Head):
            model.lm_head.max_rows = None
        for d, win in windows.items():
            r = perplexity(model, win, progress=False)
            rows.append({"model": args.ckpt, "variant": variant, "kernels": dict(model.gq_kernels),
                         "head": model.gq_head, "eval_data": d, "ctx": args.ctx, "tokens": r["tokens"],
                         "ppl": round(r["ppl"], 3)})
            print(json.dumps(rows[-1]), flush=True)
    prov = provenance()
    prov["command"] = "python scripts/q8_quality.py " + " ".join(sys.argv[1:])
    write_json(Path(args.out), {"provenance": prov, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
