"""Offline instruction counts of the GEMV kernels (no GPU needed).

Compiles ``kernels.lut`` / ``kernels.bcq`` GEMV kernels (and the trellis / w4a4 kernels on request)
for a given CUDA arch with the configs their
``_gemv_config`` returns, disassembles the cubin with the ``nvdisasm`` that ships with Triton, finds
the main loop (the longest backward branch; the whole kernel when there is none), and reports
lane-instructions per weight:

    per weight = loop instructions per warp * 32 / weights one warp handles per loop iteration

and per weight and x row (divided by the x rows one decode of the weights serves: M / programs
along M). Also prints the instruction mix of the loop and checks the PTX for local-memory spills
(st.local).

Budget at batch 1 on an H100 (memory bound): 132 SMs x 4 schedulers x ~1.75 GHz x 32 lanes
~ 29.6 T lane-instr/s against 3.35 TB/s / (bits / 8) B per weight -> ~2.2 / 3.3 / 4.4
lane-instructions per weight at 2 / 3 / 4 bits.

Usage:
    python benchmarks/kernel_sass.py --arch 90 --kernels lut,bcq [--out counts.json]
    python benchmarks/kernel_sass.py --arch 80,86,89,90,120 --matrix   # every config, spills only
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile


import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from gq_kernels.packing import packed_words  # noqa: E402

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (12288, 4096), (22016, 4096), (576, 1536)]
MIX = ["LDG", "FFMA", "FADD", "SHF", "LOP3", "LEA", "IMAD", "IADD3", "SEL", "ISETP", "SHFL", "LDS",
       "STS", "BAR", "PRMT", "HADD2", "F2F", "I2F"]
NVDISASM = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")


_CACHE: dict = {}


def compile_kernel(fn, signature, constexprs, aligned, arch, **options):
    """triton.compile for a CUDA target without a device; ``aligned`` args get divisibility 16.
    Identical requests (same kernel, signature, constants, alignment, arch, options) compile once."""
    key = (fn.__name__, tuple(signature.items()), tuple(sorted(constexprs.items())), tuple(sorted(aligned)), arch,
           tuple(sorted(options.items())))
    if key not in _CACHE:
        _CACHE[key] = _compile(fn, signature, constexprs, aligned, arch, **options)
    return _CACHE[key]


def _compile(fn, signature, constexprs, aligned, arch, **options):
    names = list(signature)
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in aligned}
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


def loop_stats(compiled, whole: bool = False) -> tuple[int, dict, bool]:
    """(instructions in the main loop, opcode histogram, whether a loop was found).

    ``whole``: count the whole kernel instead (minus the trailing self-branch and NOP padding);
    used when the K loop may be unrolled away (lut at K = 4096 is a single chunk)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        sass = subprocess.run([NVDISASM, "-c", f.name], capture_output=True, text=True, check=True).stdout
    lines = sass.splitlines()
    span = None
    for i, line in enumerate(lines):
        m = re.search(r"BRA `\((\.L_x_\d+)\)", line)
        if not m:
            continue
        tgt = next((j for j, x in enumerate(lines) if x.startswith(m.group(1) + ":")), None)
        if tgt is not None and tgt < i and (span is None or i - tgt > span[1] - span[0]):
            span = (tgt, i)
    if whole:
        span = None
    body = lines[span[0]:span[1] + 1] if span else lines
    body = [x for x in body if re.search(r"/\*[0-9a-f]{4}\*/", x)]
    if span is None:
        body = [x for x in body if not re.search(r"\*/\s+(NOP|BRA `\(\.L_x_\d+\)\s*;)", x)
                or re.search(r"\*/\s+@", x)]
    ops: dict[str, int] = {}
    for line in body:
        m = re.search(r"\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", line)
        if m:
            ops[m.group(2)] = ops.get(m.group(2), 0) + 1
    return len(body), ops, span is not None


# ------------------------------------------------------------------------------------------ lut
def lut_cases(arch, shapes, ms, bits_list, dtype="fp16"):
    import gq_kernels.lut.triton_kernels as L
    for n, k in shapes:
        for m in ms:
            for bits in bits_list:
                cfg = L._gemv_config(m, n, k, bits)
                kw = packed_words(k)
                if cfg["PATH"] == "dot":
                    sig = {"x_ptr": f"*{dtype}", "qweight_ptr": "*i32", "codebook_ptr": "*fp16", "out_ptr": f"*{dtype}",
                           "M": "i32", "N": "i32", "K": "i32", "KW": "i32", "stride_xm": "i32", "stride_om": "i32",
                           "BITS": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr",
                           "BLOCK_W": "constexpr"}
                    consts = dict(BITS=bits, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_W=cfg["BLOCK_W"])
                    aligned = ["x_ptr", "qweight_ptr", "codebook_ptr", "out_ptr"] + [
                        a for a, v in (("N", n), ("K", k), ("KW", kw), ("stride_xm", k), ("stride_om", n))
                        if v % 16 == 0]
                    c = compile_kernel(L._lut_gemv_dot_kernel, sig, consts, aligned, arch,
                                       num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
                    # One loop iteration: a [BLOCK_N, 32 * BLOCK_W] tile shared by the warps.
                    yield dict(kernel="lut", whole=False, n=n, k=k, m=m, bits=bits, cfg=cfg, compiled=c,
                               weights_per_warp=cfg["BLOCK_N"] * cfg["BLOCK_W"] * 32 // cfg["num_warps"],
                               block_m=m)
                    continue
                nch = triton.cdiv(kw, cfg["NL"] * cfg["BW"])
                cb = "*fp32" if bits <= 4 else f"*{dtype}"
                sig = {"xf_ptr": "*fp32", "q_ptr": "*i32", "cb_ptr": cb, "y_ptr": f"*{dtype}", "M": "i32",
                       "N": "i32", "stride_ym": "i32", "KW": "constexpr", "BITS": "constexpr",
                       "BLOCK_M": "constexpr", "BLOCK_R": "constexpr", "NL": "constexpr", "BW": "constexpr",
                       "NCH": "constexpr"}
                consts = dict(KW=kw, BITS=bits, BLOCK_M=cfg["BLOCK_M"], BLOCK_R=cfg["BLOCK_R"], NL=cfg["NL"],
                              BW=cfg["BW"], NCH=nch)
                aligned = ["xf_ptr", "q_ptr", "cb_ptr", "y_ptr"] + (["N"] if n % 16 == 0 else []) + (
                    ["stride_ym"] if n % 16 == 0 else [])
                c = compile_kernel(L._lut_gemv_kernel, sig, consts, aligned, arch,
                                   num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
                # One chunk per loop iteration; when K fits one chunk the loop is gone and the whole
                # kernel is counted. Every warp covers one row x NL * BW words per chunk.
                weights_per_warp = cfg["NL"] * cfg["BW"] * 32 * (cfg["BLOCK_R"] // cfg["num_warps"])
                # x rows one decode serves on average (M = 8 with BLOCK_M = 4: two programs, 4 each).
                yield dict(kernel="lut", whole=nch == 1, n=n, k=k, m=m, bits=bits, cfg=cfg, compiled=c,
                           weights_per_warp=weights_per_warp, block_m=m / triton.cdiv(m, cfg["BLOCK_M"]))
    # the prologue kernel, once per x dtype / BLOCK_M
    for bm in (1, 2, 4):
        for prep_cb in (True, False):
            sig = {"x_ptr": f"*{dtype}", "cb_ptr": "*fp16", "xf_ptr": "*fp32", "cbf_ptr": "*fp32", "M": "i32",
                   "K": "i32", "stride_xm": "i32", "n_x": "i32", "n_cb": "i32", "NCH": "constexpr",
                   "NL": "constexpr", "BW": "constexpr", "BLOCK_M": "constexpr", "PREP_CB": "constexpr",
                   "ROUND_BF16": "constexpr", "BLOCK": "constexpr"}
            consts = dict(NCH=1, NL=32, BW=4, BLOCK_M=bm, PREP_CB=prep_cb, ROUND_BF16=dtype == "bf16",
                          BLOCK=L._PREP_BLOCK)
            c = compile_kernel(L._lut_prep_kernel, sig, consts, ["x_ptr", "cb_ptr", "xf_ptr", "cbf_ptr"], arch,
                               num_warps=4)
            yield dict(kernel="lut_prep", n=0, k=0, m=bm, bits=0, cfg=consts, compiled=c, weights_per_warp=0,
                       block_m=bm)


# ------------------------------------------------------------------------------------------ bcq
def bcq_cases(arch, shapes, ms, bits_list, dtype="fp16", group_size=128):
    import gq_kernels.bcq.triton_kernels as B
    for n, k in shapes:
        for m in ms:
            for bits in bits_list:
                if bits not in B.SUPPORTED_BITS:
                    continue
                cfg = B._gemv_config(m, n, k, bits, group_size)
                kw = packed_words(k)
                ng = 1 if group_size == -1 else -(-k // group_size)
                mode = 2 if ng == 1 else (1 if group_size % (32 * cfg["BLOCK_W"]) == 0 else 0)
                sig = {"t_ptr": "*fp32", "xs_ptr": "*fp32", "q_ptr": "*i32", "s_ptr": "*fp16", "o_ptr": "*fp16",
                       "y_ptr": "*fp32" if cfg["SPLIT_K"] > 1 else f"*{dtype}", "M": "i32", "N": "i32",
                       "n_groups": "i32", "n_tiles": "i32", "tiles_per_split": "i32", "KW": "constexpr",
                       "GROUP_SIZE": "constexpr", "BITS": "constexpr", "BLOCK_M": "constexpr",
                       "BLOCK_N": "constexpr", "BLOCK_W": "constexpr", "GROUP_MODE": "constexpr",
                       "SPLIT_K": "constexpr"}
                consts = dict(KW=kw, GROUP_SIZE=group_size if mode != 2 else 0, BITS=bits, BLOCK_M=cfg["BLOCK_M"],
                              BLOCK_N=cfg["BLOCK_N"], BLOCK_W=cfg["BLOCK_W"], GROUP_MODE=mode,
                              SPLIT_K=cfg["SPLIT_K"])
                aligned = ["t_ptr", "xs_ptr", "q_ptr", "s_ptr", "o_ptr", "y_ptr"] + [
                    a for a, v in (("N", n), ("n_groups", ng)) if v % 16 == 0]
                c = compile_kernel(B._bcq_gemv_kernel, sig, consts, aligned, arch,
                                   num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
                # One loop iteration (a tile): one row per thread x BLOCK_W words.
                weights_per_warp = 32 * cfg["BLOCK_W"] * 32
                yield dict(kernel="bcq", n=n, k=k, m=m, bits=bits, cfg=cfg, compiled=c,
                           weights_per_warp=weights_per_warp, block_m=m / triton.cdiv(m, cfg["BLOCK_M"]))


# ------------------------------------------------------------------------------------------ trellis
def trellis_cases(arch, shapes, ms, bits_list, dtype="fp16", code="hyb"):
    """The trellis GEMV (HYB by default): n x k = out x in; x arrives in fp32 after the input Hadamard."""
    import gq_kernels.trellis.triton_kernels as T
    for n, k in shapes:
        if n % 16 or k % 16:
            continue
        nt = k // 16
        tpi = T._tpi(nt)
        for m in ms:
            if not 1 <= m <= 8:
                continue
            block_m = 1 if m == 1 else (2 if m == 2 else (4 if m <= 4 else 8))
            for bits in bits_list:
                if bits not in (2, 3, 4):
                    continue
                sig = {"x_ptr": "*fp32", "words_ptr": "*i16", "tlut_ptr": "*i32", "part_ptr": "*fp32", "M": "i32",
                       "N_OUT": "i32", "NT": "i32", "TILES_PER_SPLIT": "i32", "BITS": "constexpr", "V": "constexpr",
                       "CODE": "constexpr", "TPI": "constexpr", "BLOCK_M": "constexpr"}
                consts = dict(BITS=bits, V=2 if code == "hyb" else 1, CODE=T.CODE_IDS[code], TPI=tpi, BLOCK_M=block_m)
                aligned = ["x_ptr", "words_ptr", "tlut_ptr", "part_ptr", "N_OUT"] + (["NT"] if nt % 16 == 0 else [])
                c = compile_kernel(T._trellis_gemv_kernel, sig, consts, aligned, arch, num_warps=4)
                # One loop iteration: a [16, 16 * TPI] block of weights shared by the program's 4 warps.
                yield dict(kernel="trellis", n=n, k=k, m=m, bits=bits, cfg=dict(consts, num_warps=4), compiled=c,
                           weights_per_warp=16 * 16 * tpi // 4, block_m=m)
    # the Hadamard transform around it, for the factorisations Llama and SmolLM2 sizes use
    for K, P in ((172, 64), (1, 4096), (28, 512), (36, 16), (12, 4)):
        KP = 1 if K == 1 else max(16, triton.next_power_of_2(K))
        sig = {"x_ptr": "*fp32", "hk_ptr": "*fp32", "out_ptr": "*fp32", "NB": "i32", "SCALE": "fp32",
               "K": "constexpr", "KP": "constexpr", "P": "constexpr", "LOGP": "constexpr", "TRANSPOSE": "constexpr"}
        consts = dict(K=K, KP=KP, P=P, LOGP=P.bit_length() - 1, TRANSPOSE=False)
        c = compile_kernel(T._rht_kernel, sig, consts, ["x_ptr", "hk_ptr", "out_ptr"], arch,
                           num_warps=4 if KP * P <= 4096 else 8)
        yield dict(kernel="trellis_rht", n=K * P, k=0, m=0, bits=0, cfg=consts, compiled=c, weights_per_warp=0,
                   block_m=1)


# ------------------------------------------------------------------------------------------ w4a4
def w4a4_cases(arch, shapes, ms, bits_list, dtype="fp16"):
    """The w4a4 int8 x int4 GEMM (per-token and head_dim-128 activation groups, and weight groups of
    128 columns with per-token activations; the rows given plus a 2048-row prefill tile) and its
    activation quantization kernel. ``bits_list`` is unused: weights are 4-bit nibbles, activations
    4-bit (8-bit only changes a constant shift)."""
    import gq_kernels.w4a4.triton_kernels as W
    for n, k in shapes:
        for m in sorted({*ms, 2048}):
            for group, wgroup in ((0, 0), (128, 0), (0, 128)):
                if k % (group or wgroup or k):
                    continue
                cfg = W.gemm_config(m, n, k, group or wgroup)
                sig = {"a_ptr": "*i8", "w_ptr": "*u8", "sx_ptr": "*fp32", "zx_ptr": "*fp32", "rs_ptr": "*i32",
                       "sw_ptr": "*fp32", "bias_ptr": f"*{dtype}", "y_ptr": f"*{dtype}", "M": "i32", "N": "i32",
                       "K": "i32", "G": "i32", "GS": "i32", "GA": "i32", "PER_A": "i32", "GW": "i32",
                       "PER_W": "i32", "stride_am": "i32", "stride_wn": "i32",
                       "stride_ym": "i32", "SHIFT": "constexpr", "MODE": "constexpr", "EVEN_K": "constexpr",
                       "HAS_BIAS": "constexpr", "W_GROUPED": "constexpr", "BLOCK_M": "constexpr",
                       "BLOCK_N": "constexpr", "BLOCK_K": "constexpr", "GROUP_M": "constexpr"}
                consts = {key: cfg[key] for key in ("MODE", "EVEN_K", "BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")}
                consts.update(SHIFT=0, HAS_BIAS=False, W_GROUPED=bool(wgroup))
                aligned = ["a_ptr", "w_ptr", "sx_ptr", "zx_ptr", "rs_ptr", "sw_ptr", "bias_ptr", "y_ptr"] + [
                    a for a, v in (("N", n), ("K", k), ("stride_am", k), ("stride_wn", k // 2), ("stride_ym", n))
                    if v % 16 == 0]
                c = compile_kernel(W._w4a4_gemm_kernel, sig, consts, aligned, arch,
                                   num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
                # One loop iteration: a [BLOCK_N, BLOCK_K] weight tile shared by the program's warps.
                yield dict(kernel="w4a4", n=n, k=k, m=m, bits=4, cfg=dict(cfg, group=group, wgroup=wgroup), compiled=c,
                           weights_per_warp=cfg["BLOCK_N"] * cfg["BLOCK_K"] // cfg["num_warps"],
                           block_m=min(m, cfg["BLOCK_M"]))
    for block in (1024, 128):
        sig = {"x_ptr": f"*{dtype}", "q_ptr": "*i8", "s_ptr": "*fp32", "z_ptr": "*fp32", "G": "i32", "GS": "i32",
               "stride_xm": "i32", "stride_qm": "i32", "clip": "fp32", "MAXQ": "constexpr", "SHIFT": "constexpr",
               "BLOCK": "constexpr"}
        consts = dict(MAXQ=15, SHIFT=0, BLOCK=block)
        c = compile_kernel(W._w4a4_quant_kernel, sig, consts, ["x_ptr", "q_ptr", "s_ptr", "z_ptr"], arch,
                           num_warps=4 if block >= 512 else 2, enable_fp_fusion=False)
        yield dict(kernel="w4a4_quant", n=0, k=0, m=block, bits=0, cfg=consts, compiled=c, weights_per_warp=0,
                   block_m=1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="90", help="comma-separated SM versions, e.g. 80,86,89,90,120")
    ap.add_argument("--kernels", default="lut,bcq", help="comma-separated: lut, bcq, trellis, w4a4")
    ap.add_argument("--shapes", default="4096x4096", help="NxK list, or 'llama' for the Llama-2-7B shapes + 576x1536")
    ap.add_argument("--m", default="1,8", help="comma-separated x row counts")
    ap.add_argument("--bits", default="2,3,4", help="comma-separated bit widths")
    ap.add_argument("--dtype", default="fp16", choices=["fp16", "bf16"])
    ap.add_argument("--matrix", action="store_true",
                    help="every config: Llama shapes, M 1..16, bits 2/3/4/8; fail on errors or spills")
    ap.add_argument("--out", help="write the rows as JSON here")
    args = ap.parse_args(argv)

    if args.matrix:
        shapes, ms, bits_list = SHAPES, list(range(1, 17)), [2, 3, 4, 8]
    else:
        shapes = SHAPES if args.shapes == "llama" else [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
        ms = [int(v) for v in args.m.split(",")]
        bits_list = [int(v) for v in args.bits.split(",")]
    gens = {"lut": lut_cases, "bcq": bcq_cases, "trellis": trellis_cases, "w4a4": w4a4_cases}
    rows, failures, seen = [], 0, set()
    for arch in [int(a) for a in args.arch.split(",")]:
        for name in args.kernels.split(","):
            for case in gens[name](arch, shapes, ms, bits_list, args.dtype):
                c = case.pop("compiled")
                spills = c.asm["ptx"].count("st.local")
                whole = case.pop("whole", False)
                key = (arch, case["kernel"], repr(case["cfg"]), case["bits"], case["k"], case["n"] % 16 == 0)
                row = dict(arch=arch, **{k: v for k, v in case.items() if k != "cfg"}, cfg=case["cfg"],
                           spills=spills, regs=c.n_regs if hasattr(c, "n_regs") else None)
                failures += spills > 0
                if args.matrix:
                    if key not in seen:
                        seen.add(key)
                        rows.append(row)
                    continue
                n_instr, ops, found = loop_stats(c, whole)
                row.update(loop_instr=n_instr, loop_found=found, mix={k: ops.get(k, 0) for k in MIX if ops.get(k)})
                if case["weights_per_warp"]:
                    row["per_weight"] = n_instr * 32 / case["weights_per_warp"]
                    row["per_weight_per_xrow"] = row["per_weight"] / case["block_m"]
                rows.append(row)
                if "per_weight" in row:
                    print(f"sm_{arch} {row['kernel']:4s} {row['n']:>5}x{row['k']:<5} M={row['m']:<2} bits={row['bits']} "
                          f"rows/decode={case['block_m']:g} loop={n_instr:5d} per_weight={row['per_weight']:6.2f} "
                          f"per_weight_per_xrow={row['per_weight_per_xrow']:5.2f} spills={spills} "
                          f"mix={' '.join(f'{k}={v}' for k, v in row['mix'].items())}")
                else:
                    print(f"sm_{arch} {row['kernel']} M-block={row['m']} spills={spills}")
    if args.matrix:
        print(f"compiled {len(rows)} distinct configs; spills in {failures}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1, default=str)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
