"""What a call that forks an OpenMP region costs while other jobs keep the cores busy.

On a shared machine the threads of an OpenMP region do not all get a core at once; with libgomp's
default wait policy (spin, then sleep) a call can wait for the scheduler's next tick. This times,
with ``--threads`` torch threads, the median of ``--iters`` back-to-back calls (weights warm) of
three operations: ``torch.add`` on 65,536 floats (parallel in ATen), the packed ``lut`` 3-bit GEMV
on SmolLM2's 1536x576 gate/up shape (``at::parallel_for`` in our extension) and dense ``F.linear``
at one row on the same shape. The wait policy is the environment's, so run it with and without:

    python benchmarks/omp_wait_cpu.py --out docs/results/omp_wait_cpu.json
    OMP_WAIT_POLICY=passive python benchmarks/omp_wait_cpu.py --out docs/results/omp_wait_cpu.json

Each run records the policy, the CPU, its flags and the cores other jobs used meanwhile; an
existing ``--out`` keeps its runs and gets this one appended (the effect comes and goes with the
other jobs, so one run says little).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "benchmarks"))


def median_us(fn, iters: int) -> float:
    fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=40)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from cpu_kernels import random_packed
    from results_io import OtherLoad, write_json

    from gq_kernels.cpu import build, features
    from gq_kernels.format import LinearSpec
    from gq_kernels.registry import choose_kernel, get_format

    build.load()
    n, k = 1536, 576
    spec = LinearSpec(get_format("lut").params(bits=3), n, k)
    packed = random_packed(spec, torch.Generator().manual_seed(0))
    kern = choose_kernel(spec, "cpu", torch.float32)
    prepared = kern.prepare(packed)
    x = torch.randn(1, k)
    w = torch.randn(n, k)
    a = torch.randn(65536)
    ops = {"torch.add 65536 floats": lambda: a.add(1.0),
           f"{kern.name} gemv {n}x{k}": lambda: kern.apply(prepared, x),
           f"F.linear fp32 {n}x{k}, 1 row": lambda: F.linear(x, w)}
    load0 = os.getloadavg()[0]
    with OtherLoad() as other:
        rows = [{"op": name, "median_us": round(median_us(fn, args.iters), 1)} for name, fn in ops.items()]
    policy = os.environ.get("OMP_WAIT_POLICY", "(unset: libgomp's default)")
    for r in rows:
        print(f"{r['op']:>36}: {r['median_us']:9.1f} us", flush=True)
    prov = {"date": date.today().isoformat(), "torch": torch.__version__, "threads": args.threads,
            "omp_wait_policy": policy, "iters": args.iters,
            "command": "python benchmarks/omp_wait_cpu.py " + shlex.join(argv),
            "load_avg_1min": [round(load0, 2), round(os.getloadavg()[0], 2)], "other_cpu_load": other.cores,
            **features.describe()}
    runs = json.loads(args.out.read_text())["runs"] if args.out.exists() else []
    write_json(args.out, {"runs": [*runs, {"provenance": prov, "rows": rows}]})
    print(f"OMP_WAIT_POLICY {policy}; other jobs used {other.cores} cores; wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
