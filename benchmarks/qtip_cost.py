"""QTIP quantization cost: Viterbi throughput (tiles/s) and one layer end to end, per stage.

    python benchmarks/qtip_cost.py --device cpu --out docs/results/qtip_cost.json          # this machine
    python benchmarks/qtip_cost.py --device cuda --layer 4096x11008 --out qtip_cost.json    # GPU stage

Viterbi rows: the two-pass tail-biting search (``quantize_tiles``) on i.i.d. Gaussian tiles at
0.9 RMS(code), per code and bit width, with the implementation ``auto`` picks on the device (C++ on
the CPU, PyTorch ops on CUDA); tiles/s counts whole tiles (both passes), and the relative MSE is
reported next to the spec's target. Layer row: ``qtip()`` on a random [out, in] weight with a Hessian
from random correlated inputs, wall time per stage (RHT, LDL, Viterbi, the rest of BlockLDLQ).
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

from gq_kernels.trellis.codes import VALUES_PER_STATE, code_rms, code_table, default_tlut  # noqa: E402
from gq_quantize.methods import viterbi as vit  # noqa: E402
from gq_quantize.methods.qtip import qtip  # noqa: E402

SPEC_MSE = {("hyb", 2): 0.0714, ("hyb", 3): 0.0188, ("hyb", 4): 0.0056, ("1mad", 2): 0.0699, ("1mad", 3): 0.0176,
            ("1mad", 4): 0.0045, ("3inst", 2): 0.0705, ("3inst", 3): 0.0178, ("3inst", 4): 0.0046}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def viterbi_row(code: str, bits: int, tiles: int, device: torch.device, impl: str) -> dict:
    tlut = default_tlut() if code == "hyb" else None
    V = VALUES_PER_STATE[code]
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(tiles, 256 // V, V, generator=g) * 0.9 * code_rms(code, tlut)).to(device)
    table = code_table(code, tlut).to(device)
    vit.quantize_tiles(x[:1], table, bits * V, impl=impl)  # build / load / warm up
    _sync(device)
    t0 = time.perf_counter()
    st = vit.quantize_tiles(x, table, bits * V, impl=impl)
    _sync(device)
    dt = time.perf_counter() - t0
    mse = float(((table[st] - x) ** 2).sum() / (x ** 2).sum())
    used = impl if impl != "auto" else ("cpp" if device.type == "cpu" and vit.cpp_available()[0] else "torch")
    return {"kind": "viterbi", "code": code, "bits": bits, "tiles": tiles, "impl": used, "device": str(device),
            "seconds": round(dt, 3), "tiles_per_s": round(tiles / dt, 1), "rel_mse": round(mse, 5),
            "spec_rel_mse": SPEC_MSE[(code, bits)], "threads": torch.get_num_threads()}


def layer_row(m: int, n: int, bits: int, device: torch.device, impl: str) -> dict:
    g = torch.Generator().manual_seed(0)
    X = torch.randn(2 * n, n, generator=g).to(device)  # drawn on the CPU (reproducible), multiplied on device
    X = X @ (torch.randn(n, n, generator=g).to(device) / n**0.5) + torch.randn(2 * n, 1, generator=g).to(device)
    H = X.t() @ X / X.shape[0]
    del X
    w = (torch.randn(m, n, generator=g) * 0.02).to(device)
    _sync(device)
    t0 = time.perf_counter()
    q = qtip(w, H, bits, impl=impl)
    _sync(device)
    wall = time.perf_counter() - t0
    st = q.stats
    return {"kind": "layer", "shape": f"{m}x{n}", "bits": bits, "code": "hyb", "device": str(device),
            "tiles": st["tiles"], "wall_s": round(wall, 2),
            **{k: round(st[k], 3) for k in ("time_rht_s", "time_ldl_s", "time_viterbi_s", "time_ldlq_s")},
            "tiles_per_s": round(st["tiles"] / st["time_viterbi_s"], 1), "proxy_err": round(st["proxy_err"], 5)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--impl", default="auto", choices=["auto", "cpp", "torch"])
    ap.add_argument("--codes", default="hyb,1mad,3inst")
    ap.add_argument("--bits", default="2,3,4")
    ap.add_argument("--tiles", type=int, default=64, help="tiles per Viterbi row")
    ap.add_argument("--layer", default="", help="MxN of one layer to quantize end to end (e.g. 4096x11008)")
    ap.add_argument("--layer-bits", type=int, default=2)
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    rows = []
    for code in args.codes.split(","):
        for bits in (int(b) for b in args.bits.split(",")):
            r = viterbi_row(code, bits, args.tiles, device, args.impl)
            print(json.dumps(r), flush=True)
            rows.append(r)
    if args.layer:
        m, n = (int(v) for v in args.layer.lower().split("x"))
        r = layer_row(m, n, args.layer_bits, device, args.impl)
        print(json.dumps(r), flush=True)
        rows.append(r)
    if args.out:
        from results_io import provenance, write_json

        write_json(Path(args.out), {"provenance": provenance(), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
