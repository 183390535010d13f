"""Where a batch-1 decode step's time goes on the CPU (embedded engine): forward hooks time the
quantized linears, the dense linears (lm_head, any unquantized projection), and the decoder layers,
inside the engine's own decode loop (``gq_serve.decode.make_decoder``, as ``gq bench offline``).

    python benchmarks/profile_decode_cpu.py MODEL_OR_CKPT [...] --new-tokens 50 --threads 2

Per model it prints and writes (``--out``) the mean step time and its parts:

* ``quantized_linears``: every GQLinear forward (the packed CPU kernels, or ``dense``);
* ``dense_linears``: every other ``nn.Linear`` (lm_head; dense models' projections);
* ``layers_rest``: the decoder layers minus the linears in them (attention math, KV cache, RMSNorm,
  SiLU, residual adds, and the Python of those modules);
* ``outside_layers``: the step minus the decoder layers and the head (embedding, final norm,
  sampling, the decoder loop; the engine's per-token overhead).

The hooks add a few microseconds per module (they take their own timestamps); the step time is
measured with them, so compare shares, and compare tok/s with the unhooked benchmark rows.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


class Clock:
    """Accumulates the time spent inside modules of each class of interest (outermost only)."""

    def __init__(self):
        self.total: dict[str, float] = {}
        self._start: dict[int, float] = {}

    def attach(self, module: torch.nn.Module, label: str) -> None:
        key = id(module)

        def pre(mod, args):
            self._start[key] = time.perf_counter()

        def post(mod, args, out):
            self.total[label] = self.total.get(label, 0.0) + time.perf_counter() - self._start.pop(key)

        module.register_forward_pre_hook(pre)
        module.register_forward_hook(post)


def profile(path: str, new_tokens: int, threads: int, prompt: str) -> dict:
    from gq_serve.bench import time_decode
    from gq_serve.checkpoint import load_model, load_tokenizer
    from gq_serve.decode import make_decoder
    from gq_serve.quant_linear import GQLinear

    torch.set_num_threads(threads)
    model = load_model(path, "cpu", torch.float32)
    tok = load_tokenizer(path)
    ids = tok(prompt).input_ids
    decoder = make_decoder(model, "dynamic", max_len=len(ids) + new_tokens)
    clock = Clock()
    layers = model.model.layers
    for layer in layers:
        clock.attach(layer, "layers")
    for name, m in model.named_modules():
        if isinstance(m, GQLinear):
            clock.attach(m, "quantized_linears")
        elif isinstance(m, torch.nn.Linear):
            clock.attach(m, "lm_head" if m is model.get_output_embeddings() else "dense_linears")
    time_decode(decoder, ids, new_tokens)  # warm-up
    clock.total.clear()
    # Only decode steps: the prefill (first token) is timed separately and subtracted.
    t = time_decode(decoder, ids, 1)
    prefill = dict(clock.total)
    clock.total.clear()
    t = time_decode(decoder, ids, new_tokens)
    steps = new_tokens - 1
    total = {k: v - prefill.get(k, 0.0) for k, v in clock.total.items()}
    step_ms = 1e3 * t["decode_s"] / steps
    per = {k: 1e3 * v / steps for k, v in total.items()}
    lin_in_layers = per.get("quantized_linears", 0.0) + (per.get("dense_linears", 0.0))
    parts = {
        "quantized_linears": per.get("quantized_linears", 0.0),
        "dense_linears": per.get("dense_linears", 0.0),
        "lm_head": per.get("lm_head", 0.0),
        "layers_rest": per.get("layers", 0.0) - lin_in_layers,
    }
    parts["outside_layers"] = step_ms - per.get("layers", 0.0) - parts["lm_head"]
    qc = model.gq_quantization_config
    return {"model": str(path), "format": qc.format if qc else "dense", "bits": qc.bits if qc else 32,
            "kernels": dict(model.gq_kernels), "threads": threads, "new_tokens": new_tokens,
            "step_ms": round(step_ms, 3), "tok_s": round(1e3 / step_ms, 2),
            "ms": {k: round(v, 3) for k, v in parts.items()},
            "share": {k: round(v / step_ms, 3) for k, v in parts.items()},
            "load_avg_1min": round(os.getloadavg()[0], 2)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+")
    ap.add_argument("--new-tokens", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", default="The capital of France is")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    from gq_kernels.cpu import features

    rows = []
    for path in args.models:
        r = profile(path, args.new_tokens, args.threads, args.prompt)
        rows.append(r)
        print(json.dumps(r), flush=True)
    if args.out:
        sys.path.insert(0, str(ROOT / "scripts"))
        from results_io import provenance, write_json

        prov = provenance()
        prov["command"] = "python benchmarks/profile_decode_cpu.py " + " ".join(sys.argv[1:] if argv is None else argv)
        prov.update(features.describe())
        write_json(args.out, {"provenance": prov, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
