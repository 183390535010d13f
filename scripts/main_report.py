"""The report that ends `scripts/main.sh`: the quantized model against fp16, measured in that run.

    python scripts/main_report.py OUT_DIR [--fp16 MODEL_DIR]

Reads what main.sh wrote into OUT_DIR (eval.json and eval_fp16.json from `gq eval`, bench.json
from `gq bench offline fp16=... quantized=...`, chat.json from the server) and prints one table:
size on disk, perplexity on held-out text, decode tok/s, and the answer to the chat question.
Also written as OUT_DIR/report.json.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def weights_bytes(d: Path) -> int:
    """Bytes of the weight files (safetensors) of a model directory."""
    return sum(p.stat().st_size for p in d.iterdir() if p.is_file() and p.suffix == ".safetensors")


def _mb(n: int) -> str:
    return f"{n / 1e6:.0f} MB"


def build_report(out: Path, fp16_dir: Path) -> dict:
    qeval = {r["eval_data"]: r["ppl"] for r in json.loads((out / "eval.json").read_text())}
    feval = {r["eval_data"]: r["ppl"] for r in json.loads((out / "eval_fp16.json").read_text())}
    bench = {r["label"]: r for r in json.loads((out / "bench.json").read_text())["rows"]}
    chat = json.loads((out / "chat.json").read_text())
    qc = json.loads((out / "config.json").read_text()).get("quantization_config", {})
    return {
        "checkpoint": str(out),
        "method": qc.get("method"), "bits": qc.get("bits"), "guided": qc.get("guided"), "groups": qc.get("groups"),
        "sequential": qc.get("sequential", False),
        "size_bytes": weights_bytes(out), "fp16_size_bytes": weights_bytes(fp16_dir),
        "ppl": qeval, "fp16_ppl": feval,
        "tok_s": bench["quantized"]["tok_per_s"], "fp16_tok_s": bench["fp16"]["tok_per_s"],
        "bench_device": bench["quantized"]["device"], "bench_dtype": bench["quantized"]["dtype"],
        "question": chat["question"], "answer": chat["answer"],
    }


def render(r: dict) -> str:
    what = f"{r['method']}{' + GuidedQuant g=' + str(r['groups']) if r['guided'] else ''}, {r['bits']}-bit" + (
        ", sequential calibration" if r["sequential"] else "")
    rows = [("weights on disk", _mb(r["size_bytes"]), _mb(r["fp16_size_bytes"]),
             f"{r['size_bytes'] / r['fp16_size_bytes']:.2f}x")]
    for spec, ppl in r["ppl"].items():
        f = r["fp16_ppl"][spec]
        rows.append((f"perplexity, {spec} (lower is better)", f"{ppl:.2f}", f"{f:.2f}", f"{ppl / f:.2f}x"))
    rows.append((f"decode tok/s, batch 1 ({r['bench_device']}, {r['bench_dtype']})", f"{r['tok_s']:.1f}",
                 f"{r['fp16_tok_s']:.1f}", f"{r['tok_s'] / r['fp16_tok_s']:.2f}x"))
    w = [max(len(x[i]) for x in rows + [("", "quantized", "fp16", "ratio")]) for i in range(4)]
    lines = [f"== gq-serve report: {what} ==", "",
             f"{'':<{w[0]}}  {'quantized':>{w[1]}}  {'fp16':>{w[2]}}  {'ratio':>{w[3]}}"]
    lines += [f"{a:<{w[0]}}  {b:>{w[1]}}  {c:>{w[2]}}  {d:>{w[3]}}" for a, b, c, d in rows]
    lines += ["", f"Q: {r['question']}", f"A: {r['answer']}", "",
              "fp16 is the model dequantized from its GGUF (SmolLM2: Q4_1), so it is itself a 4-bit model in",
              "fp16 storage. Weights on disk: the decoder linears are quantized, the (tied) embeddings and the",
              "norms stay fp16. Perplexity: context 512, last 8192 tokens of each held-out text. Decode: the",
              "embedded engine, batch 1, 100 new tokens, median of 3 runs after a warm-up; both models measured",
              "in this run on this machine (a shared machine makes the ratio noisy)."]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("out", type=Path)
    p.add_argument("--fp16", type=Path, required=True, help="the fp16 model directory")
    args = p.parse_args()
    report = build_report(args.out, args.fp16)
    (args.out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    print(render(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
