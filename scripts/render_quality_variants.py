"""Tables of docs/results/quality_variants.json (scripts/quality_variants.py) for docs/results.md.

Used by scripts/render_results.py; every table says that "fp16" is a dequantized GGUF model.
"""
from __future__ import annotations

import json
from pathlib import Path

FP16_NOTE = ("\"fp16\" is not an original fp16 model: it is the {model} GGUF ({gguf}) dequantized to "
             "fp16, i.e. itself a 4-bit model stored in fp16.")
GGUF = {"SmolLM2-135M-Instruct": "Q4_1", "gemma-3-270m": "Q4_K_M"}
PROTOCOLS = {"last32x512": "last 32 x 512 tokens", "last16x512": "last 16 x 512 tokens"}

# variant -> (label, what it is)
LABELS = {
    "fp16": "fp16 (dequantized GGUF)",
    "gptq": "GPTQ, asym, fp16-model Hessians (the cached pass)",
    "gptq-sym": "GPTQ, sym, cached Hessians",
    "gptq-act": "GPTQ, asym, act-order, cached Hessians",
    "gptq-act-mse": "GPTQ, asym, act-order, grid search, cached Hessians",
    "gptq-seq": "GPTQ, asym, sequential",
    "gptq-seq-act": "GPTQ, asym, act-order, sequential",
    "gptq-seq-sym-act": "GPTQ, sym, act-order, sequential",
    "gptq-seq-act-damp0.1": "GPTQ, asym, act-order, damp 0.1, sequential",
    "gptq-seq-act-mse": "GPTQ, asym, act-order, grid search, sequential",
    "gptq-seq-sym-act-mse": "GPTQ, sym, act-order, grid search, sequential",
    "lnq": "LNQ, cached Hessians",
    "lnq-seq": "LNQ, sequential",
    "lnq-gq4": "LNQ + GuidedQuant g=4, cached Hessians",
    "lnq-gq4-seq": "LNQ + GuidedQuant g=4, sequential",
    "lnq-gq4-ft60": "LNQ + GuidedQuant g=4, cached Hessians, then 60 fine-tuning steps (`--finetune-steps 60`)",
    "lnq-gq4-ft60-bf16": "LNQ + GuidedQuant g=4, 60 fine-tuning steps in bfloat16 (`--finetune-precision bfloat16`)",
    "lnq-gq4-ft200": "LNQ + GuidedQuant g=4, 200 fine-tuning steps (bfloat16)",
    "lnq-gq4-ft200-norms": "LNQ + GuidedQuant g=4, 200 fine-tuning steps, norm gains too (`--finetune-norms`)",
    "lnq-gq4-ft200-w256": "LNQ + GuidedQuant g=4, 200 fine-tuning steps on 256 windows (`--finetune-windows 256`)",
    "lnq-gq4-shrink0.25": "LNQ + GuidedQuant g=4, `--guided-shrink 0.25`",
    "lnq-gq4-shrink0.5": "LNQ + GuidedQuant g=4, `--guided-shrink 0.5`",
    "lnq-gq4-shrink0.75": "LNQ + GuidedQuant g=4, `--guided-shrink 0.75`",
    "lnq-gq4-shrink0.5-ft200": "LNQ + GuidedQuant g=4, `--guided-shrink 0.5`, 200 fine-tuning steps",
    "qtip": "QTIP (HYB, plain Hessians)",
    "qtip-gq4": "QTIP + GuidedQuant g=4",
    "qtip-gq4-shrink0.5": "QTIP + GuidedQuant g=4, `--guided-shrink 0.5`",
    "w4a4-rtn": "W4A4KV4 RTN, no rotation (norms fused)",
    "w4a4-gptq": "W4A4KV4 GPTQ, no rotation",
    "w4a4-quarot": "W4A4KV4 GPTQ, random Hadamard R1/R2 (QuaRot-style)",
    "w4a4-spinquant": "W4A4KV4 SpinQuant (learned R1/R2, GPTQ)",
    "w4a4-spinquant-gq": "W4A4KV4 SpinQuant + GuidedQuant g=1",
    "w4a4-spinquant-b8": "W4A4KV4 SpinQuant, rotations learned at batch 8",
    "w4a4-spinquant-gq-b8": "W4A4KV4 SpinQuant (batch 8) + GuidedQuant g=1",
    "w4a4-quarot-a16kv16": "W4 only (activations and KV cache in float), random Hadamard R1/R2, GPTQ",
    "w4a4-quarot-a16": "W4KV4 (activations in float), random Hadamard R1/R2, GPTQ",
    "w4a4-quarot-kv16": "W4A4 (KV cache in float), random Hadamard R1/R2, GPTQ",
    "w4a4-quarot-seq": "W4A4KV4 random Hadamard R1/R2, sequential GPTQ (`--sequential`)",
    "w4a4-quarot-clip": "W4A4KV4 random Hadamard R1/R2, GPTQ, clip 0.9 (activations) / 0.95 (KV)",
    "w4a4-quarot-centred": "W4A4KV4 random Hadamard R1/R2, GPTQ, embeddings centred (`--center-embeddings`)",
    **{f"w4a4-quarot-clip{c}": f"W4A4KV4 random Hadamard R1/R2, GPTQ, clip {c} (activations) / 0.95 (KV)"
       for c in (0.7, 0.75, 0.8, 0.85, 0.95)},
    "w4a4-quarot-clip-kv0.9": "W4A4KV4 random Hadamard R1/R2, GPTQ, clip 0.9 (activations) / 0.9 (KV)",
    "w4a4-spinquant-gq-clip": "W4A4KV4 SpinQuant + GuidedQuant g=1, the defaults (clip 0.8 / 0.95); rotations "
                              "learned at batch 1, unclipped",
    "w4a4-spinquant-b8-def": "W4A4KV4 SpinQuant, the defaults (clip 0.8 / 0.95); rotations learned at batch 8 "
                             "under that clip",
    "w4a4-spinquant-gq-b8-def": "W4A4KV4 SpinQuant + GuidedQuant g=1, the defaults; rotations learned at batch 8 "
                                "under the clip",
    "w4a4-spinquant-gq-b8-g32": "W4A4KV4 SpinQuant + GuidedQuant g=1 (the same rotations), activations in groups "
                                "of 32 (`--act-group 32 --act-clip 0.9`)",
    **{f"w4a4-quarot-g{g}-clip{c}": f"W4A4KV4 random Hadamard R1/R2, GPTQ, activations in groups of {g} "
                                    f"(`--act-group {g}`), clip {c} / 0.95" for g in (32, 64) for c in (1.0, 0.9, 0.8)},
    "w4a4-spinquant-gq-g64": "W4A4KV4 SpinQuant + GuidedQuant g=1, activations in groups of 64 (`--act-group 64 "
                             "--act-clip 1.0`)",
    "w4a4-quarot-clip0.8-lin": "W4A4KV4 random Hadamard R1/R2, GPTQ, clip per linear by output error "
                               "(`--per-linear-act-clip`, from 0.8) / 0.95",
    "w4a4-quarot-g32-clip1.0-lin": "W4A4KV4 random Hadamard R1/R2, GPTQ, groups of 32, clip per linear by output "
                                   "error (`--per-linear-act-clip`, from 1.0) / 0.95",
    "w4a4-quarot-g32-clip1.0-lin8": "W4A4KV4 random Hadamard R1/R2, GPTQ, groups of 32, clip per linear measured on "
                                    "8 windows (`--per-linear-act-clip --act-clip-windows 8`)",
    "w4a4-spinquant-gq-b8-g32-clip1.0": "W4A4KV4 SpinQuant + GuidedQuant g=1, rotations learned at batch 8 under "
                                        "groups of 32 unclipped, served so (`--act-group 32 --act-clip 1.0`)",
    "w4a4-spinquant-b8-g32-lin": "W4A4KV4 SpinQuant (the same rotations), groups of 32, clip per linear "
                                 "(`--per-linear-act-clip`)",
    "w4a4-spinquant-gq-b8-g32-lin": "W4A4KV4 SpinQuant + GuidedQuant g=1, the same rotations, groups of 32, clip "
                                    "per linear (`--per-linear-act-clip`)",
    "w4a4-quarot-g16-clip1.0-lin": "W4A4KV4 random Hadamard R1/R2, GPTQ, activations in groups of 16, clip per "
                                   "linear (`--act-group 16 --per-linear-act-clip`)",
    **{f"w4a4-quarot-g{g}-clip1.0-lin-w{w}{kv}": f"W4A4KV4 random Hadamard R1/R2, GPTQ, activations in groups of {g}, "
                                               f"clip per linear, weight scales per {w} columns (`--weight-group {w}`)"
                                               + (", KV ranges per 32 channels (`--kv-group 32`)" if kv else "")
       for g in (16, 32) for w in (16, 32, 64) for kv in ("", "-kv32")},
    **{f"w4a4-spinquant{gq}-b8-g{g}-lin-w{w}{kv}": f"W4A4KV4 SpinQuant{' + GuidedQuant g=1' if gq else ''} (rotations "
                                                  f"learned under groups of 32), activations in groups of {g}, clip per "
                                                  f"linear, weight scales per {w} columns (`--weight-group {w}`)"
                                                  + (", KV ranges per 32 channels (`--kv-group 32`)" if kv else "")
       for gq in ("", "-gq") for g in (16, 32) for w in (16, 32, 64) for kv in ("", "-kv32")},
    **{f"w4a4-spinquant{gq}-b8-g32-lin-w{w}-kv32-rkv": f"W4A4KV4 SpinQuant{' + GuidedQuant g=1' if gq else ''}, rotations "
                                                     f"learned under activation groups of 32 and KV groups of 32 (`gq "
                                                     f"rotate --kv-group 32`) on the calibration text, activations in "
                                                     f"groups of 32, clip per linear, weight scales per {w} columns, KV "
                                                     f"ranges per 32 channels"
       for gq in ("", "-gq") for w in (16, 32)},
}
LABELS.update({f"{v}-ft{n}": f"{LABELS[v]}, then the weight scales fine-tuned end to end for {n} steps "
                             f"(`--finetune-steps {n}`)"
               for v in ("w4a4-quarot-g32-clip1.0-lin-w16-kv32", "w4a4-quarot-g32-clip1.0-lin", "w4a4-spinquant-b8-g32-lin",
                         "w4a4-spinquant-gq-b8-g32-lin", "w4a4-spinquant-b8-g32-lin-w16-kv32",
                         "w4a4-spinquant-gq-b8-g32-lin-w16-kv32", "w4a4-spinquant-gq-b8-g32-lin-w16-kv32-rkv")
               for n in (60, 200)})


def _ppl(x: float | None) -> str:
    if x is None:
        return "–"
    return f"{x:.2f}" if x < 1000 else f"{x:.1e}"


SHORT = {"last32x512": "32 win", "last16x512": "16 win"}


def variants_table(rows: list[dict], model: str, variants: list[str], bits: list[int], evals: list[str],
                   protocols: list[str], calib: tuple[str, int, int] = ("sotu:calib", 32, 512),
                   extra_rows: list[str] = ()) -> str:
    """One row per (variant, bits): perplexity (and x fp16) per text and protocol, quantization time, answer."""
    def pick(variant: str, b: int, spec: str, proto: str):
        for r in rows:
            if (r["model"], r["variant"], r["bits"], r["eval_data"], r["eval_protocol"]) == (
                    model, variant, b, spec, proto) and (
                    variant == "fp16" or (r["calib"], r["n_samples"], r["seq_len"]) == tuple(calib)):
                return r
        return None

    cols = [(spec, proto) for proto in protocols for spec in evals]
    fp16 = {c: (pick("fp16", 16, *c) or {}).get("ppl") for c in cols}
    head = ["method", "bits"] + [f"{spec}, {SHORT[proto]}" for spec, proto in cols] + \
           ["quantize s", "answer to \"What is the capital of France?\""]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for variant in variants:
        for b in ([16] if variant == "fp16" else bits):
            cells = [pick(variant, b, *c) for c in cols]
            if not any(cells):
                continue
            vals = []
            for c, cell in zip(cols, cells):
                if cell is None:
                    vals.append("–")
                elif variant != "fp16" and fp16.get(c):
                    vals.append(f"{_ppl(cell['ppl'])} ({cell['ppl'] / fp16[c]:.2f}x)")
                else:
                    vals.append(_ppl(cell["ppl"]))
            first = next(c for c in cells if c)
            secs = first.get("quantize_wall_s")
            answer = " ".join((first.get("answer") or "–").replace("|", "/").split())  # \r too: a doc edit reads it as \n
            if len(answer) > 60:
                answer = answer[:57] + "..."
            lines.append(f"| {LABELS.get(variant, variant)} | {b} | " + " | ".join(vals)
                         + f" | {'–' if secs is None else f'{secs:.0f}'} | {answer} |")
    lines += list(extra_rows)
    lines.append("")
    lines.append("Perplexity at context 512 over the " + " / ".join(PROTOCOLS[p] for p in protocols)
                 + f" of each text (x fp16 in brackets); calibration {calib[1]} x {calib[2]} tokens of "
                 f"{calib[0]}; quantize s: wall time of `quantize_model` (calibration included) on the shared 2-core "
                 "machine, 1 torch thread. " + FP16_NOTE.format(model=model, gguf=GGUF.get(model, "?")))
    return "\n".join(lines)


def from_quality_table(rows: list[dict]) -> list[dict]:
    """reproduce_quality.py's rows (docs/results/quality.json: cached Hessians, last 8192 tokens = the
    last 16 x 512 windows) in this file's shape, so the tables can set them beside the variants."""
    out = []
    names = {("lnq", False, 1): "lnq", ("lnq", True, 4): "lnq-gq4", ("gptq", False, 1): "gptq"}
    for r in rows:
        v = names.get((r["method"], r["guided"], r["groups"])) if r["method"] != "fp16" else None
        if v is None or r.get("options") or r.get("ctx") != 512 or r.get("eval_tokens") != 16 * 511:
            continue
        out.append({"model": SMOL, "variant": v, "bits": r["bits"], "calib": r["calib"], "n_samples": 32,
                    "seq_len": 512, "eval_data": r["eval_data"], "eval_protocol": "last16x512", "ppl": r["ppl"],
                    "answer": None, "quantize_wall_s": None})
    return out


def budget_table(rows: list[dict], model: str, variant: str, bits: int) -> str:
    """Calibration budget: validation perplexity and time per (windows, length)."""
    sel = sorted((r for r in rows if r["model"] == model and r["variant"] == variant and r["bits"] == bits
                  and r["eval_data"] == "sotu:val" and r["eval_protocol"] == "last32x512"),
                 key=lambda r: (r["n_samples"] * r["seq_len"], r["seq_len"]))
    fp16 = next((r["ppl"] for r in rows if r["model"] == model and r["variant"] == "fp16"
                 and r["eval_data"] == "sotu:val" and r["eval_protocol"] == "last32x512"), None)
    lines = ["| windows x length | tokens | sotu:val ppl | x fp16 | calibration + quantization s |",
             "|---|---|---|---|---|"]
    for r in sel:
        t = r.get("quantize_wall_s")
        rel = "–" if not fp16 else f"{r['ppl'] / fp16:.2f}x"
        secs = "–" if t is None else f"{t:.0f}"
        lines.append(f"| {r['n_samples']} x {r['seq_len']} | {r['n_samples'] * r['seq_len']} | {_ppl(r['ppl'])} | "
                     f"{rel} | {secs} |")
    lines.append("")
    lines.append(f"Calibrated on sotu:train (addresses before 1991), scored on sotu:val (1991-2000, last 32 x 512 "
                 f"tokens), never on held-out text; fp16 on sotu:val: {_ppl(fp16)}. "
                 + FP16_NOTE.format(model=model, gguf=GGUF.get(model, "?")))
    return "\n".join(lines)


def load(results_dir: Path) -> list[dict]:
    path = results_dir / "quality_variants.json"
    return json.loads(path.read_text()) if path.exists() else []


SMOL = "SmolLM2-135M-Instruct"
GEMMA = "gemma-3-270m"
TEXTS = ["sotu:heldout", "brown:heldout"]
MIXED = "sotu:calib+brown:calib"


def render_blocks(rows: list[dict], table_rows: list[dict] = ()) -> dict[str, str]:
    """Block name in docs/results.md -> its table; ``table_rows``: docs/results/quality.json."""
    mine = {(r["variant"], r["bits"], r["eval_data"], r["eval_protocol"]) for r in rows if r["model"] == SMOL}
    rows = list(rows) + [r for r in from_quality_table(list(table_rows))
                         if (r["variant"], r["bits"], r["eval_data"], r["eval_protocol"]) not in mine]
    compressor = ("| llm-compressor 0.14 GPTQ, sym, per channel, 128 x 512 SOTU (`../shared/anchors.md`: not our "
                  "run, its fp16 22.04 / 48.32, its Brown text differs) | 3 | 227.1 | 730.2 | – | – | 553 | – |")
    gptq = ["gptq", "gptq-seq", "gptq-seq-act", "gptq-seq-sym-act", "gptq-seq-act-mse", "gptq-seq-sym-act-mse",
            "gptq-act-mse"]
    blocks = {
        "gptq_variants": variants_table(rows, SMOL, ["fp16"] + gptq, [3], TEXTS, ["last32x512", "last16x512"],
                                        extra_rows=[compressor]),
        "lnq_sequential": variants_table(rows, SMOL, ["fp16", "lnq", "lnq-seq", "lnq-gq4", "lnq-gq4-seq", "lnq-gq4-ft60",
                                                      "lnq-gq4-shrink0.5-ft200"],
                                         [3, 4],
                                         TEXTS, ["last32x512", "last16x512"]),
        "second_arch": variants_table(rows, GEMMA, ["fp16", "gptq-seq-act-mse", "lnq", "lnq-gq4", "lnq-gq4-seq"],
                                      [3, 4], TEXTS, ["last16x512"]),
    }
    w4a4 = ["fp16", "w4a4-rtn", "w4a4-gptq", "w4a4-quarot", "w4a4-spinquant", "w4a4-spinquant-gq",
            "w4a4-spinquant-b8", "w4a4-spinquant-gq-b8", "w4a4-quarot-clip0.8", "w4a4-spinquant-gq-clip",
            "w4a4-spinquant-b8-def", "w4a4-spinquant-gq-b8-def", "w4a4-spinquant-gq-g64", "w4a4-spinquant-gq-b8-g32",
            "w4a4-spinquant-gq-b8-g32-clip1.0", "w4a4-spinquant-b8-g32-lin", "w4a4-spinquant-gq-b8-g32-lin",
            "w4a4-spinquant-b8-g32-lin-w32", "w4a4-spinquant-gq-b8-g32-lin-w32", "w4a4-spinquant-b8-g32-lin-w16-kv32",
            "w4a4-spinquant-gq-b8-g32-lin-w16-kv32", "w4a4-quarot-g32-clip1.0-lin-ft60", "w4a4-spinquant-b8-g32-lin-ft60",
            "w4a4-spinquant-gq-b8-g32-lin-ft60",
            "w4a4-spinquant-b8-g32-lin-w16-kv32-ft60",
            "w4a4-spinquant-gq-b8-g32-lin-w16-kv32-ft60"]
    if any(r["variant"] in w4a4[1:] for r in rows):
        blocks["w4a4"] = variants_table(rows, SMOL, w4a4, [4], TEXTS, ["last32x512", "last16x512"])
    ablation = ["fp16", "w4a4-quarot-a16kv16", "w4a4-quarot-a16", "w4a4-quarot-kv16", "w4a4-quarot",
                "w4a4-quarot-seq", "w4a4-quarot-centred", "w4a4-quarot-clip", "w4a4-quarot-clip0.8",
                "w4a4-quarot-g64-clip1.0", "w4a4-quarot-g32-clip0.9", "w4a4-quarot-g32-clip1.0",
                "w4a4-quarot-clip0.8-lin", "w4a4-quarot-g32-clip1.0-lin"]
    if any(r["variant"] in ablation[1:4] for r in rows):
        blocks["w4a4_ablation"] = variants_table(rows, SMOL, ablation, [4], TEXTS, ["last32x512", "last16x512"])
    if any(r["variant"].startswith("w4a4") and r["eval_data"] == "sotu:val" for r in rows):
        sweep = ["w4a4-quarot", "w4a4-quarot-clip0.95", "w4a4-quarot-clip", "w4a4-quarot-clip0.85",
                 "w4a4-quarot-clip0.8", "w4a4-quarot-clip0.75", "w4a4-quarot-clip0.7", "w4a4-quarot-clip-kv0.9",
                 "w4a4-quarot-centred", "w4a4-quarot-g64-clip1.0", "w4a4-quarot-g64-clip0.9",
                 "w4a4-quarot-g64-clip0.8", "w4a4-quarot-g32-clip0.9", "w4a4-quarot-g32-clip1.0",
                 "w4a4-quarot-g32-clip1.0-lin", "w4a4-quarot-g32-clip1.0-lin8", "w4a4-quarot-clip0.8-lin",
                 "w4a4-quarot-g16-clip1.0-lin", "w4a4-quarot-g32-clip1.0-lin-w64", "w4a4-quarot-g32-clip1.0-lin-w32",
                 "w4a4-quarot-g32-clip1.0-lin-w16", "w4a4-quarot-g32-clip1.0-lin-w32-kv32",
                 "w4a4-quarot-g32-clip1.0-lin-w16-kv32", "w4a4-quarot-g32-clip1.0-lin-w16-kv32-ft60",
                 "w4a4-quarot-g32-clip1.0-lin-w16-kv32-ft200"]
        blocks["w4a4_val"] = variants_table(rows, SMOL, ["fp16"] + sweep, [4],
                                            ["sotu:val"], ["last32x512", "last16x512"], calib=("sotu:train", 32, 512))
    if any(r["calib"] == MIXED for r in rows):
        blocks["mixed_calib"] = variants_table(rows, SMOL, ["fp16", "lnq-gq4-shrink0.5-ft200",
                                                            "w4a4-spinquant-gq-b8-g32-lin-w16-kv32",
                                                            "w4a4-spinquant-gq-b8-g32-lin-w16-kv32-rkv",
                                                            "w4a4-spinquant-gq-b8-g32-lin-w16-kv32-rkv-ft60",
                                                            "w4a4-spinquant-gq-b8-g32-lin-w16-kv32-rkv-ft200"], [3, 4], TEXTS,
                                               ["last32x512", "last16x512"], calib=(MIXED, 32, 512))
    if any(r["eval_data"] == "sotu:val" for r in rows):
        blocks["calib_budget"] = budget_table(rows, SMOL, "lnq-gq4", 3)
        blocks["val_selection"] = variants_table(
            rows, SMOL, ["fp16", "lnq", "lnq-gq4", "lnq-gq4-shrink0.25", "lnq-gq4-shrink0.5", "lnq-gq4-shrink0.75",
                         "lnq-gq4-ft60", "lnq-gq4-ft60-bf16", "lnq-gq4-ft200", "lnq-gq4-ft200-norms",
                         "lnq-gq4-ft200-w256", "qtip", "qtip-gq4", "qtip-gq4-shrink0.5"],
            [3], ["sotu:val"], ["last32x512", "last16x512"], calib=("sotu:train", 32, 512))
    return blocks
