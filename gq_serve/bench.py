"""Speed benchmarks: offline batch-1 decode (the paper's Table 2 protocol) and the CLI glue.

The online load test lives in `bench_online.py`; this module wires both into `gq bench`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from gq_serve.decode import DECODE_MODES, iter_tokens, resolve_decode_mode

DEFAULT_PROMPT = "The capital of France is"


def _sync(device: torch.device) -> None:
    # CUDA kernels are asynchronous: without a sync the clock stops before the work does.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


def make_static_decoder(model, new_tokens: int, prompt_len: int):
    """The engine's static decoder for `model`: sized to its context, so the benchmark runs the
    same cache bucket (and graph) that `gq serve` would for this request."""
    from gq_serve.static_decode import StaticDecoder

    context = getattr(model.config, "max_position_embeddings", None) or 0
    return StaticDecoder(model, max(int(context), prompt_len + new_tokens))


def time_decode(model, prompt_ids: Sequence[int], new_tokens: int, decoder=None) -> dict:
    """One greedy run of exactly `new_tokens` tokens (EOS ignored); returns timings in seconds.

    decoder: a `StaticDecoder` over `model`, or None for the dynamic-cache loop.
    """
    device = _model_device(model)
    stamps: list[float] = []
    if decoder is not None:
        tokens = decoder.iter_tokens(prompt_ids, new_tokens, temperature=0.0, eos_ids=())
    else:
        tokens = iter_tokens(model, prompt_ids, new_tokens, temperature=0.0, eos_ids=(), device=device)
    _sync(device)
    start = time.perf_counter()
    with torch.inference_mode():
        for _ in tokens:
            _sync(device)  # per-token stamps: the first token's time is the prefill
            stamps.append(time.perf_counter())
    if len(stamps) != new_tokens:
        raise RuntimeError(f"decode produced {len(stamps)} tokens, expected {new_tokens}")
    return {"prefill_s": stamps[0] - start, "decode_s": stamps[-1] - stamps[0], "total_s": stamps[-1] - start}


def bench_offline(
    models: dict[str, tuple[object, object]],
    new_tokens: int = 100,
    runs: int = 3,
    prompt: str = DEFAULT_PROMPT,
    warmup: int = 1,
    decode: str = "auto",
) -> list[dict]:
    """Batch-1 decode speed of each (model, tokenizer), measured in this process, one after another.

    Protocol (paper, Table 2): a prompt of a few tokens, generate exactly `new_tokens` tokens with
    EOS ignored, after `warmup` unmeasured runs; report the median over `runs`.
    `tok_per_s` is decode only (tokens 2..N over their time, i.e. excluding the prefill step);
    `e2e_tok_per_s` is N tokens over the whole call. The first label is the baseline of `speedup`.
    `decode` ("auto" | "static" | "dynamic", as `gq serve --decode`) picks the loop; a static
    decoder captures its CUDA graph during the warm-up runs, outside the measurement.
    """
    if new_tokens < 2:
        raise ValueError(f"new_tokens must be >= 2 to time the decode separately (got {new_tokens})")
    if runs < 1:
        raise ValueError(f"runs must be >= 1 (got {runs})")
    rows: list[dict] = []
    for label, (model, tokenizer) in models.items():
        prompt_ids = tokenizer(prompt).input_ids
        mode = resolve_decode_mode(decode, _model_device(model))
        decoder = None
        if mode == "static":
            decoder = make_static_decoder(model, new_tokens, len(prompt_ids))
            decoder.warmup(len(prompt_ids), new_tokens)  # the graph capture (and compile): untimed
        for _ in range(warmup):
            time_decode(model, prompt_ids, new_tokens, decoder)
        timings = [time_decode(model, prompt_ids, new_tokens, decoder) for _ in range(runs)]
        decode_rates = [(new_tokens - 1) / t["decode_s"] for t in timings]
        e2e_rates = [new_tokens / t["total_s"] for t in timings]
        param = next(model.parameters())
        rows.append({
            "label": label,
            "device": str(param.device),
            "dtype": str(param.dtype).removeprefix("torch."),
            # What ran: a bucket whose capture failed degrades (e.g. to "static"), logged.
            "decode": decoder.slot_mode(len(prompt_ids), new_tokens) if decoder is not None else "dynamic",
            "prompt_tokens": len(prompt_ids),
            "new_tokens": new_tokens,
            "runs": runs,
            "tok_per_s": statistics.median(decode_rates),
            "tok_per_s_runs": decode_rates,
            "e2e_tok_per_s": statistics.median(e2e_rates),
            "prefill_ms": 1e3 * statistics.median(t["prefill_s"] for t in timings),
            "ms_per_token": 1e3 / statistics.median(decode_rates),
        })
    base = rows[0]["tok_per_s"] if rows else None
    for row in rows:
        row["baseline"] = rows[0]["label"]
        row["speedup"] = row["tok_per_s"] / base
    return rows


def format_offline(rows: list[dict]) -> str:
    header = f"{'model':<32} {'device':<8} {'dtype':<9} {'tok/s':>9} {'ms/tok':>8} {'prefill ms':>10} {'speedup':>8}"
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r['label'][:32]:<32} {r['device']:<8} {r['dtype']:<9} {r['tok_per_s']:>9.1f} "
                     f"{r['ms_per_token']:>8.2f} {r['prefill_ms']:>10.1f} {r['speedup']:>7.2f}x")
    return "\n".join(lines)


# ---- CLI ------------------------------------------------------------------------------------


def _parse_model_arg(spec: str) -> tuple[str, str]:
    """'LABEL=PATH' or 'PATH' (label: the directory name)."""
    label, sep, path = spec.partition("=")
    if not sep:
        path, label = spec, Path(spec).name
    if not Path(path).is_dir():
        raise SystemExit(f"gq bench offline: model directory '{path}' does not exist")
    return label, path


def bench_offline_main(args: argparse.Namespace) -> list[dict]:
    from gq_serve.engine import load_model, load_tokenizer

    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    models = {}
    for spec in args.models:
        label, path = _parse_model_arg(spec)
        models[label] = (load_model(path, device=args.device, dtype=args.dtype), load_tokenizer(path))
    rows = bench_offline(models, new_tokens=args.new_tokens, runs=args.runs, prompt=args.prompt,
                         decode=args.decode)
    print(format_offline(rows))
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps({"protocol": "batch1-greedy-ignore-eos", "rows": rows}, indent=2))
        print(f"wrote {args.output}", file=sys.stderr)
    return rows


def bench_online_main(args: argparse.Namespace) -> dict:
    from gq_serve.bench_online import bench_online_main as run

    return run(args)


def add_bench_args(subparsers) -> argparse.ArgumentParser:
    """Register `gq bench offline|online ...` on the CLI's subparsers (each sets func)."""
    from gq_serve.bench_online import add_online_args

    bench = subparsers.add_parser("bench", help="speed benchmarks (offline decode, online load test)")
    sub = bench.add_subparsers(dest="bench_command", required=True)

    off = sub.add_parser("offline", help="batch-1 decode tok/s of one or more models, same process")
    off.add_argument("models", nargs="+", metavar="[LABEL=]DIR",
                     help="model directories; the first is the baseline of the speedup column")
    off.add_argument("--new-tokens", type=int, default=100)
    off.add_argument("--runs", type=int, default=3, help="measured runs (median reported), after 1 warm-up")
    off.add_argument("--prompt", default=DEFAULT_PROMPT)
    off.add_argument("--device", default="cpu")
    off.add_argument("--dtype", default="auto", help="auto (fp16 on GPU, fp32 on CPU), float16, bfloat16, float32")
    off.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    off.add_argument("--decode", choices=DECODE_MODES, default="auto",
                     help="decode loop, as `gq serve --decode`: auto (static on CUDA, dynamic on CPU), "
                          "static (static KV cache, CUDA graph on a GPU), dynamic (DynamicCache)")
    off.add_argument("--output", "-o", default=None, help="write rows as JSON here")
    off.set_defaults(func=bench_offline_main)

    on = sub.add_parser("online", help="load test any OpenAI-compatible endpoint")
    add_online_args(on)
    on.set_defaults(func=bench_online_main)
    return bench
