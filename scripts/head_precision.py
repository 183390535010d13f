"""What a cheaper lm_head would cost in perplexity: SmolLM2's tied head (49152 x 576, the largest
matrix of a decode step) stored in fp32, bf16 or int8, on the fp16 model and a quantized checkpoint.

    python scripts/head_precision.py [--ckpt lnq+gq4-3bit] -> docs/results/head_precision.json

The head is untied from the embedding (the input embedding keeps its values: a decode step reads one
row of it) and its weight replaced by the variant's values, computed in fp32 as a kernel that widens
the stored weight on the fly would: ``fp32`` (SmolLM2's fp16 values, exactly: the dense baseline),
``bf16`` (round to nearest even), ``int8`` (per-row absmax scale, symmetric, round to nearest),
``int8-g32`` (an fp16 absmax scale per 32 weights: llama.cpp's Q8_0, the type the Q4_1 GGUF that
SmolLM2 comes from stores this very matrix in). Bytes per decode step of the head: 4, 2, 1 per
weight (+ 4 per row), 1.0625. Perplexity as in
the results table (context 512, last 8192 tokens of held-out State of the Union and Brown text).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
MODEL = "SmolLM2-135M-Instruct"


def head_variant(w: torch.Tensor, name: str) -> tuple[torch.Tensor, int]:
    """(the fp32 values a kernel multiplies with, stored bytes)."""
    if name == "fp32":
        return w, w.numel() * 4
    if name == "bf16":
        return w.to(torch.bfloat16).float(), w.numel() * 2
    if name == "int8":
        scale = w.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127
        return (w / scale).round().clamp(-127, 127) * scale, w.numel() + w.shape[0] * 4
    if name == "int8-g32":  # llama.cpp's Q8_0: blocks of 32 weights, an fp16 scale each
        blocks = w.reshape(w.shape[0], -1, 32)
        scale = (blocks.abs().amax(dim=2, keepdim=True) / 127).half().float().clamp_min(1e-12)
        q = (blocks / scale).round().clamp(-127, 127)
        return (q * scale).reshape(w.shape), w.numel() + w.numel() // 32 * 2
    raise ValueError(name)


def main() -> int:
    sys.path.insert(0, str(ROOT / "scripts"))
    from results_io import provenance, write_json

    from gq_quantize.data import eval_windows
    from gq_serve.checkpoint import load_model, load_tokenizer
    from gq_serve.evaluate import perplexity
    from gq_serve.util import cache_root

    p = argparse.ArgumentParser()
    p.add_argument("--ckpt", nargs="*", default=["lnq+gq4-3bit"], help="checkpoints under results/checkpoints")
    p.add_argument("--variants", nargs="+", default=["fp32", "bf16", "int8", "int8-g32"])
    p.add_argument("--data", nargs="+", default=["sotu:heldout", "brown:heldout"])
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--max-tokens", type=int, default=8192)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "docs/results/head_precision.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cache = cache_root()
    models = {"fp16": cache / "models" / MODEL}
    models.update({c: cache / "results" / "checkpoints" / c for c in args.ckpt})
    tok = load_tokenizer(models["fp16"])
    windows = {d: eval_windows(tok, d, args.ctx, args.max_tokens, cache) for d in args.data}
    rows = []
    for label, path in models.items():
        if not path.is_dir():
            print(f"skip {label}: {path} missing")
            continue
        model = load_model(path, "cpu", torch.float32)
        head = model.get_output_embeddings()
        w0 = head.weight.detach().clone()
        head.weight = torch.nn.Parameter(w0.clone(), requires_grad=False)  # untied: the embedding keeps w0
        for v in args.variants:
            w, nbytes = head_variant(w0, v)
            head.weight.data.copy_(w)
            for d, win in windows.items():
                r = perplexity(model, win, progress=False)
                rows.append({"model": label, "head": v, "head_bytes": nbytes, "eval_data": d, "ctx": args.ctx,
                             "tokens": r["tokens"], "ppl": round(r["ppl"], 3),
                             "max_abs_weight_change": float(f"{(w - w0).abs().max().item():.3e}")})
                print(json.dumps(rows[-1]), flush=True)
    prov = provenance()
    prov["command"] = "python scripts/head_precision.py " + " ".join(sys.argv[1:])
    write_json(Path(args.out), {"provenance": prov, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
