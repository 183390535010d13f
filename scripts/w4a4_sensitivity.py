"""Where a w4a4 checkpoint's activation quantization costs perplexity -> docs/results/w4a4_sensitivity.json.

    python scripts/w4a4_sensitivity.py CHECKPOINT --data sotu:val --act-bits 16 8 --per-layer gate_up

Loads one w4a4 checkpoint and evaluates it with the activations of one kind of linear (``qkv``:
q/k/v_proj, ``o``: o_proj, ``gate_up``: gate/up_proj, ``down``: down_proj; ``all``) raised from the
checkpoint's ``act_bits`` to each of ``--act-bits`` (16: left in float; raised ranges unclipped, as a
clip ratio chosen for 4 bits would only hurt at 8), the weights and the KV cache unchanged.
``--per-layer KIND`` then raises that kind in one decoder layer at a time. Perplexity over the last
``--windows`` windows of ``--ctx`` (512) tokens of ``--data`` (choose the validation text, never the held-out one,
when the answer picks a setting).

``--clip-search kind`` instead looks for one activation clip ratio per kind (q/k/v, o, gate/up, down)
by coordinate descent on ``--data``'s perplexity over ``--clip-grid``, one pass in the order gate/up,
down, q/k/v, o (the kinds whose activations cost most first), starting from the checkpoint's ratio.
``--clip-search linear`` gives each linear the ratio of ``--clip-grid`` whose quantized activations
bring its output closest (squared error) to float activations on ``--clip-windows`` windows of
``--clip-data`` (calibration text: nothing is chosen on ``--data``), then scores that; with
``--clip-share`` the linears fed one input (q/k/v, gate/up) take the ratio of their summed error.
Rows are written as they are measured; a rerun skips those present.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from results_io import provenance, write_json  # noqa: E402

KINDS = {"qkv": ("q_proj", "k_proj", "v_proj"), "o": ("o_proj",), "gate_up": ("gate_proj", "up_proj"),
         "down": ("down_proj",)}
KINDS["all"] = tuple(s for suffixes in KINDS.values() for s in suffixes)


def activation_linears(model) -> dict[str, torch.nn.Module]:
    """name -> GQLinear of every linear that quantizes its input (a w4a4 layer)."""
    from gq_serve.quant_linear import GQLinear

    return {n: m for n, m in model.named_modules()
            if isinstance(m, GQLinear) and getattr(m.params, "act_bits", 16) < 16}


def with_clip(params, **update):
    """``params`` with ``update`` applied; a ratio set here replaces a checkpoint's per-linear ones
    (the kernels then read ``act_clip`` from the parameters, not from the linear's tensor)."""
    return params.model_copy(update={**update, "per_linear_act_clip": False})


def raise_activations(linears: dict, original: dict, bits: int, kind: str | None, layer: int | None) -> int:
    """Set act_bits ``bits`` (clip 1.0) on the linears of ``kind`` (in decoder ``layer`` only, when given),
    the checkpoint's own parameters on the others; returns how many were raised."""
    suffixes = KINDS[kind] if kind else ()
    raised = 0
    for name, m in linears.items():
        hit = name.endswith(suffixes) and (layer is None or f".layers.{layer}." in f".{name}")
        m.params = with_clip(original[name], act_bits=bits, act_clip=1.0) if hit else original[name]
        m.reset_cache()  # the kernel was prepared for the old parameters
        raised += hit
    return raised


def set_clips(linears: dict, original: dict, clips: dict[str, float]) -> None:
    """Give every linear the activation clip ratio ``clips[name]``, or ``clips[kind]`` when ``clips`` is keyed by
    kind (q/k/v, o, gate_up, down)."""
    for name, m in linears.items():
        key = name if name in clips else next(k for k in clips if name.endswith(KINDS[k]))
        m.params = with_clip(original[name], act_clip=clips[key])
        m.reset_cache()


def input_owner(name: str) -> str:
    """The linears fed one input share a key: ``...self_attn.qkv``, ``...mlp.gate_up``; others their name."""
    parent, _, leaf = name.rpartition(".")
    kind = next((k for k in ("qkv", "gate_up") if leaf in KINDS[k]), None)
    return f"{parent}.{kind}" if kind else name


def output_error_clips(model, linears: dict, original: dict, windows: torch.Tensor, grid: list[float],
                       share: bool = False) -> dict[str, float]:
    """name -> the ratio of ``grid`` minimising each linear's summed squared output error against float
    activations, on the inputs the checkpoint as loaded feeds it for ``windows [N, T]``; ``share``: one
    ratio per input (q/k/v, gate/up), minimising their summed error. The error is the pipeline's
    (:func:`gq_quantize.methods.spinquant.clip_errors`), measured here through the loaded kernels."""
    from gq_quantize.methods.spinquant import clip_errors

    errors = {n: torch.zeros(len(grid), dtype=torch.float64) for n in linears}
    busy: set[str] = set()

    def accumulate(m, args, name):
        if name in busy:  # the calls below go through this hook again
            return
        busy.add(name)
        x = args[0].reshape(-1, args[0].shape[-1])

        def out(clip):
            m.params = (original[name].model_copy(update={"act_bits": 16}) if clip is None
                        else with_clip(original[name], act_clip=clip))
            m.reset_cache()
            return m(x)

        try:
            errors[name] += clip_errors(out, grid)
        finally:
            m.params = original[name]
            m.reset_cache()
            busy.discard(name)

    handles = [m.register_forward_pre_hook(lambda m, a, n=n: accumulate(m, a, n)) for n, m in linears.items()]
    try:
        with torch.inference_mode():
            for w in windows:
                model(input_ids=w[None], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    if share:
        owners = {n: input_owner(n) for n in errors}
        summed = {o: sum(e for n, e in errors.items() if owners[n] == o) for o in set(owners.values())}
        return {n: grid[int(summed[owners[n]].argmin())] for n in errors}
    return {n: grid[int(e.argmin())] for n, e in errors.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a w4a4 checkpoint directory (gq quantize --method spinquant)")
    p.add_argument("--data", default="sotu:val")
    p.add_argument("--windows", type=int, default=16, help="last N windows of --data")
    p.add_argument("--ctx", type=int, default=512, help="tokens per window")
    p.add_argument("--act-bits", type=int, nargs="+", default=[16], choices=(8, 16))
    p.add_argument("--per-layer", choices=sorted(KINDS), default=None,
                   help="also raise this kind one decoder layer at a time (at the first --act-bits)")
    p.add_argument("--clip-search", choices=("kind", "linear"), default=None,
                   help="choose activation clip ratios instead: per kind by perplexity, or per linear by output error")
    p.add_argument("--clip-grid", type=float, nargs="+", default=[0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 1.0])
    p.add_argument("--clip-data", default="sotu:train", help="--clip-search linear: calibration text")
    p.add_argument("--clip-windows", type=int, default=2, help="--clip-search linear: last N windows of --clip-data")
    p.add_argument("--clip-share", action="store_true",
                   help="--clip-search linear: one ratio per input (q/k/v share one, gate/up one)")
    p.add_argument("--out", default=str(ROOT / "docs/results/w4a4_sensitivity.json"))
    args = p.parse_args(argv)
    if not all(0 < c <= 1 for c in args.clip_grid):
        p.error(f"--clip-grid ratios must lie in (0, 1], got {args.clip_grid}")

    from transformers import AutoTokenizer

    from gq_serve.checkpoint import load_quantized_model
    from gq_serve.evaluate import perplexity
    from gq_serve.util import cache_root
    from gq_quantize.data import eval_windows

    ckpt = Path(args.checkpoint)
    if not (ckpt / "config.json").is_file():
        raise SystemExit(f"error: {ckpt} is not a checkpoint directory (no config.json)")
    model = load_quantized_model(ckpt, dtype=torch.float32).eval()
    linears = activation_linears(model)
    if not linears:
        raise SystemExit(f"error: {ckpt} has no linear with quantized activations: pass a w4a4 checkpoint")
    original = {n: m.params for n, m in linears.items()}
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    windows = eval_windows(tokenizer, args.data, args.ctx, args.windows * args.ctx, cache_root())
    if windows.shape[0] < args.windows:
        raise SystemExit(f"error: {args.data} holds {windows.shape[0]} windows of {args.ctx} tokens, "
                         f"fewer than --windows {args.windows}")

    out = Path(args.out)
    base = {"checkpoint": ckpt.name, "eval_data": args.data, "windows": int(windows.shape[0]), "ctx": args.ctx,
            "checkpoint_act_bits": next(iter(original.values())).act_bits,
            "checkpoint_act_clip": next(iter(original.values())).act_clip}

    def key(r: dict) -> tuple:
        return (r["checkpoint"], r["eval_data"], r["windows"], r["ctx"], r["kind"], r["layer"], r["act_bits"],
                json.dumps(r.get("clips"), sort_keys=True), r.get("clip_share", False))

    def measure(row: dict) -> float:
        """The row's perplexity: measured and appended to --out, or read from it."""
        rows = json.loads(out.read_text()) if out.exists() else []
        done = {key(r): r for r in rows}
        if key(row) in done:
            return done[key(row)]["ppl"]
        t0 = time.perf_counter()
        row["ppl"] = perplexity(model, windows, progress=False)["ppl"]
        row["seconds"] = round(time.perf_counter() - t0, 1)
        row.update(provenance())
        layer = "all" if row["layer"] is None else row["layer"]
        what = (json.dumps(row["clips"]) if row["kind"] == "clips" else "per linear" if row.get("clips")
                else f"layer {layer:>3} A{row['act_bits']:<2d}")
        print(f"{row['kind']:8s} {what} ppl {row['ppl']:.3f} ({row['seconds']} s)", flush=True)
        rows = json.loads(out.read_text()) if out.exists() else []
        write_json(out, [r for r in rows if key(r) != key(row)] + [row])
        return row["ppl"]

    bits = base["checkpoint_act_bits"]
    if args.clip_search:
        clips = {k: base["checkpoint_act_clip"] for k in ("gate_up", "down", "qkv", "o")}
        set_clips(linears, original, clips)
        best = measure({**base, "kind": "clips", "layer": None, "act_bits": bits, "clips": dict(clips)})
    if args.clip_search == "linear":
        calib = eval_windows(tokenizer, args.clip_data, args.ctx, args.clip_windows * args.ctx, cache_root())
        chosen = output_error_clips(model, linears, original, calib, sorted(args.clip_grid), args.clip_share)
        set_clips(linears, original, chosen)
        got = measure({**base, "kind": "clips_linear", "layer": None, "act_bits": bits, "clips": chosen,
                       "clip_data": args.clip_data, "clip_windows": int(calib.shape[0]),
                       "clip_grid": sorted(args.clip_grid), **({"clip_share": True} if args.clip_share else {})})
        print(f"per-linear clips by output error: ppl {got:.3f} (checkpoint's {best:.3f})", flush=True)
        return 0
    if args.clip_search == "kind":
        for kind in list(clips):
            for c in args.clip_grid:
                trial = {**clips, kind: c}
                if c == clips[kind]:
                    continue
                set_clips(linears, original, trial)
                got = measure({**base, "kind": "clips", "layer": None, "act_bits": bits, "clips": trial})
                if got < best:
                    best, clips = got, trial
        print(f"best clips {json.dumps(clips)}: ppl {best:.3f}", flush=True)
        return 0

    jobs = [(None, None, base["checkpoint_act_bits"])]
    jobs += [(k, None, b) for b in args.act_bits for k in KINDS]
    if args.per_layer:
        n_layers = len(model.model.layers)
        jobs += [(args.per_layer, i, args.act_bits[0]) for i in range(n_layers)]
    for kind, layer, bits in jobs:
        row = {**base, "kind": kind or "none", "layer": layer, "act_bits": bits}
        row["linears_raised"] = raise_activations(linears, original, bits, kind, layer)
        measure(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
