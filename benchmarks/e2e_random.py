"""Embedded-engine decode speed on a Llama-shaped model with random weights, built on the device.

No checkpoint is read or written: the model is made on the meta device, its quantized linears
become ``GQLinear``s of the requested format, and every tensor is then allocated on ``--device``
and filled with random values (random bit patterns for packed codes, which any format's kernels
accept). Speed does not depend on the values, so this measures what a real checkpoint of that
shape would decode at, without 13 GB of files.

For each variant (``dense`` in ``--dtype``, or ``FORMAT:BITS``) it runs the engine's decoder
(``gq_serve.decode.make_decoder``: static cache + CUDA graph on a GPU) at batch 1 for
``--new-tokens`` greedy tokens, ``--runs`` times after a warm-up, and writes rows in the schema of
docs/results/e2e.json plus:

* ``bytes_per_token``: what one decode step must read: every weight as its kernel holds it (packed
  tensors for the packed kernels, the dense copy for ``dense``), one embedding row, and the KV
  cache the step attends over (the static cache's bucket length, or the mean context with a
  dynamic cache);
* ``pct_of_bw_limit``: 100 * bytes_per_token * tok_s / copy bandwidth, the copy bandwidth
  measured in the same run (``benchmarks/kernels.py``'s probe: 2 x bytes / time).

    python benchmarks/e2e_random.py --device cuda --shape llama2-7b --variants dense,lut:2,lut:3,lut:4,bcq:4 \\
        --out /tmp/e2e.json
    python benchmarks/e2e_random.py --device cpu --shape tiny --variants dense,lut:3 --out /tmp/e2e.json   # smoke
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
from datetime import date
from pathlib import Path

import torch

from gq_kernels.format import head_dim
from gq_serve.util import import_file

ROOT = Path(__file__).resolve().parents[1]

# Llama-family shapes (public configs); "tiny" is for smoke tests.
SHAPES: dict[str, dict] = {
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096),
    "llama-1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                     num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048),
    "smollm2": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192),
    # tiny with a Hadamard-sized MLP (w4a4 rotates down_proj's input): 192 = 12 * 16.
    "tiny-had": dict(hidden_size=128, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=256, max_position_embeddings=256),
    "tiny": dict(hidden_size=128, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256, max_position_embeddings=256),
}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def _results_io():
    """scripts/results_io.py (other jobs' load on this machine), loaded by path."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import results_io

    return results_io


def _bench_kernels():
    """benchmarks/kernels.py (its copy-bandwidth probe), loaded by path: the name ``kernels`` is not ours."""
    return import_file("bench_kernels", ROOT / "benchmarks" / "kernels.py")


HEAD_SUFFIX = "+head-"  # e.g. lut:3+head-int8: the variant with gq_serve.head's --head int8


def split_head(label: str) -> tuple[str, str]:
    """``lut:3+head-int8`` -> (``lut:3``, ``int8``); without the suffix the head is ``model``."""
    base, _, head = label.partition(HEAD_SUFFIX)
    return base, head or "model"


def parse_variant(text: str, group_size: int):
    """``dense`` or ``dense:DTYPE`` -> None; ``FORMAT:BITS`` -> the format's params (group size where it
    has groups); either may end in ``+head-HEAD`` (:func:`split_head`)."""
    from gq_serve.head import HEADS

    text, head = split_head(text)
    if head not in HEADS:
        raise argparse.ArgumentTypeError(f"variant suffix +head-{head}: expected one of {', '.join(HEADS)}")
    if text == "dense" or text.startswith("dense:"):
        if text != "dense" and text[6:] not in DTYPES:
            raise argparse.ArgumentTypeError(f"variant {text!r}: dense:DTYPE takes one of {sorted(DTYPES)}")
        return None
    fmt, _, bits = text.partition(":")
    if not bits.isdigit():
        raise argparse.ArgumentTypeError(f"variant {text!r}: give 'dense' or FORMAT:BITS, e.g. lut:3")
    bk = _bench_kernels()
    try:
        return bk.format_params(fmt, int(bits), group_size)[0]
    except ValueError as e:  # unknown format, unsupported bits (pydantic's ValidationError is one)
        raise argparse.ArgumentTypeError(f"variant {text!r}: {e}") from None


def build_model(shape: str, params, device: torch.device, dtype: torch.dtype, seed: int = 0,
                kernel: str | None = None):
    """A Llama of ``shape`` with random weights on ``device``: dense in ``dtype``, or every decoder
    linear a ``GQLinear`` of ``params`` (``lm_head`` stays dense, as gq quantize leaves it) run by
    ``kernel`` (None: chosen per layer)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from gq_kernels.registry import get_format
    from gq_kernels.schema import QuantizationConfig
    from gq_serve.checkpoint import quantize_linears
    from gq_serve.quant_linear import GQLinear, install_kv_cache

    config = LlamaConfig(**SHAPES[shape], tie_word_embeddings=False, architectures=["LlamaForCausalLM"])
    with torch.device("meta"):
        model = LlamaForCausalLM(config).to(dtype)
        if params is not None:
            quantize_linears(model, QuantizationConfig.for_export(params, ["lm_head"]), dtype)
    model = model.to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if name.endswith("norm.weight"):
                t.fill_(1.0)
            elif t.dtype.is_floating_point:
                t.normal_(0.0, 0.02, generator=g)
            else:  # packed codes: any bit pattern is valid (formats that disagree say so below)
                info = torch.iinfo(t.dtype)
                t.random_(info.min, info.max, generator=g)
        for name, m in model.named_modules():
            if isinstance(m, GQLinear):
                fmt = get_format(m.format)
                ex = fmt.example_tensors(m.params, m.out_features, m.in_features, g, name=name, model_config=config)
                for tname, t in (ex or {}).items():
                    getattr(m, tname).copy_(t)
        # The rotary table is computed at construction: on the meta device it never was.
        with torch.device(device):
            model.model.rotary_emb = LlamaRotaryEmbedding(config)
    model.eval()
    for m in model.modules():
        if isinstance(m, GQLinear):
            m.kernel_preference = kernel
            m.select_kernel(device, dtype)
    if params is not None:
        install_kv_cache(model, params)
    return model


def step_bytes(model, kv_positions: int, dtype: torch.dtype) -> int:
    """Bytes one decode step reads: weights as the kernels hold them, one embedding row, the KV cache."""
    from gq_serve.quant_linear import GQLinear

    total = 0
    for name, m in model.named_modules():
        if isinstance(m, GQLinear):
            total += sum(t.numel() * t.element_size() for t in m._runtime.values())
            total += 0 if m.bias is None else m.bias.numel() * m.bias.element_size()
        elif isinstance(m, torch.nn.Embedding):
            total += m.weight.shape[1] * m.weight.element_size()
        else:  # buffers too: an Int8Head (--head int8) holds its weights as buffers
            total += sum(t.numel() * t.element_size() for t in [*m.parameters(recurse=False),
                                                                 *m.buffers(recurse=False)])
    cfg = model.config
    kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim(cfg) * torch.finfo(dtype).bits // 8
    return total + kv * kv_positions


def memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def variant_dtype(label: str, default: torch.dtype) -> torch.dtype:
    """``dense:DTYPE`` runs in DTYPE; every other variant in ``--dtype``."""
    label = split_head(label)[0]
    return DTYPES[label[6:]] if label.startswith("dense:") else default


def current_rss_mb() -> float:
    """This process's resident set now (VmRSS), MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_variant(shape: str, label: str, params, args, device, dtype, copy_gbps: float) -> dict:
    from gq_serve.bench import time_decode
    from gq_serve.decode import make_decoder
    from gq_serve.head import apply_head
    from gq_serve.quant_linear import GQLinear

    dtype = variant_dtype(label, dtype)
    load_before = os.getloadavg()[0]

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model = build_model(shape, params, device, dtype, args.seed, args.kernel)
    head = apply_head(model, split_head(label)[1])
    prompt = list(range(1, args.prompt_tokens + 1))
    max_len = args.prompt_tokens + args.new_tokens
    decoder = make_decoder(model, args.decode, device, max_len=max_len, compile=args.compile)
    decoder.warmup(len(prompt), args.new_tokens)
    for _ in range(args.warmup):
        time_decode(decoder, prompt, args.new_tokens)
    with _results_io().OtherLoad() as other:
        timings = [time_decode(decoder, prompt, args.new_tokens) for _ in range(args.runs)]
    rates = [(args.new_tokens - 1) / t["decode_s"] for t in timings]
    tok_s = statistics.median(rates)
    static = decoder.mode.startswith("static")
    kv_positions = decoder.bucket_for(decoder.cache_length(len(prompt), args.new_tokens)) if static else \
        len(prompt) + args.new_tokens // 2
    nbytes = step_bytes(model, kv_positions, dtype)
    kernels: dict[str, int] = {}
    for m in model.modules():
        if isinstance(m, GQLinear):
            kernels[m.kernel.name] = kernels.get(m.kernel.name, 0) + 1
    row = {
        "engine": "hf", "model": f"{shape} (random weights)",
        "format": {v: k for k, v in DTYPES.items()}[dtype] if params is None else params.format,
        "bits": torch.finfo(dtype).bits if params is None else params.bits,
        "variant": label, "head": head, "batch": 1, "new_tokens": args.new_tokens, "prompt_tokens": len(prompt),
        "tok_s": round(tok_s, 2), "tok_s_runs": [round(r, 2) for r in rates],
        "ms_per_token": round(1e3 / tok_s, 3),
        "decode": decoder.slot_mode(len(prompt), args.new_tokens),
        "kernels": kernels, "compute_dtype": str(dtype).removeprefix("torch."),
        "bytes_per_token": nbytes, "copy_gbps": round(copy_gbps, 1),
        "pct_of_bw_limit": round(100.0 * nbytes * tok_s / (copy_gbps * 1e9), 2),
        "memory_mb": round(memory_mb(device), 1),
    }
    if device.type == "cpu":
        from gq_kernels.cpu import features

        # Resident memory after decoding (model, KV cache, runtime; the bandwidth probe's buffers are
        # freed by then): the variant's own only when it ran alone in its process (--isolate).
        row["rss_mb"] = round(current_rss_mb(), 1) if args.isolate_child else None
        row.update(threads=torch.get_num_threads(), load_avg_1min=[round(load_before, 2),
                                                                    round(os.getloadavg()[0], 2)],
                   other_cpu_load=other.cores, **features.describe())
    del decoder, model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def run_isolated(argv: list[str], label: str, out: Path, args) -> dict:
    """One variant in a child process of this script (same arguments); returns its row."""
    child_out = out.with_name(f".{out.name}.{label.replace(':', '-')}.json")
    keep = []
    skip = False
    for a in argv:  # drop --variants/--out/--isolate (both "--x v" and "--x=v" forms)
        if skip:
            skip = False
            continue
        name = a.split("=", 1)[0]
        if name in ("--variants", "--out"):
            skip = "=" not in a
            continue
        if name in ("--isolate", "--attempts", "--max-other-load", "--quiet-wait"):
            skip = name != "--isolate" and "=" not in a
            continue
        keep.append(a)
    cmd = [sys.executable, __file__, *keep, "--variants", label, "--out", str(child_out), "--isolate-child"]
    best = None
    for attempt in range(1, args.attempts + 1):
        waited = _results_io().wait_for_quiet(args.max_other_load, args.quiet_wait)
        subprocess.run(cmd, check=True)
        row = json.loads(child_out.read_text())["rows"][0]
        child_out.unlink()
        row.update(attempts=attempt, other_load_before=waited)
        print(f"  {label}: other jobs used {row['other_cpu_load']} cores during the timed runs (attempt {attempt})",
              flush=True)
        if best is None or row["other_cpu_load"] < best["other_cpu_load"]:
            best = row
        if row["other_cpu_load"] <= args.max_other_load:
            break
    row = best
    for k in ("baseline", "fp16_tok_s", "ratio", "date", "torch", "command"):
        row.pop(k, None)
    return row


def merge_e2e(old: list[dict], new: list[dict]) -> list[dict]:
    """``old`` rows, less those of a (model, device, date) that ``new`` has (a re-run replaces that day's
    rows, earlier days' stay), then ``new``."""
    keys = {(r.get("model"), r.get("device"), r.get("date")) for r in new}
    return [r for r in old if (r.get("model"), r.get("device"), r.get("date")) not in keys] + list(new)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return f"{p.name} (sm_{p.major}{p.minor})"
    return f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama2-7b")
    ap.add_argument("--variants", default="dense,lut:2,lut:3,lut:4,bcq:4",
                    help="comma list: dense (in --dtype) or FORMAT:BITS, either optionally +head-int8 (the "
                         "lm_head in int8, CPU); the first is the ratio's baseline")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp16", help="activations and dense weights")
    ap.add_argument("--group-size", type=int, default=128, help="for formats with groups")
    ap.add_argument("--decode", choices=("auto", "static", "dynamic", "lean"), default="auto")
    ap.add_argument("--kernel", default=None, help="the quantized variants' kernel (default: chosen per layer)")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                    help="torch.compile the static step before its CUDA-graph capture (slow to build)")
    ap.add_argument("--new-tokens", type=int, default=100)
    ap.add_argument("--prompt-tokens", type=int, default=5)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--copy-mb", type=int, default=None, help="copy-bandwidth probe size (default: 1024 on GPU, 64 on CPU)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="CPU threads")
    ap.add_argument("--isolate", action="store_true",
                    help="run each variant in its own child process (its own peak RSS: rss_mb, baseline_rss_mb)")
    ap.add_argument("--isolate-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--attempts", type=int, default=3, help="--isolate: runs of a variant while other jobs load the cores")
    ap.add_argument("--max-other-load", type=float, default=0.3, help="--isolate: cores other jobs may use during a run")
    ap.add_argument("--quiet-wait", type=float, default=600, help="--isolate: s to wait for a quiet machine first")
    ap.add_argument("--out", type=Path, required=True, help="JSON: {provenance, device, copy_gbps, rows}")
    ap.add_argument("--e2e-json", type=Path, default=None,
                    help="also add the rows to this list of rows (docs/results/e2e.json), replacing only rows of "
                         "the same model, device and date")
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.new_tokens < 2 or args.runs < 1 or args.prompt_tokens < 1:
        ap.error("--new-tokens must be >= 2, --runs and --prompt-tokens >= 1")
    try:
        variants = [(v, parse_variant(v, args.group_size)) for v in args.variants.split(",") if v]
    except argparse.ArgumentTypeError as e:
        ap.error(str(e))
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is visible", file=sys.stderr)
        return 2
    dtype = DTYPES[args.dtype]
    bk = _bench_kernels()
    copy_mib = args.copy_mb or (1024 if device.type == "cuda" else 64)
    copy_gbps = bk.copy_bandwidth(device, copy_mib)
    dev = device_name(device)
    print(f"{dev}: copy {copy_gbps:.1f} GB/s ({copy_mib} MiB, 2 x bytes / time)", flush=True)
    rows = []
    for label, params in variants:
        if args.isolate:
            row = run_isolated(argv, label, args.out, args)
        else:
            row = run_variant(args.shape, label, params, args, device, dtype, copy_gbps)
        row["device"] = dev
        rows.append(row)
        print(f"{label:>8}: {row['tok_s']:.1f} tok/s ({row['decode']}, {row['kernels'] or 'dense'}), "
              f"{row['bytes_per_token'] / 1e9:.3f} GB/token -> {row['pct_of_bw_limit']:.1f}% of copy bandwidth, "
              f"{row['memory_mb']:.0f} MiB", flush=True)
    base = rows[0]
    prov = {"date": date.today().isoformat(), "torch": torch.__version__,
            "command": "python benchmarks/e2e_random.py " + shlex.join(argv)}
    for row in rows:
        row.update(baseline=base["variant"], fp16_tok_s=base["tok_s"], ratio=round(row["tok_s"] / base["tok_s"], 3),
                   **prov)
        if row.get("rss_mb") is not None and base.get("rss_mb") is not None:
            row.update(baseline_rss_mb=base["rss_mb"], rss_ratio=round(row["rss_mb"] / base["rss_mb"], 3))
    doc = {"provenance": {**prov, "machine": dev}, "device": dev, "copy_gbps": round(copy_gbps, 1), "rows": rows}
    bk.write_json(args.out, doc)
    print(f"wrote {args.out}")
    if args.e2e_json is not None:
        bk.write_json(args.e2e_json, merge_e2e(json.loads(args.e2e_json.read_text()) if args.e2e_json.exists() else [],
                                               rows))
        print(f"added {len(rows)} rows to {args.e2e_json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
