"""Memory and time of the calibration passes, in memory against layer-streamed -> docs/results/scale.json.

For each model and mode, a fresh Python process (so its peak resident memory is its own) builds the
GuidedQuant calibration cache (gradient pass + guided Hessians, g=4) into an empty directory:

* in_memory:        ``AutoModelForCausalLM.from_pretrained`` in fp32, both passes on the whole model;
* streamed:         ``StreamedModel`` (one decoder layer resident at a time), layer inputs in host memory;
* streamed_offload: the same with the layer inputs in files (``--offload-dir``).

Measured per row: ``seconds`` (wall time of model load + both passes), ``peak_device_mb`` (the
process's peak resident memory, ru_maxrss, minus its resident memory after importing torch and
transformers: on the CPU the "device" is the process's own memory, and everything the run holds
counts: weights, activations, autograd buffers, Hessian accumulators, parked layer inputs),
``peak_host_mb`` (the bytes parked outside the computation at their peak: layer inputs kept in host
memory by the streamed gradient pass, counted from the tensors; 0 in memory; on disk, not in
memory, with offload: ``offload_disk_mb``), and ``computed_device_mb`` (quantize/memory.py's
estimate for the same settings, to compare). The machine is shared: ``other_load_cores`` says how
many cores other jobs kept busy meanwhile.

    python scripts/measure_scale.py --make-1b DIR         # a random Llama-shaped ~1.1B model (fp16)
    python scripts/measure_scale.py --model smollm2 --model DIR --n 2 --seq-len 128
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_io import OtherLoad, provenance, write_json  # noqa: E402

OUT = Path(__file__).resolve().parent.parent / "docs" / "results" / "scale.json"
MODES = ("in_memory", "streamed", "streamed_offload")


def rss_mb() -> float:
    """Current resident memory of this process (MB, from /proc/self/statm)."""
    import os

    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 1e6


def make_1b(out: Path) -> None:
    """A random LlamaForCausalLM with TinyLlama-1.1B's shape, saved in fp16 (2.2 GB)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                      num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048,
                      tie_word_embeddings=False, architectures=["LlamaForCausalLM"])
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).to(torch.float16).save_pretrained(out)


def one(model_dir: Path, mode: str, n: int, seq_len: int, groups: int) -> dict:
    """Run in a child process: build the cache once in ``mode``; returns the row."""
    import torch
    from transformers import AutoModelForCausalLM

    from gq_quantize.calibration import CalibrationCache
    from gq_quantize.calibration import streamed as streamed_mod
    from gq_quantize.calibration.streamed import StreamedModel
    base = rss_mb()
    parked = {"now": 0, "peak": 0}
    disk = {"now": 0, "peak": 0}
    put, pop = streamed_mod.ActivationStore.put, streamed_mod.ActivationStore.pop

    def counting_put(self, idx, hidden):  # count what the streamed pass parks, where
        where = disk if self.dir is not None else parked
        where["now"] += hidden.numel() * hidden.element_size()
        where["peak"] = max(where["peak"], where["now"])
        put(self, idx, hidden)

    def counting_pop(self, idx):
        hidden = pop(self, idx)
        (disk if self.dir is not None else parked)["now"] -= hidden.numel() * hidden.element_size()
        return hidden

    streamed_mod.ActivationStore.put, streamed_mod.ActivationStore.pop = counting_put, counting_pop
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    windows = torch.randint(0, vocab, (n, seq_len), generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as tmp, OtherLoad() as load:
        t0 = time.perf_counter()
        sm = None
        if mode == "in_memory":
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        else:
            sm = StreamedModel(model_dir)
            model = sm.model
        CalibrationCache.open_or_build(Path(tmp), model, model_dir, windows, groups=groups, need_guided=True,
                                       need_fisher=False, progress=False, streamed=sm,
                                       offload_dir=Path(tmp) / "offload" if mode == "streamed_offload" else None)
        seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3  # KB on Linux
    computed = computed_mb(model_dir, mode, n, seq_len, groups)
    return {"model": model_dir.name, "mode": mode, "peak_device_mb": round(peak - base),
            "peak_host_mb": round(parked["peak"] / 1e6), "offload_disk_mb": round(disk["peak"] / 1e6),
            "seconds": round(seconds, 1), "computed_device_mb": computed,
            "baseline_rss_mb": round(base), "n_windows": n, "seq_len": seq_len, "groups": groups,
            "torch_threads": torch.get_num_threads(), "other_load_cores": load.cores}


def computed_mb(model_dir: Path, mode: str, n: int, seq_len: int, groups: int) -> int:
    """quantize/memory.py's need for this run: device + host of its largest pass (one memory on the CPU)."""
    from gq_quantize.memory import Settings, model_shape, needs

    plan = needs(model_shape(str(model_dir)), Settings(n_samples=n, seq_len=seq_len, groups=groups, guided=True,
                                                       offload=mode == "streamed_offload"))
    key = "in_memory" if mode == "in_memory" else "streamed"
    return round(max(p[key]["device"] + p[key]["host"] for p in plan.values()) / 1e6)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--make-1b", type=Path, default=None, metavar="DIR")
    p.add_argument("--model", action="append", default=[], help="model directory or smollm2 (repeatable)")
    p.add_argument("--mode", action="append", default=None, choices=MODES)
    p.add_argument("--n", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--groups", type=int, default=4)
    p.add_argument("--one", nargs=2, metavar=("DIR", "MODE"), help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--recompute", action="store_true",
                   help="only rewrite computed_device_mb of the stored rows from quantize/memory.py as it is now")
    args = p.parse_args()
    if args.recompute:
        from gq_serve.util import cache_root

        data = json.loads(args.out.read_text())
        for row in data["rows"]:
            d = cache_root() / "models" / row["model"]
            d = d if d.is_dir() else cache_root() / "scale" / row["model"]
            row["computed_device_mb"] = computed_mb(d, row["mode"], row["n_windows"], row["seq_len"], row["groups"])
        write_json(args.out, data)
        return
    if args.make_1b:
        make_1b(args.make_1b)
        return
    if args.one:
        print(json.dumps(one(Path(args.one[0]), args.one[1], args.n, args.seq_len, args.groups)))
        return
    from gq_serve.util import cache_root

    old = json.loads(args.out.read_text()) if args.out.exists() else {}
    rows = old.get("rows", [])
    for spec in args.model:
        model_dir = cache_root() / "models/SmolLM2-135M-Instruct" if spec == "smollm2" else Path(spec)
        for mode in args.mode or MODES:
            proc = subprocess.run([sys.executable, __file__, "--one", str(model_dir), mode, "--n", str(args.n),
                                   "--seq-len", str(args.seq_len), "--groups", str(args.groups)],
                                  capture_output=True, text=True)
            if proc.returncode:
                sys.exit(f"{model_dir.name} {mode} failed:\n{proc.stderr[-3000:]}")
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            print(json.dumps(row), flush=True)
            rows = [r for r in rows if (r["model"], r["mode"]) != (row["model"], row["mode"])] + [row]
            note = " ".join(__doc__.split("\n\n")[1:4]).replace("\n", " ")
            write_json(args.out, {**old, **provenance(), "note": note, "rows": rows})  # keeps "commands"


if __name__ == "__main__":
    main()
