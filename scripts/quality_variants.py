"""Quantization variants (GPTQ options, sequential calibration, calibration budget) -> docs/results/quality_variants.json.

    python scripts/quality_variants.py --model smollm2 --bits 3 --variants gptq gptq-seq lnq-gq4-seq
    python scripts/quality_variants.py --model smollm2 --bits 3 --variants lnq-gq4-seq --n-samples 64 --seq-len 1024

Every row is measured through the public functions (quantize_model -> checkpoint on disk ->
load_quantized_model -> perplexity), like scripts/reproduce_quality.py (whose table is
docs/results/quality.json), and written as soon as it is measured; rows already there with the
same key are replaced, other rows kept (the file is re-read before every write, so two runs of
this script can share it).

Evaluation: the last 32 non-overlapping 512-token windows of each text (16,384 tokens: the
protocol of llm-compressor's run in ../shared/anchors.md), and, from the same forward passes, the
last 16 of them (8,192 tokens: the protocol of the main quality table). Both are stored as rows
(``eval_protocol`` "last32x512" / "last16x512"). ``--val`` evaluates instead on the calibration
domain's validation text (sotu:val), never on held-out text: the curve that picks defaults.
Each quantized row also keeps the checkpoint's size on disk, the quantization time and the greedy
answer to one chat question.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent

from gq_serve.checkpoint import load_quantized_model  # noqa: E402
from gq_serve.evaluate import window_nll  # noqa: E402
from gq_serve.util import cache_root  # noqa: E402
from gq_quantize.config import CalibrationConfig, QuantizeConfig  # noqa: E402
from gq_quantize.data import eval_windows  # noqa: E402
from gq_quantize.pipeline import quantize_model  # noqa: E402
from gq_quantize.spinquant.train import training_quantizers  # noqa: E402
from results_io import provenance, write_json  # noqa: E402

MODELS = {"smollm2": ("SmolLM2-135M-Instruct", "models/SmolLM2-135M-Instruct"),
          "gemma3": ("gemma-3-270m", "models/gemma-3-270m")}
QUESTION = "What is the capital of France?"

def _w4a4(rotation: str, **kw) -> dict:
    """A spinquant variant on a model rotated by ``rotation``; activation and KV ranges unclipped and
    one ratio for every linear (the published configuration) unless ``kw`` sets them."""
    return {"method": "spinquant", "rotation": rotation, "act_clip": 1.0, "kv_clip": 1.0,
            "per_linear_act_clip": False, **kw}


# name -> QuantizeConfig keyword arguments (bits from --bits). Per-output-channel grids/codebooks.
VARIANTS: dict[str, dict] = {
    "gptq": dict(method="gptq"),
    "gptq-sym": dict(method="gptq", sym=True),
    "gptq-act": dict(method="gptq", gptq_act_order=True),
    "gptq-seq": dict(method="gptq", sequential=True),
    "gptq-seq-act": dict(method="gptq", sequential=True, gptq_act_order=True),
    "gptq-seq-sym-act": dict(method="gptq", sequential=True, sym=True, gptq_act_order=True),
    "gptq-seq-act-damp0.1": dict(method="gptq", sequential=True, gptq_act_order=True, gptq_damp=0.1),
    "gptq-seq-act-mse": dict(method="gptq", sequential=True, gptq_act_order=True, grid_search=True),
    "gptq-seq-sym-act-mse": dict(method="gptq", sequential=True, sym=True, gptq_act_order=True, grid_search=True),
    "gptq-act-mse": dict(method="gptq", gptq_act_order=True, grid_search=True),
    "lnq": dict(method="lnq"),
    "lnq-seq": dict(method="lnq", sequential=True),
    "lnq-gq4": dict(method="lnq", guided=True, groups=4),
    "lnq-gq4-seq": dict(method="lnq", guided=True, groups=4, sequential=True),
    # the guided Hessians pulled toward the trace-matched plain one (--guided-shrink)
    "lnq-gq4-shrink0.25": dict(method="lnq", guided=True, groups=4, guided_shrink=0.25),
    "lnq-gq4-shrink0.5": dict(method="lnq", guided=True, groups=4, guided_shrink=0.5),
    "lnq-gq4-shrink0.75": dict(method="lnq", guided=True, groups=4, guided_shrink=0.75),
    "qtip": dict(method="qtip"),
    "qtip-gq4": dict(method="qtip", guided=True, groups=4),
    "qtip-gq4-shrink0.5": dict(method="qtip", guided=True, groups=4, guided_shrink=0.5),
    # then the codebooks tuned end to end on the calibration windows (gq quantize --finetune-steps)
    "lnq-gq4-ft60": dict(method="lnq", guided=True, groups=4, finetune=dict(steps=60, precision="float32")),
    # the same in bfloat16 autocast (the default where the hardware has it), then longer
    "lnq-gq4-ft60-bf16": dict(method="lnq", guided=True, groups=4, finetune=dict(steps=60, precision="bfloat16")),
    "lnq-gq4-ft200": dict(method="lnq", guided=True, groups=4, finetune=dict(steps=200)),
    "lnq-gq4-ft200-norms": dict(method="lnq", guided=True, groups=4, finetune=dict(steps=200, norms=True)),
    "lnq-gq4-ft200-w256": dict(method="lnq", guided=True, groups=4, finetune=dict(steps=200, windows=256)),
    "lnq-gq4-shrink0.5-ft200": dict(method="lnq", guided=True, groups=4, guided_shrink=0.5,
                                    finetune=dict(steps=200)),
    # W4A4KV4 (issue 11): ``rotation`` is the `gq rotate` mode the model goes through first (norms
    # fused and lm_head untied in every mode); weights 4-bit, activations 4-bit, KV cache 4-bit.
    # _w4a4 pins SpinQuant's published, unclipped ranges; the method's own defaults (activation clip
    # 0.8, KV 0.95) were chosen on sotu:val with the sweep below.
    "w4a4-rtn": _w4a4("none", rtn=True),
    "w4a4-gptq": _w4a4("none"),
    "w4a4-quarot": _w4a4("hadamard"),
    "w4a4-spinquant": _w4a4("learned"),
    "w4a4-spinquant-gq": _w4a4("learned", guided=True, groups=1),
    # the same with rotations learned on 8 windows per Cayley step (the paper's batch) instead of 1
    "w4a4-spinquant-b8": _w4a4("learned", rotation_batch=8),
    "w4a4-spinquant-gq-b8": _w4a4("learned", rotation_batch=8, guided=True, groups=1),
    # where the W4A4KV4 error comes from (random Hadamard R1/R2): one quantizer at a time left off
    "w4a4-quarot-a16kv16": _w4a4("hadamard", act_bits=16, kv_bits=16),
    "w4a4-quarot-kv16": _w4a4("hadamard", kv_bits=16),
    "w4a4-quarot-a16": _w4a4("hadamard", act_bits=16),
    # the published pipeline's sequential GPTQ; embeddings centred (QuaRot's and SpinQuant's code)
    "w4a4-quarot-seq": _w4a4("hadamard", sequential=True),
    "w4a4-quarot-centred": _w4a4("hadamard", center_embeddings=True),
    # clip ratios: QuaRot's (0.9 activations, 0.95 KV), then a sweep on sotu:val
    "w4a4-quarot-clip": _w4a4("hadamard", act_clip=0.9, kv_clip=0.95),
    **{f"w4a4-quarot-clip{c}": _w4a4("hadamard", act_clip=c, kv_clip=0.95) for c in (0.7, 0.75, 0.8, 0.85, 0.95)},
    "w4a4-quarot-clip-kv0.9": _w4a4("hadamard", act_clip=0.9, kv_clip=0.9),
    # activations in groups of 64 or 32 channels (--act-group; not the published per-token ranges)
    **{f"w4a4-quarot-g{g}-clip{c}": _w4a4("hadamard", act_group=g, act_clip=c, kv_clip=0.95)
       for g in (32, 64) for c in (1.0, 0.9, 0.8)},
    # the method's defaults (clip 0.8 / 0.95) on the rotations learned unclipped (before
    # `gq rotate` trained under the served quantizers)
    # (the "defaults" of these rows are those before --per-linear-act-clip became one: they pin it off)
    "w4a4-spinquant-gq-clip": dict(method="spinquant", rotation="learned", guided=True, groups=1,
                                   rotation_quantizers=(1.0, 1.0, 0, 0), per_linear_act_clip=False),
    "w4a4-spinquant-gq-g64": dict(method="spinquant", rotation="learned", guided=True, groups=1, act_group=64,
                                  rotation_quantizers=(1.0, 1.0, 0, 0), act_clip=1.0, per_linear_act_clip=False),
    # the defaults with rotations learned (batch 8) under the same clipped quantizers
    "w4a4-spinquant-b8-def": dict(method="spinquant", rotation="learned", rotation_batch=8, per_linear_act_clip=False),
    "w4a4-spinquant-gq-b8-def": dict(method="spinquant", rotation="learned", rotation_batch=8, guided=True, groups=1,
                                     per_linear_act_clip=False),
    # those rotations (trained per token) with activations in groups of 32 (the best QuaRot-style setting)
    "w4a4-spinquant-gq-b8-g32": dict(method="spinquant", rotation="learned", rotation_batch=8, guided=True, groups=1,
                                     act_group=32, act_clip=0.9, rotation_quantizers=(0.8, 0.95, 0, 0),
                                     per_linear_act_clip=False),
    # each linear's activation clip ratio chosen by its output error (gq quantize --per-linear-act-clip)
    "w4a4-quarot-clip0.8-lin": _w4a4("hadamard", act_clip=0.8, kv_clip=0.95, per_linear_act_clip=True),
    "w4a4-quarot-g32-clip1.0-lin": _w4a4("hadamard", act_group=32, act_clip=1.0, kv_clip=0.95,
                                         per_linear_act_clip=True),
    "w4a4-quarot-g32-clip1.0-lin8": _w4a4("hadamard", act_group=32, act_clip=1.0, kv_clip=0.95,
                                          per_linear_act_clip=True, act_clip_windows=8),
    # rotations learned (batch 8) under groups of 32 unclipped, then served so, without and with per-linear ratios
    "w4a4-spinquant-gq-b8-g32-clip1.0": dict(method="spinquant", rotation="learned", rotation_batch=8, guided=True,
                                             groups=1, act_group=32, act_clip=1.0, per_linear_act_clip=False),
    "w4a4-spinquant-b8-g32-lin": dict(method="spinquant", rotation="learned", rotation_batch=8, act_group=32,
                                      act_clip=1.0, per_linear_act_clip=True),
    "w4a4-spinquant-gq-b8-g32-lin": dict(method="spinquant", rotation="learned", rotation_batch=8, guided=True,
                                         groups=1, act_group=32, act_clip=1.0, per_linear_act_clip=True),
    # activations in groups of 16 (served by w4a4-int: the Triton GEMM steps 32 columns), on the
    # random Hadamard and on the rotations learned under groups of 32 (not retrained)
    "w4a4-quarot-g16-clip1.0-lin": _w4a4("hadamard", act_group=16, act_clip=1.0, kv_clip=0.95,
                                         per_linear_act_clip=True),
    "w4a4-spinquant-b8-g16-lin": dict(method="spinquant", rotation="learned", rotation_batch=8, act_group=16,
                                      act_clip=1.0, per_linear_act_clip=True, rotation_quantizers=(1.0, 0.95, 32, 0)),
    "w4a4-spinquant-gq-b8-g16-lin": dict(method="spinquant", rotation="learned", rotation_batch=8, guided=True,
                                         groups=1, act_group=16, act_clip=1.0, per_linear_act_clip=True,
                                         rotation_quantizers=(1.0, 0.95, 32, 0)),
    # weights with one scale per group of W input channels (--weight-group W) on top of those, and
    # the KV cache in groups of 32 of a head's 64 channels (--kv-group 32)
    **{f"w4a4-quarot-g{g}-clip1.0-lin-w{w}{kv}": _w4a4("hadamard", act_group=g, act_clip=1.0, kv_clip=0.95,
                                                       per_linear_act_clip=True, weight_group=w,
                                                       kv_group=32 if kv else 0)
       for g in (16, 32) for w in (16, 32, 64) for kv in ("", "-kv32")},
    **{f"w4a4-spinquant{gq}-b8-g{g}-lin-w{w}{kv}": dict(method="spinquant", rotation="learned", rotation_batch=8,
                                                        act_group=g, act_clip=1.0, per_linear_act_clip=True,
                                                        weight_group=w, kv_group=32 if kv else 0,
                                                        rotation_quantizers=(1.0, 0.95, 32, 0),
                                                        **(dict(guided=True, groups=1) if gq else {}))
       for gq in ("", "-gq") for g in (16, 32) for w in (16, 32, 64) for kv in ("", "-kv32")},
    # the same with rotations learned under the KV groups they are served with (gq rotate --kv-group 32)
    **{f"w4a4-spinquant{gq}-b8-g32-lin-w{w}-kv32-rkv": dict(method="spinquant", rotation="learned", rotation_batch=8,
                                                           act_group=32, act_clip=1.0, per_linear_act_clip=True,
                                                           weight_group=w, kv_group=32,
                                                           rotation_quantizers=(1.0, 0.95, 32, 32),
                                                           **(dict(guided=True, groups=1) if gq else {}))
       for gq in ("", "-gq") for w in (16, 32)},
}
# then the weight scales tuned end to end against the unquantized model (gq quantize --finetune-steps N;
# a relative step of 1e-3: of 1e-3 and 3e-3, the one whose KL fell further in 30 steps on sotu:train)
VARIANTS.update({f"{v}-ft{n}": {**VARIANTS[v], "finetune": dict(steps=n, lr=1e-3)}
                 for v in ("w4a4-quarot-g32-clip1.0-lin-w16-kv32", "w4a4-quarot-g32-clip1.0-lin", "w4a4-spinquant-b8-g32-lin",
                           "w4a4-spinquant-gq-b8-g32-lin", "w4a4-spinquant-b8-g32-lin-w16-kv32",
                           "w4a4-spinquant-gq-b8-g32-lin-w16-kv32", "w4a4-spinquant-gq-b8-g32-lin-w16-kv32-rkv")
                 for n in (60, 200)})


def eval_rows(model, windows: dict[str, torch.Tensor]) -> dict[str, dict[str, float]]:
    """Per text: perplexity over all 32 windows and over the last 16 (one forward pass each batch)."""
    out = {}
    model.eval()
    for spec, w in windows.items():
        t0 = time.perf_counter()
        nll = []
        with torch.inference_mode():
            for i in range(0, w.shape[0], 4):
                nll.append(float(window_nll(model, w[i : i + 4])))
        per_tok = w.shape[1] - 1
        # batches of 4: the last 16 windows are the last 4 batches
        out[spec] = {"last16x512": math.exp(sum(nll[-4:]) / (16 * per_tok)), "seconds": time.perf_counter() - t0}
        if w.shape[0] == 32:
            out[spec]["last32x512"] = math.exp(sum(nll) / (32 * per_tok))
    return out


def chat_answer(model, tokenizer, max_new_tokens: int = 32) -> str:
    """Greedy answer to QUESTION through the tokenizer's chat template (what `gq serve` would say)."""
    ids = tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)
    with torch.inference_mode():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def dir_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in Path(d).iterdir() if p.is_file() and p.suffix == ".safetensors")


def rotated_model(model_dir: Path, args, mode: str, cache: Path, batch: int = 1, center: bool = False,
                  quantizers: tuple[float, float, int, int] = (1.0, 1.0, 0, 0)) -> Path:
    """The model with SpinQuant's rotations fused (`gq rotate`), made once and kept under the
    cache; learned rotations train on the calibration text (never the evaluation text), ``batch``
    windows per step, under ``quantizers`` (act_clip, kv_clip, act_group, kv_group: the variant's own)."""
    from gq_quantize.spinquant.train import write_rotated_model

    act_clip, kv_clip, act_group, kv_group = quantizers
    learned = mode == "learned"
    trained = learned and quantizers != (1.0, 1.0, 0, 0)
    # rotations learned on other text than sotu:calib carry its name (sotu:calib holds sotu:val, so
    # validation runs must never reuse them)
    data = "" if not learned or args.calib == "sotu:calib" else "-" + args.calib.replace(":", "_").replace("/", "_")
    name = (f"{args.model}-{mode}-s0-{args.rotation_steps}x{args.seq_len}" + (f"-b{batch}" if batch > 1 else "")
            + ("-centred" if center else "")
            + (f"-a{act_clip:g}-kv{kv_clip:g}" + (f"-g{act_group}" if act_group else "")
               + (f"-kvg{kv_group}" if kv_group else "") if trained else "") + data)
    out = cache / "results" / "rotated" / name
    if not (out / "rotation.json").exists():
        write_rotated_model(model_dir, out, mode, seed=0, steps=args.rotation_steps, seq_len=args.seq_len,
                            batch=batch, data=args.calib, cache=cache, overwrite=out.exists(), center=center,
                            act_clip=act_clip, kv_clip=kv_clip, act_group=act_group, kv_group=kv_group)
    return out


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2", choices=sorted(MODELS))
    p.add_argument("--bits", type=int, nargs="+", default=[3])
    p.add_argument("--variants", nargs="+", default=["fp16"], help=f"fp16 and/or: {', '.join(VARIANTS)}")
    p.add_argument("--calib", default="sotu:calib")
    p.add_argument("--n-samples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--rotation-steps", type=int, default=100, help="w4a4 variants: Cayley SGD steps of learned rotations")
    p.add_argument("--val", action="store_true", help="evaluate on sotu:val (calibration-domain validation)")
    p.add_argument("--out", default=str(ROOT / "docs/results/quality_variants.json"))
    p.add_argument("--eval-windows", type=int, default=32, choices=(16, 32),
                   help="32: both protocols; 16: only the last 16 x 512 tokens (half the cost)")
    args = p.parse_args()

    torch.manual_seed(0)
    cache = cache_root()
    model_name, sub = MODELS[args.model]
    model_dir = cache / sub
    ckpt_root = cache / "results" / "checkpoints"
    out = Path(args.out)
    rows: list[dict] = json.loads(out.read_text()) if out.exists() else []
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    texts = ["sotu:val"] if args.val else ["sotu:heldout", "brown:heldout"]
    windows = {d: eval_windows(tokenizer, d, 512, args.eval_windows * 512, cache) for d in texts}
    protocols = ("last32x512", "last16x512") if args.eval_windows == 32 else ("last16x512",)
    fp16_bytes = dir_bytes(model_dir)

    def key(r: dict) -> tuple:
        return (r["model"], r["variant"], r["bits"], r["calib"], r["n_samples"], r["seq_len"], r["eval_data"],
                r["eval_protocol"])

    done = {key(r) for r in rows}

    def record(base: dict, model, extra: dict) -> None:
        res = eval_rows(model, windows)
        answer = chat_answer(model, tokenizer)
        meta = provenance()
        new: list[dict] = []
        for spec, r in res.items():
            for proto in protocols:
                row = {**base, "eval_data": spec, "eval_protocol": proto, "ctx": 512, "ppl": round(r[proto], 4),
                       "eval_seconds": round(r["seconds"], 1), "answer": answer, **extra, **meta}
                new.append(row)
                print(json.dumps({k: row[k] for k in ("variant", "bits", "eval_data", "eval_protocol", "ppl")}),
                      flush=True)
        print(f"answer: {answer!r}", flush=True)
        keys = {key(r) for r in new}
        current = json.loads(out.read_text()) if out.exists() else []
        write_json(out, [x for x in current if key(x) not in keys] + new)

    calib_fields = dict(calib=args.calib, n_samples=args.n_samples, seq_len=args.seq_len)
    for variant in args.variants:
        for bits in ([16] if variant == "fp16" else args.bits):
            base = {"model": model_name, "variant": variant, "bits": bits, **calib_fields,
                    "fp16_note": "fp16 = the model dequantized from its GGUF (Q4_1 SmolLM2, Q4_K_M Gemma 3)"}
            if all(key({**base, "eval_data": d, "eval_protocol": pr}) in done
                   for d in texts for pr in protocols):
                continue
            if variant == "fp16":
                record({**base, "method": "fp16"}, load_quantized_model(model_dir, dtype=torch.float32),
                       {"size_bytes": fp16_bytes})
                continue
            kw = dict(VARIANTS[variant])
            rotation = kw.pop("rotation", None)
            batch = kw.pop("rotation_batch", 1)
            center = kw.pop("center_embeddings", False)
            # learned rotations train under the variant's own quantizers unless it pins others
            trained = kw.pop("rotation_quantizers", None) or training_quantizers(
                kw.get("act_clip"), kw.get("kv_clip"), kw.get("act_group"), kw.get("kv_group"))
            source = (model_dir if rotation is None
                      else rotated_model(model_dir, args, rotation, cache, batch, center, trained))
            qconfig = QuantizeConfig(bits=bits, calibration=CalibrationConfig(data=args.calib, n_samples=args.n_samples,
                                                                              seq_len=args.seq_len), **kw)
            # checkpoints calibrated elsewhere than sotu:calib carry their data's name, so a budget
            # run never overwrites a checkpoint another benchmark reads
            tag = "" if args.calib == "sotu:calib" else "-" + args.calib.replace(":", "_").replace("/", "_")
            ckpt = ckpt_root / f"{args.model}-{variant}-{bits}bit-{args.n_samples}x{args.seq_len}{tag}"
            t0 = time.perf_counter()
            summary = quantize_model(source, qconfig, ckpt, cache, overwrite=True)
            wall = time.perf_counter() - t0
            model = load_quantized_model(ckpt, dtype=torch.float32)
            rot = {} if rotation is None else {"rotation": json.loads((source / "rotation.json").read_text())}
            tuned = json.loads((ckpt / "gq_manifest.json").read_text()).get("finetune")
            record({**base, "method": kw["method"], "config": qconfig.flat(), **rot}, model,
                   {"size_bytes": dir_bytes(ckpt), "fp16_size_bytes": fp16_bytes,
                    "quantize_wall_s": round(wall, 1), "quantize_timings_s": summary["timings_s"],
                    "objective_sum": summary["objective_sum"], **({"finetune": tuned} if tuned else {})})
            del model
    return 0


if __name__ == "__main__":
    sys.exit(main())
