"""vLLM decode speed on a Llama-shaped model with random weights: dense fp16, our formats through the
plugin, and vLLM's own GPTQ, at several batch sizes, in one run.

Only a config.json is written (no weights): vLLM loads with ``load_format="dummy"``, which fills
floating-point parameters with small random values and leaves integer ones (packed codes) as
allocated; speed does not depend on the values. Each variant runs in its own child process (a fresh
engine, its GPU memory returned when it exits), one after another:

* ``fp16``: vLLM's unquantized layers;
* ``FORMAT:BITS`` (e.g. ``lut:3``): a GuidedQuant checkpoint config, loaded through our plugin
  (``quantization="guidedquant"``), bcq-style formats with ``--group-size``;
* ``gptq:BITS``: vLLM's GPTQ (group 128, symmetric, no act-order; vLLM picks its Marlin kernel on
  a GPU). CUDA only.

Per batch size B (B prompts of ``--prompt-tokens`` ids, ``--new-tokens`` greedy tokens each, EOS
ignored; one warm-up generate, median of ``--runs``): ``tok_s`` is one sequence's decode rate
(tokens 2..N over the engine core's time between its first and last token, prefill excluded, as the
embedded engine's rows), ``throughput_tok_s`` = B x N / wall time of the whole generate call.

    python benchmarks/vllm_random.py --shape llama2-7b --variants fp16,lut:3,gptq:4 --batches 1,8,32 --out /tmp/v.json
    python benchmarks/vllm_random.py --device cpu --shape tiny --variants fp16,lut:3 --batches 1,2 --out /tmp/v.json
"""
from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

from gq_serve.util import import_file

ROOT = Path(__file__).resolve().parents[1]
WORKER_TIMEOUT_S = 600


def _sibling(name: str):
    return import_file(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")


def write_model_dir(path: Path, shape: str, variant: str, group_size: int, dtype: str) -> str | None:
    """config.json of a Llama of ``shape`` for ``variant``; returns the ``quantization`` argument."""
    from transformers import LlamaConfig

    e2e = _sibling("e2e_random")
    config = LlamaConfig(**e2e.SHAPES[shape], tie_word_embeddings=False, architectures=["LlamaForCausalLM"],
                         bos_token_id=1, eos_token_id=2)
    config.torch_dtype = dtype
    quantization = None
    fmt, _, bits = variant.partition(":")
    if fmt == "gptq":
        config.quantization_config = {"quant_method": "gptq", "bits": int(bits), "group_size": 128,
                                      "desc_act": False, "sym": True, "checkpoint_format": "gptq"}
    elif fmt != "fp16":
        from gq_kernels.schema import QuantizationConfig

        params = e2e.parse_variant(variant, group_size)
        config.quantization_config = QuantizationConfig.for_export(params, ["lm_head"]).to_dict()
        quantization = "guidedquant"
    path.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(path)
    return quantization


def worker_main(spec: dict) -> None:
    """One variant in a fresh vLLM engine: time every batch size, write the rows as JSON."""
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    cuda = spec["device"] == "cuda"
    kwargs = dict(model=spec["model_dir"], quantization=spec["quantization"], load_format="dummy",
                  skip_tokenizer_init=True, dtype=spec["dtype"], max_model_len=spec["max_model_len"],
                  max_num_seqs=max(spec["batches"]), enable_prefix_caching=False, disable_log_stats=False, seed=0)
    if cuda:
        kwargs.update(gpu_memory_utilization=0.5, compilation_config={"cudagraph_capture_sizes": sorted(spec["batches"])})
    else:
        kwargs.update(enforce_eager=True)
    t0 = time.perf_counter()
    llm = LLM(**kwargs)
    load_s = time.perf_counter() - t0
    n = spec["new_tokens"]
    sp = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, detokenize=False)
    rows = []
    for b in spec["batches"]:
        prompts = [TokensPrompt(prompt_token_ids=[3 + i % 100] + list(range(4, 3 + spec["prompt_tokens"])))
                   for i in range(b)]

        def once() -> tuple[float, float | None]:
            t = time.perf_counter()
            res = llm.generate(prompts, sp, use_tqdm=False)
            wall = time.perf_counter() - t
            if any(len(r.outputs[0].token_ids) != n for r in res):
                raise RuntimeError(f"a sequence did not generate {n} tokens")
            m = getattr(res[0], "metrics", None)
            first, last = getattr(m, "first_token_ts", None), getattr(m, "last_token_ts", None)
            return wall, (None if not first or not last else (n - 1) / (last - first))

        once()
        timed = [once() for _ in range(spec["runs"])]
        walls = [w for w, _ in timed]
        rates = [r for _, r in timed if r is not None]
        rows.append({"batch": b, "tok_s": round(statistics.median(rates), 2) if rates else None,
                     "tok_s_runs": [round(r, 2) for r in rates],
                     "throughput_tok_s": round(b * n / statistics.median(walls), 1),
                     "load_s": round(load_s, 1), "vllm": vllm.__version__})
    Path(spec["out"]).write_text(json.dumps(rows))


def run_variant(variant: str, args, tmp: Path) -> list[dict]:
    from gq_serve.vllm_launch import vllm_env

    model_dir = tmp / variant.replace(":", "-")
    dtype = "float16" if args.device == "cuda" else "float32"
    quantization = write_model_dir(model_dir, args.shape, variant, args.group_size, dtype)
    spec = {"model_dir": str(model_dir), "quantization": quantization, "device": args.device, "dtype": dtype,
            "batches": args.batches, "new_tokens": args.new_tokens, "prompt_tokens": args.prompt_tokens,
            "runs": args.runs, "max_model_len": args.prompt_tokens + args.new_tokens + 16,
            "out": str(tmp / f"{model_dir.name}.json")}
    env = vllm_env(run_dir=tmp / f"run-{model_dir.name}")
    r = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], env=env, timeout=WORKER_TIMEOUT_S)
    if r.returncode != 0:
        raise RuntimeError(f"vLLM worker for {variant} exited with {r.returncode}")
    fmt, _, bits = variant.partition(":")
    rows = json.loads(Path(spec["out"]).read_text())
    for row in rows:
        row.update(engine="vllm", model=f"{args.shape} (random weights)", variant=variant,
                   format=fmt if fmt != "fp16" else "fp16", bits=int(bits) if bits else 16,
                   new_tokens=args.new_tokens, compute_dtype=dtype)
    return rows


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--worker"]:
        worker_main(json.loads(argv[1]))
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--shape", default="llama2-7b", help="a shape of benchmarks/e2e_random.py")
    ap.add_argument("--variants", default="fp16,lut:3,gptq:4", help="comma list; the first is the ratio's baseline")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=100)
    ap.add_argument("--prompt-tokens", type=int, default=5)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    args.batches = [int(b) for b in args.batches.split(",") if b]
    variants = [v for v in args.variants.split(",") if v]
    if args.device == "cpu" and any(v.startswith("gptq") for v in variants):
        ap.error("gptq variants need CUDA (vLLM's GPTQ kernels)")
    import torch

    device = _sibling("e2e_random").device_name(torch.device(args.device))
    rows: list[dict] = []
    prov = {"date": date.today().isoformat(), "command": "python benchmarks/vllm_random.py " + shlex.join(argv)}
    with tempfile.TemporaryDirectory(prefix="gq-vllm-random-") as tmp:
        for variant in variants:
            rows += [{"device": device, **r} for r in run_variant(variant, args, Path(tmp))]
            base = {r["batch"]: r for r in rows if r["variant"] == variants[0]}
            for r in rows:
                b = base.get(r["batch"])
                r.update(baseline=variants[0], fp16_tok_s=b and b["tok_s"], **prov,
                         ratio=round(r["tok_s"] / b["tok_s"], 3) if b and b["tok_s"] and r["tok_s"] else None)
            # Written after every variant: a stage that runs out of time keeps what it measured.
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({"provenance": prov, "rows": rows}, indent=1) + "\n")
            print(f"{variant}: " + ", ".join(f"batch {r['batch']}: {r['tok_s']} tok/s/seq, "
                                             f"{r['throughput_tok_s']} tok/s" for r in rows if r["variant"] == variant),
                  flush=True)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
