"""Cost of LNQ's coordinate-descent implementations (paper Table 9: naive -> closed-form ->
precompute -> lazy batch updates), timed in one run as ratios against ``naive``.

Problem: random W [out, in], H = X^T X / n from random correlated X [2*in, in], weighted k-means
initialisation (diag(H) weights), ``bits``-bit codebooks. For every variant it times one full CD
sweep, and the whole LNQ (T, K) -- for the variants whose per-coordinate cost does not depend on
the coordinate (``naive``, ``closed_form``) on a 4096-wide layer that is too slow on a small CPU,
so by default they are timed on the first ``--partial-coords`` coordinates and extrapolated
linearly; their whole-LNQ time is estimated as lazy's LNQ time with lazy's sweeps swapped for
theirs. Every row of the JSON says which numbers were measured and which extrapolated.

    python benchmarks/cd_variants.py                        # 4096 x 4096, 3 bits (paper-sized)
    python benchmarks/cd_variants.py --out 512 --in 512 --output /tmp/cd_cost.json   # quick check
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

from gq_quantize.methods.lnq import CD_VARIANTS, cd_sweeps, lnq, normalized_hessian, sort_codebook  # noqa: E402
from gq_quantize.methods.squeezellm import weighted_kmeans  # noqa: E402

# Variants whose per-coordinate work is independent of the coordinate's position, so a partial
# sweep extrapolates linearly; precompute's rank-1 updates shrink along the sweep, lazy's do not
# matter (GEMM-dominated), so those two are always timed over the full sweep.
LINEAR_VARIANTS = ("naive", "closed_form")


def make_problem(out_f: int, in_f: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(in_f) + 0.5 * torch.randn(in_f, in_f, generator=g) / in_f**0.5
    X = torch.randn(2 * in_f, in_f, generator=g) @ mix
    H = X.T @ X / (2 * in_f)
    w = 0.02 * torch.randn(out_f, in_f, generator=g)
    return w, H


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}; {os.cpu_count()} logical CPUs; torch threads {torch.get_num_threads()}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=int, default=4096, dest="out_f")
    ap.add_argument("--in", type=int, default=4096, dest="in_f")
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--T", type=int, default=2)
    ap.add_argument("--K", type=int, default=4)
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--partial-coords", type=int, default=256,
                    help="coordinates timed for naive / closed_form (0 = full sweep, no extrapolation)")
    ap.add_argument("--full-lnq", action="store_true", help="run the whole LNQ for every variant (slow)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = leave as is)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output", type=Path, default=ROOT / "docs" / "results" / "cd_cost.json")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    w, H = make_problem(args.out_f, args.in_f, args.seed)
    init = weighted_kmeans(w, torch.diagonal(H).expand_as(w).contiguous(), args.bits)
    codes, cb = sort_codebook(init.codes, init.codebook.float())
    prepared = normalized_hessian(H)
    n = args.in_f
    shape = [args.out_f, args.in_f]

    # One sweep per variant, all from the same starting point.
    sweep_s: dict[str, float] = {}
    notes: dict[str, str] = {}
    for v in CD_VARIANTS:
        m = args.partial_coords if (v in LINEAR_VARIANTS and 0 < args.partial_coords < n) else n
        t0 = time.perf_counter()
        cd_sweeps(w, H, codes, cb, sweeps=1, variant=v, block=args.block, prepared=prepared, coords=m)
        dt = time.perf_counter() - t0
        sweep_s[v] = dt * n / m
        notes[v] = "measured" if m == n else f"measured on the first {m} of {n} coordinates, extrapolated linearly"
        print(f"sweep {v:12s} {sweep_s[v]:9.3f} s  ({notes[v]})", flush=True)

    # Whole LNQ (history tracking off: it is reporting, not part of the algorithm's cost).
    lnq_s: dict[str, float] = {}
    lnq_notes: dict[str, str] = {}
    sweeps_total = args.T * args.K
    for v in ("lazy",) + tuple(x for x in CD_VARIANTS if x != "lazy"):
        slow = v in LINEAR_VARIANTS or v == "precompute"
        if slow and not args.full_lnq:
            lnq_s[v] = lnq_s["lazy"] + sweeps_total * (sweep_s[v] - sweep_s["lazy"])
            lnq_notes[v] = f"estimated: measured lazy LNQ + {sweeps_total} x (this sweep - lazy sweep)"
        else:
            t0 = time.perf_counter()
            lnq(w, H, args.bits, T=args.T, K=args.K, init=init, cd_variant=v, block=args.block, track_objective=False)
            lnq_s[v] = time.perf_counter() - t0
            lnq_notes[v] = "measured"
        print(f"lnq   {v:12s} {lnq_s[v]:9.3f} s  ({lnq_notes[v]})", flush=True)

    common = {
        "shape": shape,
        "bits": args.bits,
        "machine": machine(),
        "torch": torch.__version__,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "python "
        + " ".join(shlex.quote(a) for a in [str(Path(sys.argv[0]))] + (argv if argv is not None else sys.argv[1:])),
    }
    rows = []
    for v in CD_VARIANTS:
        rows.append({"variant": v, "what": "one CD sweep", "seconds": round(sweep_s[v], 4),
                     "ratio_vs_naive": round(sweep_s[v] / sweep_s["naive"], 4), "how": notes[v], **common})
    for v in CD_VARIANTS:
        rows.append({"variant": v, "what": f"whole LNQ (T={args.T}, K={args.K}, init given)",
                     "seconds": round(lnq_s[v], 4), "ratio_vs_naive": round(lnq_s[v] / lnq_s["naive"], 4),
                     "how": lnq_notes[v], **common})
    doc = {
        "description": "LNQ coordinate-descent variants (GuidedQuant Table 9 analogue), CPU, float32; "
                       "ratios are within this run. naive = per coordinate a fresh mat-vec for the gradient "
                       "entry and every codebook value evaluated; closed_form = fresh mat-vec, closed-form "
                       "optimum, nearest value; precompute = maintained targets with rank-1 updates; "
                       "lazy = rank-1 updates inside 128-column blocks plus one GEMM per block.",
        "rows": rows,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
