"""Offline speed benchmark: batch-1 decode tok/s (the paper's Table 2 protocol), several models
measured one after another in one process. The online load test is `bench_online.py`; both are
`gq bench` subcommands (`gq_serve.cli`).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence

import torch

from gq_serve.decode import make_decoder
from gq_serve.sampling import SamplingParams

DEFAULT_PROMPT = "The capital of France is"


def _sync(device: torch.device) -> None:
    # CUDA kernels are asynchronous: without a sync the clock stops before the work does.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_decode(decoder, prompt_ids: Sequence[int], new_tokens: int) -> dict:
    """One greedy run of exactly `new_tokens` tokens (EOS ignored) through `decoder` (see
    `gq_serve.decode`); returns timings in seconds."""
    device = decoder.device
    stamps: list[float] = []
    tokens = decoder.iter_tokens(prompt_ids, SamplingParams(max_tokens=new_tokens, ignore_eos=True))
    _sync(device)
    start = time.perf_counter()
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
    compile: bool | None = None,
) -> list[dict]:
    """Batch-1 decode speed of each (model, tokenizer), measured in this process, one after another.

    Protocol (paper, Table 2): a prompt of a few tokens, generate exactly `new_tokens` tokens with
    EOS ignored, after `warmup` unmeasured runs; report the median over `runs`.
    `tok_per_s` is decode only (tokens 2..N over their time, i.e. excluding the prefill step);
    `e2e_tok_per_s` is N tokens over the whole call. The first label is the baseline of `speedup`.
    `decode` ("auto" | "static" | "dynamic" | "lean", as `gq serve --decode`) picks the loop; a static
    decoder captures its CUDA graph during the warm-up runs, outside the measurement.
    """
    if new_tokens < 2:
        raise ValueError(f"new_tokens must be >= 2 to time the decode separately (got {new_tokens})")
    if runs < 1:
        raise ValueError(f"runs must be >= 1 (got {runs})")
    rows: list[dict] = []
    for label, (model, tokenizer) in models.items():
        prompt_ids = tokenizer(prompt).input_ids
        context = getattr(model.config, "max_position_embeddings", None) or 0
        decoder = make_decoder(model, decode, max_len=max(int(context), len(prompt_ids) + new_tokens),
                               compile=compile)
        decoder.warmup(len(prompt_ids), new_tokens)  # a static decoder's graph capture (and compile): untimed
        for _ in range(warmup):
            time_decode(decoder, prompt_ids, new_tokens)
        timings = [time_decode(decoder, prompt_ids, new_tokens) for _ in range(runs)]
        decode_rates = [(new_tokens - 1) / t["decode_s"] for t in timings]
        e2e_rates = [new_tokens / t["total_s"] for t in timings]
        param = next(model.parameters())
        rows.append({
            "label": label,
            "device": str(param.device),
            "dtype": str(param.dtype).removeprefix("torch."),
            "head": getattr(model, "gq_head", "model"),
            # What ran: a bucket whose capture failed degrades (e.g. to "static"), logged.
            "decode": decoder.slot_mode(len(prompt_ids), new_tokens),
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
