"""Cost of one ``--finetune-steps`` step per compute precision, on a real model.

    python benchmarks/finetune_step.py --model ~/.cache/gq-serve/models/SmolLM2-135M-Instruct \
        --steps 3 --out docs/results/finetune_step.json

Every decoder linear becomes a 3-bit ``lut`` result (random codes, per-row codebooks: the step's
cost does not depend on their values), then ``finetune_results`` runs ``--steps`` steps per
precision on random token windows, after one warm-up step. The JSON holds seconds per step, the
speed ratio of each precision against float32 measured in the same process, and the KL of the
first step (the precisions start from the same tensors, so their KLs should agree closely).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from gq_kernels.lut.format import LutQuant  # noqa: E402
from gq_quantize.finetune import FinetuneConfig, finetune_results  # noqa: E402
from gq_quantize.calibration.saliency import quantizable_linears  # noqa: E402


def random_lut_results(model: torch.nn.Module, bits: int, seed: int) -> dict[str, LutQuant]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, lin in quantizable_linears(model).items():
        o, i = lin.weight.shape
        codes = torch.randint(0, 1 << bits, (o, i), generator=g, dtype=torch.uint8)
        scale = lin.weight.detach().float().std(1, keepdim=True)
        out[name] = LutQuant(codes, (scale * torch.linspace(-2, 2, 1 << bits)[None]).half(), bits)
    return out


def time_steps(model, results, windows, precision: str, steps: int, batch: int) -> dict:
    cfg = FinetuneConfig(steps=1, batch=batch, precision=precision)
    finetune_results(model, results, windows, cfg, progress=False)  # warm-up (allocator, oneDNN primitives)
    t0 = time.perf_counter()
    _, _, stats = finetune_results(model, results, windows, cfg.model_copy(update={"steps": steps}), progress=False)
    return {"precision": precision, "dtype": stats["dtype"], "steps": steps, "batch": batch,
            "seconds_per_step": round((time.perf_counter() - t0) / steps, 3), "kl_first": stats["kl_first10"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a Hugging Face model directory")
    ap.add_argument("--precisions", nargs="+", default=["float32", "bfloat16"],
                    choices=["float32", "bfloat16", "auto"])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    results = random_lut_results(model, args.bits, seed=0)
    g = torch.Generator().manual_seed(0)
    windows = torch.randint(0, model.config.vocab_size, (8, args.seq_len), generator=g)
    rows = [time_steps(model, results, windows, p, args.steps, args.batch) for p in args.precisions]
    base = next((r["seconds_per_step"] for r in rows if r["precision"] == "float32"), None)
    for r in rows:
        r["speedup_vs_float32"] = None if base is None else round(base / r["seconds_per_step"], 2)
        print(f"{r['precision']:>9} ({r['dtype']}): {r['seconds_per_step']:.2f} s/step"
              f"  x{r['speedup_vs_float32']}  first KL {r['kl_first']:.4f}")
    if args.out:
        from results_io import provenance, write_json

        write_json(Path(args.out), {"model": Path(args.model).name, "seq_len": args.seq_len, "bits": args.bits,
                                    "bf16_native": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
                                    "rows": rows, **provenance()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
