"""W4A4 against the dense model where activations are many: a long prefill and a batch-32 decode.

Weight-only formats speed up batch-1 decode; W4A4 (``w4a4``: int4 weights x int4 activations
through an integer GEMM, a 4-bit KV cache) is for the compute-bound cases. For each variant
(``dense:DTYPE`` or ``w4a4``, optionally pinned to one kernel: ``w4a4@w4a4-int``,
``w4a4@w4a4-triton``), on a Llama-shaped model with random weights built in memory
(:func:`e2e_random.build_model`), in one process and one session:

* ``prefill``: one forward over a ``--prefill-tokens`` prompt (batch 1, the KV cache filled, the
  last position's logits): tokens per second;
* ``decode``: ``--batch`` sequences of ``--prompt-tokens`` each prefilled, then ``--decode-steps``
  steps of one token per sequence: generated tokens per second over all sequences.

Median of ``--runs`` after a warm-up; the variants' runs interleave. Each row carries ``speedup_vs`` (the first variant, the
baseline) and, on the CPU, its ISA flags (integer GEMM speed depends on VNNI / AMX), threads and
other jobs' load.

    python benchmarks/w4a4_speed.py --device cpu --shape smollm2 --variants dense:fp32,dense:bf16,w4a4 \\
        --out docs/results/w4a4_speed.json
    python benchmarks/w4a4_speed.py --device cuda --shape llama2-7b --dtype fp16 \\
        --variants dense:fp16,w4a4@w4a4-int,w4a4@w4a4-triton --out /tmp/w.json   # both integer GEMMs
    python benchmarks/w4a4_speed.py --device cpu --shape tiny-had --prefill-tokens 64 --batch 4 --out /tmp/w.json  # smoke
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import torch

from gq_serve.util import import_file

ROOT = Path(__file__).resolve().parents[1]


E2E = import_file("e2e_random", ROOT / "benchmarks" / "e2e_random.py")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fresh_cache(model):
    """The cache a forward of ``model`` starts from: the format's (installed by the loader hook
    when given an empty DynamicCache), else a DynamicCache."""
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


def time_prefill(model, tokens: int, device: torch.device) -> float:
    ids = torch.randint(1, model.config.vocab_size, (1, tokens), device=device)
    _sync(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        model(input_ids=ids, past_key_values=fresh_cache(model), use_cache=True, logits_to_keep=1)
    _sync(device)
    return time.perf_counter() - t0


def time_decode(model, batch: int, prompt: int, steps: int, device: torch.device) -> float:
    """Seconds for ``steps`` decode steps of ``batch`` sequences after their prefill (not timed)."""
    ids = torch.randint(1, model.config.vocab_size, (batch, prompt), device=device)
    with torch.inference_mode():
        out = model(input_ids=ids, past_key_values=fresh_cache(model), use_cache=True, logits_to_keep=1)
        cache = out.past_key_values
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            out = model(input_ids=nxt, past_key_values=cache, use_cache=True, logits_to_keep=1)
            cache = out.past_key_values
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        _sync(device)
    return time.perf_counter() - t0


def variant(label: str):
    """(params or None, dtype override or None, kernel name or None) for ``dense:DTYPE`` / ``w4a4`` /
    ``w4a4:A`` (A = activation bits) / ``w4a4:A:wN`` (weight scales per N input columns), each
    optionally pinned to a kernel with ``@NAME`` (e.g. ``w4a4@w4a4-int`` vs ``w4a4@w4a4-triton``;
    without it the registry chooses)."""
    label, _, kernel = label.partition("@")
    if label.startswith("dense:"):
        if kernel:
            raise ValueError(f"dense variants have no kernel to pin: {label}@{kernel}")
        return None, E2E.DTYPES[label[6:]], None
    from gq_kernels.registry import get_format

    fmt, _, rest = label.partition(":")
    act, _, wgroup = rest.partition(":")
    if wgroup and not wgroup.startswith("w"):
        raise ValueError(f"{label}: the third field is wN (weight groups of N columns), not {wgroup!r}")
    opts = {**({"act_bits": int(act)} if act else {}), **({"weight_group_size": int(wgroup[1:])} if wgroup else {})}
    return get_format(fmt).params(bits=4, **opts), None, kernel or None


def pin_kernel(model, kernel: str, device: torch.device, dtype: torch.dtype) -> None:
    """Serve every quantized linear of ``model`` with the kernel named ``kernel`` (the GQLinear
    preference; the registry refuses, naming why, where that kernel cannot serve a layer)."""
    from gq_serve.quant_linear import GQLinear

    for m in model.modules():
        if isinstance(m, GQLinear):
            m.kernel_preference = kernel
            m.reset_cache()
            m.select_kernel(device, dtype)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--shape", default="smollm2", choices=sorted(E2E.SHAPES))
    p.add_argument("--variants", default="dense:fp32,w4a4", help="comma-separated; the first is the baseline")
    p.add_argument("--dtype", default="fp32", choices=sorted(E2E.DTYPES), help="activation dtype of w4a4")
    p.add_argument("--prefill-tokens", type=int, default=2048)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--decode-steps", type=int, default=16)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    results_io = E2E._results_io()
    rows, base = [], {}
    # Every variant is built first and the runs interleave (run r of each variant, then run r + 1),
    # so a change in other jobs' load falls on all variants alike and the ratios stay fair.
    models = {}
    for label in args.variants.split(","):
        params, dtype, kernel = variant(label)
        dtype = dtype or E2E.DTYPES[args.dtype]
        model = E2E.build_model(args.shape, params, device, dtype, args.seed)
        if kernel:
            pin_kernel(model, kernel, device, dtype)
        time_prefill(model, min(64, args.prefill_tokens), device)          # warm-up
        time_decode(model, args.batch, 8, 2, device)
        models[label] = (model, dtype)
    pre = {label: [] for label in models}
    dec = {label: [] for label in models}
    with results_io.OtherLoad() as other:
        for _ in range(args.runs):
            for label, (model, _) in models.items():
                pre[label].append(time_prefill(model, args.prefill_tokens, device))
                dec[label].append(time_decode(model, args.batch, args.prompt_tokens, args.decode_steps, device))
    for label, (model, dtype) in models.items():
        kernels: dict[str, int] = {}
        for m in model.modules():
            if getattr(m, "kernel", None) is not None and hasattr(m, "packed_tensors"):
                kernels[m.kernel.name] = kernels.get(m.kernel.name, 0) + 1
        for case, times, n in (("prefill", pre[label], args.prefill_tokens),
                               ("decode", dec[label], args.batch * args.decode_steps)):
            tok_s = n / statistics.median(times)
            row = {"case": case, "variant": label, "model": f"{args.shape} (random weights)",
                   "device": E2E.device_name(device), "compute_dtype": str(dtype).removeprefix("torch."),
                   "tokens": n, "batch": 1 if case == "prefill" else args.batch,
                   "prompt_tokens": args.prefill_tokens if case == "prefill" else args.prompt_tokens,
                   "tok_s": round(tok_s, 2), "seconds_runs": [round(t, 4) for t in times], "kernels": kernels,
                   "kv_bits": getattr(model, "gq_kv_bits", None) or torch.finfo(dtype).bits}
            base.setdefault(case, tok_s)
            row["speedup_vs_baseline"] = round(tok_s / base[case], 3)
            if device.type == "cpu":
                from gq_kernels.cpu import features

                row.update(threads=torch.get_num_threads(), other_cpu_load=other.cores,
                           load_avg_1min=round(os.getloadavg()[0], 2), **features.describe())
            rows.append(row)
            print(f"{label:12s} {case:8s} {tok_s:10.1f} tok/s  x{row['speedup_vs_baseline']:.2f}", file=sys.stderr)
    doc = {"benchmark": "w4a4_speed", "baseline": args.variants.split(",")[0], "date": str(date.today()),
           "command": "python " + " ".join([Path(sys.argv[0]).name if argv is None else "benchmarks/w4a4_speed.py",
                                            *(sys.argv[1:] if argv is None else argv)]),
           **results_io.provenance(), "rows": rows}
    results_io.write_json(args.out, doc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
