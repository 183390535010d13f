"""GPU kernel benchmark: quantized matmul vs fp16 ``F.linear`` on Llama-2-7B shapes.

For every shape (out x in), bit-width, format (every registered one with ``--formats``; default
all) and batch it times the kernel ``gq_kernels.registry.choose_kernel`` picks for that layer (or
``--kernel NAME``) on random packed tensors of the format, and the dense
``torch.nn.functional.linear`` with a weight of the same shape in the same dtype, in one run:

* CUDA events around every call; before every timed call the L2 is flushed by writing a
  ``--flush-mb`` (default 256 MiB) buffer -- the 7B layers fit in the H100's 50 MB L2, so without
  the flush the numbers would be fiction; ``--warmup`` calls first; median over ``--iters``.
* gbps = bytes the kernel must read (the format's checkpoint tensors of the layer + x) / median
  time, in 1e9 bytes/s; pct_copy_bw = 100 * gbps / copy_gbps, where copy_gbps is the bandwidth of
  a ``--copy-mb`` (default 1024 MiB) device-to-device ``dst.copy_(src)`` measured in the same run
  and counted as bytes read + written (2 * size / time).
* speedup_vs_fp16 = median time of the dense ``F.linear`` (in ``--dtype``) / our median time.
* Once per configuration the output is checked against the format's reference matmul in float32
  (``x @ W_hat.T``; w4a4 also quantizes x as its spec says); max_rel_err = max|y - ref| / max|ref|. A configuration above the bound is
  not timed (its speed fields are null) and the script exits 1 after writing the JSON.

    python benchmarks/kernels.py                                   # all: -> docs/results/kernels.json + .png
    python benchmarks/kernels.py --formats lut --bits 3 --batches 1,16 --shapes qkv,4096x11008 --out /tmp/k.json
    python benchmarks/kernels.py --allow-cpu --shapes 64x96 --iters 3 --out /tmp/k.json   # smoke test only

Without CUDA the script refuses unless ``--allow-cpu`` (then it times whatever kernel serves the CPU
with time.perf_counter, marks the rows "cpu", and needs an explicit ``--out``: CPU numbers never go
into docs/results by default).
"""
from __future__ import annotations

import argparse
import math
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from pydantic import ValidationError  # noqa: E402

from gq_kernels.format import FormatParams, LinearSpec  # noqa: E402
from gq_kernels.registry import choose_kernel, format_names, get_format  # noqa: E402
from results_io import provenance, write_json  # noqa: E402

DEFAULT_OUT = ROOT / "docs" / "results" / "kernels.json"

# Llama-2-7B linear layers, out x in (N x K).
LLAMA2_7B_SHAPES: dict[str, tuple[int, int]] = {
    "qkvo": (4096, 4096),        # q/k/v/o_proj, one each
    "up": (11008, 4096),         # gate_proj / up_proj, one each
    "down": (4096, 11008),       # down_proj
    "qkv": (12288, 4096),        # fused q/k/v
    "gate_up": (22016, 4096),    # fused gate/up
}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
# Loose bound on max|y - ref| / max|ref|: rounding the weights / output to 16 bits stays far below
# it, a wrong bit order, codebook row or group index lands near 1.
TOLERANCE = {"fp16": 2e-2, "bf16": 5e-2}

CONVENTIONS = {
    "us": "median time of one call in microseconds; on CUDA GPU time between CUDA events with the L2 "
          "flushed before every timed call (see settings.timer)",
    "bytes_read": "the format's checkpoint tensors of one [n, k] layer (e.g. lut: bit planes "
                  "bits * n * ceil(k/32) * 4 + codebook n * 2^bits * 2; bcq: bit planes + scales and offsets "
                  "2 * n * n_groups * 2) + x (batch * k * dtype bytes); the output write is not counted",
    "gbps": "bytes_read / median time, in 1e9 bytes per second",
    "fp16_gbps": "(n * k + batch * k) * dtype bytes / fp16_us, same units",
    "copy_gbps": "device-to-device dst.copy_(src) of copy_mib MiB counted as bytes read + written: "
                 "2 * size / median time, 1e9 bytes per second",
    "pct_copy_bw": "100 * gbps / copy_gbps",
    "path": "the kernel (gq_kernels.registry.choose_kernel) and, for the Triton kernels, the path of the "
            "call: gemv (packed-weight GEMV), dequant (Triton dequantize + dense F.linear; bytes_read still "
            "counts only the packed inputs) or reference",
    "speedup_vs_fp16": "fp16_us / us; fp16_us is torch.nn.functional.linear(x, W) with W [n, k] in the "
                       "run's dtype (fp16 or bf16), same shape, same run",
    "max_rel_err": "max|y - ref| / max|ref|, ref = the format's reference matmul on x.float() "
                   "(F.linear with the float32 dequantized weight; w4a4 quantizes x first) (null if the call raised or gave non-finite values / wrong shape or "
                   "dtype); check_ok = max_rel_err <= tolerance, speed fields null otherwise",
    "error": "why the call failed (exception or wrong output dtype), null when it ran",
}


# ------------------------------------------------------------------------------------------------
# pure helpers
# ------------------------------------------------------------------------------------------------
def dtype_bytes(dtype: str) -> int:
    return DTYPES[dtype].itemsize


def format_params(fmt: str, bits: int, group_size: int = 128) -> tuple[FormatParams, int | None]:
    """The format's parameters for ``bits``, with ``group_size`` where the format has settable
    groups; returns (params, the group size applied or None)."""
    f = get_format(fmt)
    if "group_size" in f.Params.model_fields:
        try:
            return f.params(bits=bits, group_size=group_size), group_size
        except ValidationError:  # a format whose groups are fixed (lut: per row)
            pass
    return f.params(bits=bits), None


def supports_bits(fmt: str, bits: int) -> bool:
    return bits in get_format(fmt).Params.supported_bits


def bytes_read(fmt: str, bits: int, batch: int, n: int, k: int, *, dtype: str = "fp16",
               group_size: int = 128) -> int:
    """Bytes the quantized matmul must read: the layer's checkpoint tensors + x."""
    specs = get_format(fmt).tensors(format_params(fmt, bits, group_size)[0], n, k)
    weights = sum(math.prod(s.shape) * s.dtype.itemsize for s in specs.values())
    return weights + batch * k * dtype_bytes(dtype)


def dense_bytes_read(batch: int, n: int, k: int, *, dtype: str = "fp16") -> int:
    """Bytes the dense F.linear must read: W [n, k] + x [batch, k], both in dtype."""
    return (n * k + batch * k) * dtype_bytes(dtype)


def parse_shape(text: str) -> tuple[str, int, int]:
    """``"qkv"`` (a Llama-2-7B layer name) or ``"NxK"`` (out x in) -> (label, n, k)."""
    text = text.strip()
    if text in LLAMA2_7B_SHAPES:
        n, k = LLAMA2_7B_SHAPES[text]
        return text, n, k
    parts = text.lower().split("x")
    if len(parts) == 2 and all(p.isdigit() and int(p) > 0 for p in parts):
        n, k = int(parts[0]), int(parts[1])
        return text.lower(), n, k
    raise argparse.ArgumentTypeError(
        f"bad shape {text!r}: give NxK (out x in, e.g. 4096x11008) or one of {sorted(LLAMA2_7B_SHAPES)}")


def split_list(values: list[str] | None) -> list[str]:
    """``["1,2", "4"]`` -> ``["1", "2", "4"]``: lists may be given comma- or space-separated."""
    return [v for item in values or [] for v in item.split(",") if v.strip()]


def _sig(x: float, digits: int = 4) -> float:
    """Round to ``digits`` significant digits (keeps tiny CPU smoke-test values non-zero)."""
    return float(f"{x:.{digits}g}")


def make_row(*, device: str, fmt: str, bits: int, batch: int, n: int, k: int, dtype: str,
             group_size: int | None, shape: str, us: float | None, fp16_us: float | None,
             copy_gbps: float, max_rel_err: float, tolerance: float, path: str | None = None,
             error: str | None = None) -> dict:
    """One result row; speed fields are None when the configuration was not timed (check failed).

    ``max_rel_err`` is inf when the call raised (``error`` says why) or returned non-finite values or
    the wrong shape / dtype; it is stored as None then (JSON has no infinity).
    """
    nbytes = bytes_read(fmt, bits, batch, n, k, dtype=dtype, group_size=group_size or 128)
    dense = dense_bytes_read(batch, n, k, dtype=dtype)
    timed = us is not None and fp16_us is not None
    gbps = nbytes / (us * 1e-6) / 1e9 if timed else None
    return {
        "device": device, "format": fmt, "bits": bits, "batch": batch, "n": n, "k": k,
        "shape": shape, "dtype": dtype, "group_size": group_size, "path": path,
        "us": round(us, 3) if timed else None,
        "fp16_us": round(fp16_us, 3) if timed else None,
        "bytes_read": nbytes,
        "gbps": _sig(gbps) if timed else None,
        "fp16_gbps": _sig(dense / (fp16_us * 1e-6) / 1e9) if timed else None,
        "pct_copy_bw": _sig(100.0 * gbps / copy_gbps) if timed else None,
        "speedup_vs_fp16": _sig(fp16_us / us) if timed else None,
        "max_rel_err": float(f"{max_rel_err:.3e}") if math.isfinite(max_rel_err) else None,
        "check_ok": bool(max_rel_err <= tolerance),
        "error": error,
    }


def max_rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    """max|y - ref| / max|ref| (inf when y has non-finite values or the wrong shape)."""
    if y.shape != ref.shape or not torch.isfinite(y).all():
        return float("inf")
    return float((y.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


# ------------------------------------------------------------------------------------------------
# timing
# ------------------------------------------------------------------------------------------------
class Timer:
    """Median time of ``fn()`` in seconds: CUDA events + L2 flush, or perf_counter on the CPU."""

    def __init__(self, device: torch.device, iters: int, warmup: int, flush_mb: int):
        self.device, self.iters, self.warmup = device, iters, warmup
        self.cuda = device.type == "cuda"
        self.flush = (torch.empty(flush_mb << 20, dtype=torch.uint8, device=device)
                      if self.cuda and flush_mb > 0 else None)

    def __call__(self, fn: Callable[[], object]) -> float:
        for _ in range(self.warmup):
            fn()
        if not self.cuda:
            times = []
            for _ in range(self.iters):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            return statistics.median(times)
        torch.cuda.synchronize(self.device)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(self.iters)]
        for start, end in events:
            if self.flush is not None:
                self.flush.zero_()  # evict the weights from L2 (queued: hides the host launch overhead too)
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(self.device)
        return statistics.median(s.elapsed_time(e) for s, e in events) * 1e-3


def copy_bandwidth(device: torch.device, mib: int, iters: int = 10) -> float:
    """Device-to-device copy bandwidth in 1e9 bytes/s, counted as 2 * size / median time."""
    nbytes = mib << 20
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    timer = Timer(device, iters=iters, warmup=2, flush_mb=0)
    seconds = timer(lambda: dst.copy_(src))
    del src, dst
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return 2 * nbytes / seconds / 1e9


# ------------------------------------------------------------------------------------------------
# problems
# ------------------------------------------------------------------------------------------------
def random_tensors(spec: LinearSpec, g: torch.Generator, device: torch.device) -> dict[str, torch.Tensor]:
    """Random checkpoint tensors of the layer: the format's own example when it has one (trellis:
    +-1 signs), else integer tensors uniform over their dtype's bits (any bit pattern is a valid
    packed code) and float tensors (codebooks, scales) ~ N(0, 0.02^2)."""
    example = get_format(spec.format).example_tensors(spec.params, spec.out_features, spec.in_features, g)
    if example is not None:
        return {k: v.to(device) for k, v in example.items()}
    out = {}
    for name, ts in spec.tensors().items():
        if ts.dtype.is_floating_point:
            out[name] = (torch.randn(ts.shape, generator=g, device=device) * 0.02).to(ts.dtype)
        else:
            info = torch.iinfo(ts.dtype)
            out[name] = torch.randint(info.min, info.max, ts.shape, generator=g, device=device, dtype=torch.int64
                                      ).to(ts.dtype)
    return out


def kernel_call(spec: LinearSpec, tensors: dict, x: torch.Tensor, kernel: str | None = None
                ) -> tuple[Callable[[], torch.Tensor], str]:
    """(the call of the layer's kernel on x, its path label); ``kernel`` forces one by name."""
    k = choose_kernel(spec, x.device, x.dtype, prefer=kernel)
    runtime = k.prepare(tensors)
    return (lambda: k.apply(runtime, x)), k.path(x)


def reference_output(spec: LinearSpec, tensors: dict, x: torch.Tensor) -> torch.Tensor:
    """What the kernel must compute, in float32: the format's reference matmul (its spec) on x in
    float32 -- ``x @ W_hat.T`` for weight-only formats, activation quantization included for w4a4."""
    return get_format(spec.format).matmul(x.float(), tensors, spec.params, spec.in_features)


# ------------------------------------------------------------------------------------------------
# output
# ------------------------------------------------------------------------------------------------
def git_commit() -> dict:
    def git(*a: str) -> str:
        return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, check=True,
                              timeout=10).stdout.strip()
    try:
        return {"git_commit": git("rev-parse", "HEAD"),
                "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.SubprocessError):
        return {"git_commit": None, "git_dirty": None}


def device_description(device: torch.device) -> str:
    if device.type != "cuda":
        return "cpu"
    p = torch.cuda.get_device_properties(device)
    return f"{p.name} (sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB)"


def run_provenance(device: torch.device, argv: list[str]) -> dict:
    prov = provenance()
    prov["command"] = "python benchmarks/kernels.py" + ("" if not argv else " " + shlex.join(argv))
    prov.update(git_commit())
    if device.type == "cuda":
        try:
            import triton

            triton_version = triton.__version__
        except ImportError:
            triton_version = None
        prov["machine"] = (f"{device_description(device)}, CUDA {torch.version.cuda}, "
                           f"triton {triton_version}; host {platform.machine()}")
    return prov


def plot(doc: dict, path: Path) -> Path:
    """PNG: speedup vs fp16 against batch, one panel per shape, one line per format + bits."""
    import matplotlib

    matplotlib.use("Agg")  # headless
    import matplotlib.pyplot as plt

    rows = [r for r in doc["rows"] if r["speedup_vs_fp16"] is not None]
    shapes = list(dict.fromkeys((r["shape"], r["n"], r["k"]) for r in doc["rows"]))
    fig, axes = plt.subplots(1, max(len(shapes), 1), figsize=(4.2 * max(len(shapes), 1), 3.8),
                             squeeze=False, sharey=True)
    for ax, (label, n, k) in zip(axes[0], shapes):
        for i, fmt in enumerate(sorted({r["format"] for r in rows})):
            for bits in sorted({r["bits"] for r in rows if r["format"] == fmt}):
                pts = sorted((r["batch"], r["speedup_vs_fp16"]) for r in rows
                             if r["shape"] == label and r["format"] == fmt and r["bits"] == bits)
                if pts:
                    ax.plot(*zip(*pts), marker="os^D"[i % 4], linestyle=("-", "--", ":", "-.")[i % 4],
                            label=f"{fmt} {bits}-bit")
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_xscale("log", base=2)
        batches = sorted({r["batch"] for r in doc["rows"]})
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.minorticks_off()
        ax.set_title(f"{n} x {k}" if label == f"{n}x{k}" else f"{label}: {n} x {k}", fontsize=10)
        ax.set_xlabel("batch (rows of x)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("speedup vs dense F.linear")
    if axes[0][-1].get_legend_handles_labels()[0]:
        axes[0][-1].legend(fontsize=8)
    dev = doc["rows"][0]["device"] if doc["rows"] else "?"
    dt = doc["rows"][0]["dtype"] if doc["rows"] else "?"
    fig.suptitle(f"quantized matmul vs dense ({dt}), {dev}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--formats", nargs="+", default=None,
                    help="registered formats, comma or space separated (default: every format a Triton kernel serves)")
    ap.add_argument("--bits", nargs="+", default=["2", "3", "4"])
    ap.add_argument("--batches", nargs="+", default=["1", "2", "4", "8", "16"])
    ap.add_argument("--shapes", nargs="+", default=list(LLAMA2_7B_SHAPES),
                    help=f"NxK (out x in) or a Llama-2-7B layer: {', '.join(LLAMA2_7B_SHAPES)}")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp16", help="dtype of x, y and the dense baseline")
    ap.add_argument("--group-size", type=int, default=128,
                    help="inputs per scale group, for formats with groups (-1: per channel)")
    ap.add_argument("--kernel", default=None, help="time this kernel by name (default: the one chosen per layer)")
    ap.add_argument("--iters", type=int, default=50, help="timed calls per configuration (median)")
    ap.add_argument("--warmup", type=int, default=10, help="untimed calls first")
    ap.add_argument("--flush-mb", type=int, default=256, help="MiB written before every timed call to flush L2")
    ap.add_argument("--copy-mb", type=int, default=None, help="MiB of the copy-bandwidth probe (default 1024; CPU 64)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help=f"JSON path (default {DEFAULT_OUT.relative_to(ROOT)}); "
                    "the PNG goes next to it")
    ap.add_argument("--allow-cpu", action="store_true",
                    help="without CUDA, time the reference path on the CPU (smoke test only; needs --out)")
    return ap


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = build_parser()
    args = ap.parse_args(argv)
    try:
        args.formats = split_list(args.formats) if args.formats else default_formats()
        args.bits = [int(b) for b in split_list(args.bits)]
        args.batches = [int(b) for b in split_list(args.batches)]
        args.shapes = [parse_shape(s) for s in split_list(args.shapes)]
    except (ValueError, argparse.ArgumentTypeError) as e:
        ap.error(str(e))
    for fmt in args.formats:
        if fmt not in format_names():
            ap.error(f"unknown format {fmt!r}; expected {', '.join(format_names())}")
        bad = [b for b in args.bits if not supports_bits(fmt, b)]
        if bad:
            ap.error(f"{fmt} does not support bits {bad}")
    if not args.formats or not args.bits or not args.batches or not args.shapes:
        ap.error("--formats, --bits, --batches and --shapes must not be empty")
    if min(args.batches) < 1 or args.iters < 1 or args.warmup < 0 or args.flush_mb < 0:
        ap.error("batches and --iters must be >= 1, --warmup and --flush-mb >= 0")
    if args.group_size != -1 and args.group_size < 1:
        ap.error("--group-size must be -1 (per channel) or >= 1")
    return args


def default_formats() -> list[str]:
    """Formats some registered Triton kernel serves (the GPU kernels this script is for)."""
    from gq_kernels.kernel import TritonKernel
    from gq_kernels.registry import kernels

    served = {f for k in kernels() if issubclass(k, TritonKernel) for f in (k.formats or ())}
    return sorted(served & set(format_names()))


def main(argv: list[str] | None = None, call=None) -> int:
    """Run the benchmark; ``call(spec, tensors, x) -> (fn, path)`` replaces :func:`kernel_call`
    (tests pass stand-ins)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if torch.cuda.is_available():
        device = torch.device("cuda")
    elif args.allow_cpu:
        device = torch.device("cpu")
        if args.out is None:
            print("error: on the CPU give --out explicitly: CPU timings are a smoke test and are never "
                  f"written to {DEFAULT_OUT.relative_to(ROOT)} by default", file=sys.stderr)
            return 2
    else:
        print("error: no CUDA device. benchmarks/kernels.py measures the GPU kernels and needs a GPU; "
              "pass --allow-cpu --out PATH to smoke-test the reference path on the CPU (numbers "
              "meaningless)", file=sys.stderr)
        return 2
    out = args.out or DEFAULT_OUT
    call_of = call or (lambda spec, tensors, x: kernel_call(spec, tensors, x, args.kernel))
    dtype = DTYPES[args.dtype]
    tol = TOLERANCE[args.dtype]
    dev_name = device_description(device)
    copy_mib = args.copy_mb or (1024 if device.type == "cuda" else 64)

    torch.manual_seed(args.seed)
    g = torch.Generator(device=device).manual_seed(args.seed)
    copy_gbps = copy_bandwidth(device, copy_mib)
    print(f"{dev_name}: device-to-device copy {copy_gbps:.1f} GB/s ({copy_mib} MiB, 2 x bytes / time)", flush=True)
    timer = Timer(device, iters=args.iters, warmup=args.warmup, flush_mb=args.flush_mb)

    rows: list[dict] = []
    failed: list[str] = []
    total = len(args.shapes) * len(args.bits) * len(args.formats) * len(args.batches)
    done = 0
    for label, n, k in args.shapes:
        xs = {b: torch.randn(b, k, generator=g, device=device).to(dtype) for b in args.batches}
        w_dense = (torch.randn(n, k, generator=g, device=device) * 0.02).to(dtype)
        fp16_s = {b: timer(lambda x=xs[b]: F.linear(x, w_dense)) for b in args.batches}
        del w_dense
        for bits in args.bits:
            for fmt in args.formats:
                params, group_size = format_params(fmt, bits, args.group_size)
                try:
                    get_format(fmt).check_shape(params, n, k)
                except ValueError as e:  # e.g. trellis needs Hadamard sizes: not a kernel failure
                    done += len(args.batches)
                    print(f"{fmt} {bits}-bit {label} ({n}x{k}): skipped, the format cannot hold it ({e})", flush=True)
                    continue
                spec = LinearSpec(params, n, k)
                tensors = random_tensors(spec, g, device)
                for batch in args.batches:
                    done += 1
                    x = xs[batch]
                    path = None
                    try:
                        fn, path = call_of(spec, tensors, x)
                        y = fn()
                        error = None if y.dtype == dtype else f"output dtype {y.dtype}, expected {dtype}"
                        err = max_rel_err(y, reference_output(spec, tensors, x)) if error is None else math.inf
                    except Exception as e:  # a kernel that cannot run this shape is a failed row, not a lost run
                        error, err = f"{type(e).__name__}: {e}"[:500], math.inf
                    ok = err <= tol
                    seconds = timer(fn) if ok else None
                    row = make_row(device=dev_name, fmt=fmt, bits=bits, batch=batch, n=n, k=k, dtype=args.dtype,
                                   group_size=group_size, shape=label,
                                   us=None if seconds is None else seconds * 1e6,
                                   fp16_us=fp16_s[batch] * 1e6 if ok else None,
                                   copy_gbps=copy_gbps, max_rel_err=err, tolerance=tol,
                                   path=path, error=error)
                    rows.append(row)
                    what = f"[{done}/{total}] {fmt} {bits}-bit {label} ({n}x{k}) batch {batch} [{row['path']}]"
                    if ok:
                        print(f"{what}: {row['us']:.1f} us, {row['gbps']:.4g} GB/s ({row['pct_copy_bw']:.3g}% of "
                              f"copy), {row['speedup_vs_fp16']:.2f}x vs dense, err {err:.1e}", flush=True)
                    else:
                        failed.append(what)
                        print(f"{what}: CHECK FAILED (max_rel_err {err:.3g} > {tol}"
                              + (f"; {error}" if error else "") + "); not timed", flush=True)
                del tensors
        if device.type == "cuda":
            torch.cuda.empty_cache()

    doc = {
        "provenance": run_provenance(device, argv),
        "device": dev_name,
        "copy_gbps": round(copy_gbps, 2),
        "copy_mib": copy_mib,
        "settings": {"iters": args.iters, "warmup": args.warmup, "statistic": "median",
                     "timer": "cuda events" if device.type == "cuda" else "time.perf_counter (reference path)",
                     "l2_flush_mib": args.flush_mb if device.type == "cuda" else 0,
                     "dtype": args.dtype, "group_size": args.group_size, "tolerance": tol, "seed": args.seed},
        "conventions": CONVENTIONS,
        "rows": rows,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, doc)
    png = plot(doc, out.with_suffix(".png"))
    print(f"wrote {out} and {png}")
    if failed:
        print(f"error: {len(failed)} configuration(s) failed the correctness check:\n  " + "\n  ".join(failed),
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
