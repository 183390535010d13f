"""Render the tables of docs/results.md from the JSON files under docs/results/.

    python scripts/render_results.py        # rewrites the blocks between <!-- BEGIN x --> / <!-- END x -->
    python scripts/render_results.py --only e2e kernels_cpu     # just these blocks

Tables are generated, never typed, so every number in them is one a script measured.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "results"
DOC = ROOT / "docs" / "results.md"


def _label(row: dict) -> str:
    if row["method"] == "fp16":
        return "fp16"
    names = {"rtn": "RTN", "gptq": "GPTQ", "squeezellm": "SqueezeLLM", "lnq": "LNQ", "qtip": "QTIP (trellis)"}
    label = names.get(row["method"], row["method"])
    label += f" + GuidedQuant (g={row['groups']})" if row["guided"] else ""
    if (row.get("options") or {}).get("qtip_group_rht") is False:
        label += ", one output RHT (paper code)"
    if (row.get("options") or {}).get("guided_shrink"):
        label += f", `--guided-shrink {row['options']['guided_shrink']}`"
    return label


def _ppl(x: float | None) -> str:
    if x is None:
        return "–"
    return f"{x:.2f}" if x < 1000 else f"{x:.1e}"


def quality_table(rows: list[dict]) -> str:
    evals = sorted({r["eval_data"] for r in rows}, key=lambda d: (not d.startswith("sotu"), d))
    bits = sorted({r["bits"] for r in rows if r["method"] != "fp16"})
    order: list[str] = []
    cell: dict[tuple[str, int, str], float] = {}
    for r in rows:
        label = _label(r)
        if label not in order:
            order.append(label)
        cell[(label, r["bits"], r["eval_data"])] = r["ppl"]
    head = "| method | " + " | ".join(f"{b}-bit {e}" for b in bits for e in evals) + " |"
    sep = "|---|" + "---|" * (len(bits) * len(evals))
    lines = [head, sep]
    for label in order:
        if label == "fp16":
            vals = [cell.get((label, 16, e)) for _ in bits for e in evals]
        else:
            vals = [cell.get((label, b, e)) for b in bits for e in evals]
        lines.append(f"| {label} | " + " | ".join(_ppl(v) for v in vals) + " |")
    return "\n".join(lines)


def cd_cost_table(rows: list[dict]) -> str:
    lines = ["| what | variant | shape | bits | seconds | ratio vs naive | how |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        shape = "x".join(map(str, r["shape"]))
        lines.append(f"| {r['what']} | {r['variant']} | {shape} | {r['bits']} | {r['seconds']:.2f} | "
                     f"{r['ratio_vs_naive']:.2f} | {r['how']} |")
    return "\n".join(lines)


def pipeline_cost_table(rows: list[dict]) -> str:
    lines = ["| stage | seconds | source |", "|---|---|---|"]
    for r in rows:
        stage = r["stage"] + (f" ({r['detail']})" if r.get("detail") else "")
        lines.append(f"| {stage} | {r['seconds']:.1f} | {r['source']} |")
    return "\n".join(lines)


def cpu_isa(flags: list[str] | None) -> str:
    """A row's CPU flags, short: the widest vector ISA and its extensions that matter here."""
    if not flags:
        return "–"
    if "avx512f" in flags:
        ext = [name for flag, name in (("avx512vbmi", "VBMI"), ("avx512_vnni", "VNNI"), ("avx512_bf16", "BF16"),
                                       ("avx512_fp16", "FP16"), ("amx_tile", "AMX")) if flag in flags]
        return "AVX-512" + (f" ({', '.join(ext)})" if ext else "")
    return "AVX2" if "avx2" in flags else ", ".join(flags)


def e2e_table(rows: list[dict]) -> str:
    lines = ["| device | CPU ISA | engine | model | format | bits | kernels | decode | lm_head | batch | new tokens | "
             "tok/s | baseline | baseline tok/s | ratio | RSS MiB | baseline RSS MiB | date |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def mib(x) -> str:
        return "–" if x is None else f"{x:.0f}"

    for r in rows:
        model = r.get("model", "SmolLM2-135M-Instruct").replace(" (random weights)", " (random)")
        kernels = ", ".join(sorted(r.get("kernels") or {})) or "–"
        lines.append(f"| {r['device']} | {cpu_isa(r.get('cpu_flags'))} | {r['engine']} | {model} | {r['format']} | "
                     f"{r['bits']} | {kernels} | {r.get('decode') or '–'} | {r.get('head', 'model')} | {r['batch']} | "
                     f"{r['new_tokens']} | {r['tok_s']:.1f} | "
                     f"{r.get('baseline', 'fp16')} | {r['fp16_tok_s']:.1f} | {r['ratio']:.2f} | "
                     f"{mib(r.get('rss_mb'))} | {mib(r.get('baseline_rss_mb'))} | {r.get('date', '–')} |")
    return "\n".join(lines)


def kernels_cpu_table(doc: dict) -> str:
    """benchmarks/cpu_kernels.py's JSON -> a line naming the run, the one-row GEMV of every layer shape with
    each variant beside dense fp32, then Inductor against the extension (every row count it ran); the
    JSON keeps every row (4, 8 and 16 activation rows of every variant too)."""
    prov = doc["provenance"]
    rows = doc["rows"]
    head = (f"{prov['cpu_model']}, {cpu_isa(prov['cpu_flags'])} (flags {', '.join(prov['cpu_flags'])}), "
            f"{prov['threads']} thread(s); memory read {prov['read_gbps']} GB/s, copy {prov['copy_gbps']} GB/s "
            f"(same run); load average {prov['load_avg_1min'][0]} -> {prov['load_avg_1min'][1]}; {prov['date']}; "
            f"`{prov['command']}`.")
    by = {(r["shape"], r["format"], r["bits"], r["rows"], r["impl"]): r for r in rows}
    isas = [i for i in ("avx512", "avx2", "portable") if any(r["impl"].endswith("-cpu-" + i) for r in rows)]
    lines = [head, "", "One activation row (decode), weights cold; us is the median call, speedup = dense fp32 us / "
             "us, GB/s = packed bytes / us of the first variant:", "",
             "| layer | n x k | format | bits | dense fp32 us | " + " | ".join(f"{i} us (speedup)" for i in isas)
             + " | packed GB/s | % of read BW |", "|---|---|---|---|---|" + "---|" * len(isas) + "---|---|"]
    seen = []
    for r in rows:
        key = (r["shape"], r["n"], r["k"], r["format"], r["bits"], r.get("group_size"))
        if r["rows"] == 1 and r["impl"] != "inductor" and key not in seen:
            seen.append(key)
    for shape, n, k, fmt, bits, gs in seen:
        cells, first = [], None
        for isa in isas:
            r = by.get((shape, fmt, bits, 1, f"{fmt}-cpu-{isa}"))
            cells.append("–" if r is None else f"{r['us']:.0f} ({r['speedup_vs_dense_fp32']:.2f})")
            first = first or r
        label = fmt + (f" (g={gs})" if gs else "")
        lines.append(f"| {shape} | {n}x{k} | {label} | {bits} | {first['dense_fp32_us']:.0f} | " + " | ".join(cells)
                     + f" | {first['gbps']:.2f} | {first['pct_read_bw']:.0f} |")
    ind = [r for r in rows if r["impl"] == "inductor"]
    if ind:
        lines += ["", "Inductor (`torch.compile` of the same unpack-lookup-multiply, the faster of its two forms) "
                  "against the extension's best variant:", "",
                  "| layer | format | bits | rows | Inductor us (form) | extension us | dense fp32 us | Inductor "
                  "speedup | extension speedup |", "|---|---|---|---|---|---|---|---|---|"]
        for r in ind:
            ext = by.get((r["shape"], r["format"], r["bits"], r["rows"], f"{r['format']}-cpu-{isas[0]}"))
            ext_us = "–" if ext is None else f"{ext['us']:.0f}"
            ext_sp = "–" if ext is None else f"{ext['speedup_vs_dense_fp32']:.2f}"
            lines.append(f"| {r['shape']} | {r['format']} | {r['bits']} | {r['rows']} | {r['us']:.0f} "
                         f"({r['impl_detail']}) | {ext_us} | {r['dense_fp32_us']:.0f} | "
                         f"{r['speedup_vs_dense_fp32']:.2f} | {ext_sp} |")
    return "\n".join(lines)


def kernels_table(doc: dict) -> str:
    """benchmarks/kernels.py's JSON -> one line naming the run, then a row per configuration."""
    def num(x, fmt: str) -> str:
        return "–" if x is None else format(x, fmt)

    prov = doc["provenance"]
    s = doc["settings"]
    commit = (prov.get("git_commit") or "?")[:10] + ("+dirty" if prov.get("git_dirty") else "")
    lines = [f"{doc['device']}, {s['dtype']}, median of {s['iters']} ({s['timer']}, L2 flush "
             f"{s['l2_flush_mib']} MiB); copy bandwidth {doc['copy_gbps']:.0f} GB/s (2 x bytes / time); "
             f"{prov['date']}, commit {commit}.", "",
             "| format | bits | layer | n x k | batch | path | us | dense us | GB/s | % copy BW | speedup vs dense "
             "| max rel err |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(doc["rows"], key=lambda r: (r["format"], r["bits"])):  # stable: run order within
        fmt = r["format"] + (f" (g={r['group_size']})" if r.get("group_size") is not None else "")
        err = num(r["max_rel_err"], ".1e") + ("" if r["check_ok"] else " FAILED")
        lines.append(f"| {fmt} | {r['bits']} | {r['shape']} | {r['n']}x{r['k']} | {r['batch']} | "
                     f"{r.get('path') or '–'} | {num(r['us'], '.1f')} | {num(r['fp16_us'], '.1f')} | "
                     f"{num(r['gbps'], '.0f')} | {num(r['pct_copy_bw'], '.1f')} | "
                     f"{num(r['speedup_vs_fp16'], '.2f')} | {err} |")
    return "\n".join(lines)


ONLY: set[str] = set()  # --only: the blocks to rewrite (empty: all)


def w4a4_speed_table(doc: dict) -> str:
    """benchmarks/w4a4_speed.py's rows: tok/s per variant and case, the ratio to the run's baseline."""
    rows = doc["rows"]
    lines = ["| variant | kernels | prefill tok/s (1 x {p}) | x {b} | decode tok/s (batch {n}) | x {b} |".format(
                 p=next((r["prompt_tokens"] for r in rows if r["case"] == "prefill"), "?"), b=doc["baseline"],
                 n=next((r["batch"] for r in rows if r["case"] == "decode"), "?")),
             "|---|---|---|---|---|---|"]
    for v in dict.fromkeys(r["variant"] for r in rows):
        pre = next(r for r in rows if r["variant"] == v and r["case"] == "prefill")
        dec = next(r for r in rows if r["variant"] == v and r["case"] == "decode")
        kern = ", ".join(f"{k} x{n}" for k, n in pre["kernels"].items()) or "dense"
        lines.append(f"| {v} | {kern} | {pre['tok_s']:.1f} | {pre['speedup_vs_baseline']:.2f} | "
                     f"{dec['tok_s']:.1f} | {dec['speedup_vs_baseline']:.2f} |")
    first = rows[0]
    cpu = (f"; CPU {first.get('cpu_model', '?')}, {first.get('threads')} threads, flags "
           f"{' '.join(first.get('cpu_flags', []))}, other jobs' load {first.get('other_cpu_load')} cores"
           if "cpu_flags" in first else "")
    lines += ["", f"{first['model']}, {first['device']}, measured {doc['date']}: `{doc['command']}`{cpu}. "
              "Median of the runs, the variants' runs interleaved; ratios against the first variant in the same run."]
    return "\n".join(lines)


def w4a4_sensitivity_table(rows: list[dict]) -> str:
    """scripts/w4a4_sensitivity.py's rows: perplexity with one kind of linear's activations raised,
    then (when measured) one decoder layer at a time."""
    names = {"none": "none (as quantized)", "qkv": "q/k/v", "o": "o", "gate_up": "gate/up", "down": "down",
             "all": "all"}
    out = []
    searched = [r for r in rows if r["kind"] == "clips"]
    per_linear = [r for r in rows if r["kind"] == "clips_linear"]
    rows = [r for r in rows if r["kind"] not in ("clips", "clips_linear")]
    for ckpt in dict.fromkeys(r["checkpoint"] for r in rows):
        rs = [r for r in rows if r["checkpoint"] == ckpt]
        base = next(r for r in rs if r["kind"] == "none")
        kinds = [k for k in names if k != "none"]
        out += [f"| activations of | {' | '.join(names[k] for k in kinds)} |", "|---|" + "---|" * len(kinds)]
        for bits in sorted({r["act_bits"] for r in rs if r["kind"] != "none"}, reverse=True):
            cells = []
            for k in kinds:
                r = next((r for r in rs if r["kind"] == k and r["layer"] is None and r["act_bits"] == bits), None)
                cells.append("–" if r is None else f"{r['ppl']:.2f}")
            label = "float" if bits >= 16 else f"{bits}-bit, unclipped"
            out.append(f"| raised to {label} | {' | '.join(cells)} |")
        per_layer = sorted((r for r in rs if r["layer"] is not None), key=lambda r: r["layer"])
        if per_layer:
            kind, bits = per_layer[0]["kind"], per_layer[0]["act_bits"]
            cells = ", ".join(f"{r['layer']}: {r['ppl']:.2f}" for r in per_layer)
            out += ["", f"One layer's {names[kind]} activations raised to {'float' if bits >= 16 else f'{bits} bits'} "
                        f"(layer: perplexity): {cells}."]
        out += ["", f"`{ckpt}` as quantized (activations {base['checkpoint_act_bits']}-bit, clip "
                    f"{base['checkpoint_act_clip']}): {base['ppl']:.2f}; {base['eval_data']}, last {base['windows']} "
                    f"x {base['ctx']} tokens; {base['machine']}, {base['date']}: `{base['command']}`.", ""]
    def where(r: dict) -> tuple:
        return r["checkpoint"], r["eval_data"], r["windows"], r["ctx"]

    for run in dict.fromkeys(where(r) for r in searched):
        rs = [r for r in searched if where(r) == run]
        start = next(r for r in rs if set(r["clips"].values()) == {r["checkpoint_act_clip"]})
        trials = [r for r in rs if r is not start]
        if not trials:  # only the starting point (measured for --clip-search linear)
            continue
        best = min(rs, key=lambda r: r["ppl"])
        clips = ", ".join(f"{names[k]} {c:g}" for k, c in best["clips"].items())
        out += [f"Activation clip ratio per kind of linear (`--clip-search kind`: coordinate descent, {len(rs)} "
                f"evaluations): best {clips}: {best['ppl']:.2f}, against {start['ppl']:.2f} with "
                f"{start['checkpoint_act_clip']:g} everywhere (`{run[0]}`, {run[1]}, last {run[2]} x {run[3]} "
                f"tokens; {trials[-1]['machine']}, {trials[-1]['date']}: `{trials[-1]['command']}`).", ""]
    from w4a4_sensitivity import KINDS  # scripts/: this script's own folder

    for r in per_linear:
        start = next(s for s in searched
                     if where(s) == where(r) and set(s["clips"].values()) == {s["checkpoint_act_clip"]})
        by_kind = {k: sorted(c for n, c in r["clips"].items() if n.endswith(KINDS[k]))
                   for k in ("qkv", "o", "gate_up", "down")}
        spans = ", ".join(f"{names[k]} {cs[0]:g}-{cs[-1]:g} (median {cs[len(cs) // 2]:g})"
                          for k, cs in by_kind.items() if cs)
        shared = " summed over the linears fed one input (`--clip-share`: q/k/v one ratio, gate/up one)" \
            if r.get("clip_share") else ""
        out += [f"Activation clip ratio per linear, the grid's least output error{shared} on {r['clip_windows']} windows "
                f"of {r['clip_data']} (`--clip-search linear`), `{r['checkpoint']}` on {r['eval_data']}, last "
                f"{r['windows']} x {r['ctx']} tokens: {r['ppl']:.2f}, against {start['ppl']:.2f} with {start['checkpoint_act_clip']:g} "
                f"everywhere; chosen: {spans} ({r['machine']}, {r['date']}: `{r['command']}`).", ""]
    return "\n".join(out).rstrip()


def replace_block(doc: str, name: str, body: str) -> str:
    if ONLY and name not in ONLY:
        return doc
    pattern = re.compile(rf"(<!-- BEGIN {name} -->\n).*?(<!-- END {name} -->)", re.S)
    if not pattern.search(doc):
        raise SystemExit(f"docs/results.md has no <!-- BEGIN {name} --> block")
    return pattern.sub(lambda m: m.group(1) + body + "\n" + m.group(2), doc)


def main() -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="+", default=[], metavar="BLOCK", help="rewrite only these blocks")
    ONLY.update(ap.parse_args().only)
    doc = DOC.read_text()
    quality = RESULTS / "quality.json"
    if quality.exists():
        doc = replace_block(doc, "quality", quality_table(json.loads(quality.read_text())))
    cd_cost = RESULTS / "cd_cost.json"
    if cd_cost.exists():
        doc = replace_block(doc, "cd_cost", cd_cost_table(json.loads(cd_cost.read_text())["rows"]))
    pipeline_cost = RESULTS / "pipeline_cost.json"
    if pipeline_cost.exists():
        doc = replace_block(doc, "pipeline_cost", pipeline_cost_table(json.loads(pipeline_cost.read_text())))
    e2e = RESULTS / "e2e.json"
    if e2e.exists():
        doc = replace_block(doc, "e2e", e2e_table(json.loads(e2e.read_text())))
    kernels_cpu = RESULTS / "cpu_kernels.json"
    if kernels_cpu.exists():
        doc = replace_block(doc, "kernels_cpu", kernels_cpu_table(json.loads(kernels_cpu.read_text())))
    kernels = RESULTS / "kernels.json"
    if kernels.exists():
        doc = replace_block(doc, "kernels", kernels_table(json.loads(kernels.read_text())))
    w4a4_speed = RESULTS / "w4a4_speed.json"
    if w4a4_speed.exists():
        doc = replace_block(doc, "w4a4_speed", w4a4_speed_table(json.loads(w4a4_speed.read_text())))
    sensitivity = RESULTS / "w4a4_sensitivity.json"
    if sensitivity.exists():
        doc = replace_block(doc, "w4a4_sensitivity", w4a4_sensitivity_table(json.loads(sensitivity.read_text())))
    variants = RESULTS / "quality_variants.json"
    if variants.exists():
        from render_quality_variants import render_blocks  # scripts/: this script's own folder

        table = json.loads(quality.read_text()) if quality.exists() else []
        for name, body in render_blocks(json.loads(variants.read_text()), table).items():
            doc = replace_block(doc, name, body)
    DOC.write_text(doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
