"""vLLM decode speed on the CPU: SmolLM2 fp16 vs its LNQ+GuidedQuant checkpoints, through our plugin.

    ~/.cache/gq-dev/vllm-venv/bin/python scripts/bench_e2e_vllm_cpu.py [--threads 2] [--eager]
        -> engine "vllm" CPU rows of docs/results/e2e.json (the "hf" rows are kept)

The vLLM counterpart of scripts/bench_e2e_cpu.py, with the same protocol: batch 1, the same prompt
(gq_serve.bench.DEFAULT_PROMPT, tokenized by the model's tokenizer, sent as token ids), exactly 100
new tokens (greedy, EOS ignored), one warm-up run, median of 3 timed runs, fp16 and the
LNQ+GuidedQuant (g=4) checkpoints in one invocation of this script. Differences, forced by vLLM:

* Each model runs in its own child process (``--worker``), one after another: vLLM's CPU engine does
  not tear down reliably within one process, and the child owns the ``if __name__ == "__main__"``
  guard that vLLM's spawned engine-core process needs.
* ``tok_s`` is decode only, like the hf rows: tokens 2..N over the engine core's time between the
  first and the last token (``RequestOutput.metrics``: first_token_ts, last_token_ts), so the prefill
  step is excluded. ``e2e_tok_s`` is N tokens over the wall time of the whole ``LLM.generate`` call
  (prefill, scheduling and the frontend <-> engine-core round trips included).
* fp16 is the unquantized model in vLLM's own linear layers (on the CPU a oneDNN handle per
  weight, fp32); the checkpoints load through ``quantization="guidedquant"``, whose linear method
  chooses the same packed CPU kernels as the embedded engine (``kernels`` in the row: e.g.
  ``lut-cpu-avx512``), reading the packed tensors in place. ``rss_mb`` is the vLLM worker process's
  resident memory after the timed runs (``baseline_rss_mb``: the fp16 model's worker).
* The worker's OpenMP threads are pinned to cores 0..threads-1 with none reserved (vLLM warns that
  it wants one core for its frontend): the hf rows' core count, shared with vLLM's engine-core and
  frontend processes. Such a worker slows down ~3x when another job takes a core, so each model
  waits for a quiet machine and is re-run when other jobs loaded the cores during its timed runs.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

NEW_TOKENS = 100
RUNS = 3
WARMUP = 1
MODEL = "SmolLM2-135M-Instruct"
ENGINE = "vllm"
WORKER_TIMEOUT_S = 1800  # model load + (compiled mode) Inductor on 2 busy cores


# ============================================================================================ rows
def merge_rows(old: list[dict], new: list[dict], engine: str = ENGINE) -> list[dict]:
    """``old`` without its CPU rows of ``engine`` from the dates of ``new``, then ``new``: other engines',
    GPU rows and earlier days' runs are kept (the record of what was measured when; a re-run on the
    same day replaces that day's rows)."""
    dates = {r.get("date") for r in new}
    keep = [r for r in old if not (r.get("engine") == engine and str(r.get("device", "")).startswith("CPU")
                                   and r.get("date") in dates)]
    return keep + list(new)


def make_rows(results: dict[str, dict], device: str, extra: dict) -> list[dict]:
    """Worker results (label -> timings) -> e2e.json rows; the label "fp16" is the baseline."""
    fp16 = results["fp16"]["tok_s"]
    rows = []
    for label, r in results.items():
        is_fp16 = label == "fp16"
        fmt = label.rstrip("0123456789")
        rows.append({
            "device": device, "engine": ENGINE, "model": MODEL, "format": "fp16" if is_fp16 else fmt,
            "bits": 16 if is_fp16 else int(label[len(fmt):]), "batch": 1, "new_tokens": NEW_TOKENS,
            "tok_s": round(r["tok_s"], 1), "fp16_tok_s": round(fp16, 1), "ratio": round(r["tok_s"] / fp16, 3),
            "e2e_tok_s": round(r["e2e_tok_s"], 1), "tok_s_runs": [round(x, 2) for x in r["tok_s_runs"]],
            "e2e_tok_s_runs": [round(x, 2) for x in r["e2e_tok_s_runs"]], "prompt_tokens": r["prompt_tokens"],
            "other_cpu_load": round(r["other_cpu_load"], 2), "attempts": r["attempts"],
            "compute_dtype": "float32", "vllm": r["vllm"], "vllm_worker_torch_threads": r["worker_threads"],
            **{k: r[k] for k in ("kernels", "rss_mb", "cpu_model", "cpu_flags") if k in r},
            **({"baseline_rss_mb": results["fp16"]["rss_mb"]} if "rss_mb" in results["fp16"] else {}),
            **extra,
        })
    return rows


# ============================================================================================ worker
def _machine_busy_s() -> float:
    from results_io import machine_busy_s  # scripts/ is on sys.path: this file's folder

    return machine_busy_s()


def _tree_cpu_s() -> float:
    """CPU seconds of this process and its children (vLLM's engine core and worker)."""
    import psutil

    me = psutil.Process()
    total = 0.0
    for p in [me] + me.children(recursive=True):
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def _worker_threads(model) -> int:
    """Runs inside vLLM's worker (``LLM.apply_model``): the torch threads it computes with."""
    import torch

    return torch.get_num_threads()


def _worker_state(model) -> dict:
    """Runs inside vLLM's worker: the kernels its quantized layers run and its resident memory."""
    kernels: dict[str, int] = {}
    for m in model.modules():
        k = getattr(m, "gq_kernel", None)
        if k is not None:
            kernels[k.name] = kernels.get(k.name, 0) + 1
    rss = next(int(line.split()[1]) / 1024 for line in Path("/proc/self/status").read_text().splitlines()
               if line.startswith("VmRSS:"))
    return {"kernels": kernels, "rss_mb": round(rss, 1)}


def worker_main(path: str, quantized: bool, eager: bool, out: str) -> None:
    """One model: load it in vLLM, warm up, time RUNS greedy generations, write the timings as JSON."""
    import vllm
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from gq_serve.bench import DEFAULT_PROMPT

    prompt_ids = AutoTokenizer.from_pretrained(path)(DEFAULT_PROMPT).input_ids  # as bench_offline does
    llm = LLM(
        model=path,
        quantization="guidedquant" if quantized else None,
        # float32, not bfloat16: on this AVX2 CPU (no AVX512-BF16/AMX) oneDNN refuses bf16 matmuls and
        # vLLM falls back to a slow F.linear; the hf rows are float32 too.
        dtype="float32",
        # Default: vLLM's compiled mode (torch.compile with Inductor; on the CPU no CUDA graphs), faster
        # than enforce_eager here (fp16: 24.2 vs 23.4 tok/s on 2 threads, 18.7 vs 15.9 on 1); the
        # compile (~45 s per model) happens at load, untimed.
        enforce_eager=eager,
        max_model_len=512,
        max_num_seqs=4,
        enable_prefix_caching=False,  # every timed run prefills the prompt, as in the hf engine
        disable_log_stats=False,  # fills RequestOutput.metrics (per-token engine-core timestamps)
        seed=0,
    )
    sp = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, detokenize=False)
    prompts = [TokensPrompt(prompt_token_ids=prompt_ids)]

    def once() -> dict:
        t0 = time.perf_counter()
        res = llm.generate(prompts, sp, use_tqdm=False)
        wall = time.perf_counter() - t0
        n = len(res[0].outputs[0].token_ids)
        if n != NEW_TOKENS:
            raise RuntimeError(f"generated {n} tokens, expected {NEW_TOKENS}")
        m = res[0].metrics
        decode_s = m.last_token_ts - m.first_token_ts
        return {"wall_s": wall, "decode_s": decode_s}

    for _ in range(WARMUP):
        once()
    busy0, tree0, t0 = _machine_busy_s(), _tree_cpu_s(), time.perf_counter()
    timings = [once() for _ in range(RUNS)]
    # Other people's jobs on the shared cores during the timed runs, in cores (0 = we were alone).
    other_cores = ((_machine_busy_s() - busy0) - (_tree_cpu_s() - tree0)) / (time.perf_counter() - t0)
    # Imported under its module name: vLLM pickles the function by reference and its engine-core
    # process re-imports __main__ as __mp_main__ (sys.path[0] is scripts/ in every process).
    import bench_e2e_vllm_cpu

    threads = llm.apply_model(bench_e2e_vllm_cpu._worker_threads)
    state = llm.apply_model(bench_e2e_vllm_cpu._worker_state)[0]
    from gq_kernels.cpu import features
    decode = [(NEW_TOKENS - 1) / t["decode_s"] for t in timings]
    e2e = [NEW_TOKENS / t["wall_s"] for t in timings]
    Path(out).write_text(json.dumps({
        "tok_s": statistics.median(decode), "tok_s_runs": decode,
        "e2e_tok_s": statistics.median(e2e), "e2e_tok_s_runs": e2e,
        "prompt_tokens": len(prompt_ids), "other_cpu_load": max(0.0, other_cores),
        "worker_threads": threads[0], "vllm": vllm.__version__, **state, **features.describe(),
    }))


# ============================================================================================ driver
def model_paths(bits: list[int], bcq: str = "", suffix: str = "", dirs: list[str] = ()) -> dict[str, Path]:
    """label -> checkpoint directory; ``dirs`` ("LABEL=NAME") names one label's directory under
    results/checkpoints instead of the name ``suffix`` makes."""
    from gq_serve.util import cache_root

    cache = cache_root()
    paths = {"fp16": cache / "models" / MODEL}
    for b in bits:
        paths[f"lut{b}"] = cache / "results" / "checkpoints" / f"lnq+gq4-{b}bit{suffix}"
    if bcq:  # a GPTQ checkpoint: bcq, its bits from the name (gptq-4bit -> bcq4)
        paths[f"bcq{bcq.split('-')[-1].removesuffix('bit')}"] = cache / "results" / "checkpoints" / f"{bcq}{suffix}"
    for item in dirs:
        label, _, name = item.partition("=")
        if label not in paths or not name:
            raise SystemExit(f"--dir {item!r}: give LABEL=NAME with LABEL one of {sorted(paths)}")
        paths[label] = cache / "results" / "checkpoints" / name
    return paths


def run_worker(label: str, path: Path, args, run_root: Path) -> dict:
    from gq_serve.vllm_launch import check_vllm_installed, vllm_env

    check_vllm_installed()
    env = vllm_env(run_dir=run_root / label)
    # One OpenMP thread per core 0..threads-1 for the worker, none reserved: the same core count as
    # the hf rows (vLLM's "auto" binding would keep a core for the frontend on this 2-core machine).
    env["VLLM_CPU_OMP_THREADS_BIND"] = f"0-{args.threads - 1}"
    env["VLLM_CPU_NUM_OF_RESERVED_CPU"] = "0"
    env["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # apply_model ships _worker_threads to the worker
    run_root.mkdir(parents=True, exist_ok=True)
    out = run_root / f"{label}.json"
    argv = [sys.executable, str(Path(__file__).resolve()), "--worker", label, str(path), str(out)]
    argv += ["--eager"] if args.eager else []
    t0 = time.time()
    r = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=WORKER_TIMEOUT_S)
    (run_root / f"{label}.log").write_text(r.stdout + r.stderr)
    if r.returncode != 0:
        raise SystemExit(f"{label}: vLLM worker failed ({r.returncode}), log {run_root / label}.log:\n"
                         f"{r.stderr[-4000:]}")
    res = json.loads(out.read_text())
    print(f"{label}: {res['tok_s']:.1f} tok/s decode, {res['e2e_tok_s']:.1f} tok/s e2e "
          f"({time.time() - t0:.0f} s in all, {res['worker_threads']} worker threads, "
          f"runs {[round(x, 1) for x in res['tok_s_runs']]}, other jobs' load {res['other_cpu_load']:.2f} cores)",
          flush=True)
    return res


def wait_for_quiet(max_load: float, max_wait_s: float, window_s: float = 5.0) -> float:
    """Block until the machine's other jobs use at most ``max_load`` cores over ``window_s`` (this
    driver is idle meanwhile), or ``max_wait_s`` passed; returns the last load seen."""
    deadline = time.monotonic() + max_wait_s
    while True:
        b0 = _machine_busy_s()
        time.sleep(window_s)
        load = (_machine_busy_s() - b0) / window_s
        if load <= max_load or time.monotonic() >= deadline:
            return load


def run_quiet(label: str, path: Path, args, run_root: Path) -> dict:
    """``run_worker`` until other jobs used at most --max-other-load cores during the timed runs (this
    machine is shared; an OpenMP worker on every core collapses when it loses one), at most --attempts
    times, each after waiting up to --quiet-wait s for a quiet machine; the attempt with the least
    foreign load is kept and its load stays in the row."""
    best = None
    for attempt in range(1, args.attempts + 1):
        if args.quiet_wait > 0:
            load = wait_for_quiet(args.max_other_load, args.quiet_wait)
            print(f"{label}: attempt {attempt}, other jobs' load before it {load:.2f} cores", flush=True)
        res = run_worker(label, path, args, run_root / f"try{attempt}")
        res["attempts"] = attempt
        if best is None or res["other_cpu_load"] < best["other_cpu_load"]:
            best = res
        if res["other_cpu_load"] <= args.max_other_load:
            break
    return best


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=2, help="cores 0..N-1 for vLLM's worker (VLLM_CPU_OMP_THREADS_BIND)")
    p.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4])
    p.add_argument("--bcq", default="gptq-4bit", help="a bcq (GPTQ) checkpoint under results/checkpoints ('' for none)")
    p.add_argument("--suffix", default="", help="of the checkpoint directories' names (e.g. -4x256)")
    p.add_argument("--dir", action="append", default=[], metavar="LABEL=NAME",
                   help="checkpoint directory under results/checkpoints for one label (lut2, bcq4, ...); repeatable")
    p.add_argument("--eager", action="store_true", help="enforce_eager instead of vLLM's compiled mode")
    p.add_argument("--attempts", type=int, default=3,
                   help="re-run a model whose timed runs shared the cores with other jobs (see --max-other-load)")
    p.add_argument("--max-other-load", type=float, default=0.25,
                   help="CPU cores other processes may use during the timed runs before a re-run")
    p.add_argument("--quiet-wait", type=float, default=900,
                   help="seconds to wait for other jobs to stop before each model (0: do not wait)")
    p.add_argument("--out", default=str(ROOT / "docs/results/e2e.json"))
    p.add_argument("--no-write", action="store_true", help="print the rows, leave the JSON alone")
    args = p.parse_args()

    import tempfile

    from results_io import provenance, write_json

    paths = model_paths(args.bits, args.bcq, args.suffix, args.dir)
    missing = [str(v) for v in paths.values() if not v.is_dir()]
    if missing:
        raise SystemExit(f"missing {missing}: run `gq prepare` and scripts/reproduce_quality.py first")
    run_root = Path(tempfile.mkdtemp(prefix="gq-bench-vllm-"))
    results = {label: run_quiet(label, path, args, run_root) for label, path in paths.items()}

    extra = provenance()
    extra["machine"] = (f"{platform.machine()} CPU ({os.cpu_count()} cores), vLLM worker: "
                        f"VLLM_CPU_OMP_THREADS_BIND=0-{args.threads - 1}, VLLM_CPU_NUM_OF_RESERVED_CPU=0")
    extra["vllm_mode"] = ("enforce_eager" if args.eager
                          else "compiled (CompilationMode.DYNAMO_TRACE_ONCE, Inductor; no CUDA graphs on the CPU)")
    extra["timing"] = ("tok_s: (new_tokens - 1) / (last_token_ts - first_token_ts) of the engine core, "
                       "prefill excluded, as the hf rows; e2e_tok_s: new_tokens / wall time of LLM.generate, "
                       f"prefill included; median of {RUNS} after {WARMUP} warm-up, each model in its own "
                       f"process started once other jobs use <= {args.max_other_load} cores (waiting at most "
                       f"{args.quiet_wait:.0f} s) and re-run (at most {args.attempts} attempts) while they used more "
                       f"during its timed runs; other_cpu_load: the kept attempt's, in cores")
    rows = make_rows(results, f"CPU ({platform.machine()}, {args.threads} threads)", extra)
    print(json.dumps(rows, indent=1))
    if not args.no_write:
        out = Path(args.out)
        old = json.loads(out.read_text()) if out.exists() else []
        write_json(out, merge_rows(old, rows))
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "--worker":
        a = sys.argv[2:]
        worker_main(a[1], quantized=a[0] != "fp16", eager="--eager" in a[3:], out=a[2])
        sys.exit(0)
    sys.exit(main())
