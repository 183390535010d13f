"""QTIP + GuidedQuant: which pairing of group Hessians and rows is better, per layer, on SmolLM2.

    python benchmarks/qtip_pairing.py --cache-dir ~/.cache/gq-serve/calibration/<model>-<data> \
        --layers model.layers.0.self_attn.q_proj ... --bits 2 --out docs/results/qtip_pairing.json

For each layer it quantizes the real weight with QTIP under four settings and reports the
GuidedQuant objective sum_k tr(E_k H_k E_k^T) / sum_k tr(W_k H_k W_k^T) (E = W - W_hat, H_k the
saliency-weighted Hessian of original output group k, g = 4) of each result:
  qtip          plain Hessian X^T X (QTIP)
  qtip+gq1      one guided Hessian (g = 1)
  qtip+gq4-onerht  g = 4, group k paired with block k of the rows of the output-rotated weight
                (GuidedQuant's code; exact only for g = 1)
  qtip+gq4      g = 4, one output Hadamard transform per group (exact pairing; the default)
  lnq+gq4       (with --variants) LNQ + GuidedQuant g = 4, the non-uniform scalar baseline
Only calibration data are read (the cache's Hessians): nothing here sees evaluation text.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from gq_quantize.methods.objective import quadratic_objective  # noqa: E402
from gq_quantize.methods.qtip import qtip  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache-dir", required=True)
    ap.add_argument("--model", default=str(Path.home() / ".cache/gq-serve/models/SmolLM2-135M-Instruct"))
    ap.add_argument("--layers", nargs="+", required=True)
    ap.add_argument("--bits", type=int, default=2)
    ap.add_argument("--variants", default="qtip,qtip+gq1,qtip+gq4-onerht,qtip+gq4",
                    help="comma-separated; also lnq+gq4 (LNQ + GuidedQuant g=4 as `gq quantize` runs it, the lut format)")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    from transformers import AutoModelForCausalLM

    from gq_quantize.calibration.cache import CalibrationCache

    path = Path(args.cache_dir)
    cache = CalibrationCache(path, json.loads((path / "manifest.json").read_text()))
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    rows = []
    for name in args.layers:
        w = model.get_submodule(name).weight.detach().float()
        H1 = cache.hessian(name, guided=False)[0]
        G1 = cache.hessian(name, guided=True, groups=1)[0]
        G4 = cache.hessian(name, guided=True, groups=4)
        zero = quadratic_objective(w, torch.zeros_like(w), G4)
        wanted = args.variants.split(",")
        for label, H, group_rht in (("qtip", H1, True), ("qtip+gq1", G1, True), ("qtip+gq4-onerht", G4, False),
                                    ("qtip+gq4", G4, True), ("lnq+gq4", G4, None)):
            if label not in wanted:
                continue
            t0 = time.perf_counter()
            if group_rht is None:
                from gq_quantize.config import QuantizeConfig
                from gq_quantize.pipeline import quantize_layer

                qc = QuantizeConfig(method="lnq", bits=args.bits, guided=True, groups=4)
                q = quantize_layer(w, qc, G4, cache.weight_fisher(name))
            else:
                q = qtip(w, H, args.bits, group_rht=group_rht)
            row = {"layer": name, "shape": list(w.shape), "bits": args.bits, "variant": label,
                   "guided_objective_rel": quadratic_objective(w, q.dequantize(), G4) / zero,
                   "proxy_err": q.stats.get("proxy_err"), "seconds": round(time.perf_counter() - t0, 1)}
            print(json.dumps(row), flush=True)
            rows.append(row)
    if args.out:
        from results_io import provenance, write_json

        write_json(Path(args.out), {"provenance": provenance(), "calibration": cache.manifest.get("data_hash"),
                                    "n": cache.manifest.get("n"), "seq_len": cache.manifest.get("seq_len"),
                                    "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
