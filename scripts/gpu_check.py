"""GPU verification in short leases: stages prepared and smoke-tested on the CPU, each ONE command on
a bare H200 machine (the `device` tool), their results merged into docs/results/ here.

    python scripts/gpu_check.py next                  # the stage to run in the next lease
    python scripts/gpu_check.py prepare STAGE         # here: what the stage carries (wheels) into .gpu-carry/
    python scripts/gpu_check.py command STAGE         # here: the exact arguments of the device `run` call(s)
    python scripts/gpu_check.py run STAGE --out DIR   # there (or here with --smoke): run one stage
    python scripts/gpu_check.py merge DIR             # here: DIR = the call's files_at; updates docs/results/

Stages (docs/gpu.md says what each measures, its budget and the device-tool calls):
    correct   the `gpu`-marked tests (kernels vs reference, CUDA graphs, static decode, calibration and
              quantization on CUDA), in parallel workers
    kernels   benchmarks/kernels.py on Llama-2-7B shapes -> kernels.json + png
    e2e       benchmarks/e2e_random.py: the embedded engine on a Llama-2-7B-shaped random model,
              dense fp16 vs lut 2/3/4 and bcq 4, batch 1, CUDA graphs -> e2e rows with pct_of_bw_limit
    vllm      benchmarks/vllm_random.py: vLLM 0.26 + our plugin on the same shape, fp16 vs lut 3-bit vs
              vLLM's GPTQ 4-bit, batch 1/8/32 -> e2e rows with engine "vllm"
    qtip      benchmarks/qtip_cost.py: QTIP's Viterbi on CUDA (tiles/s) and one 4096x11008 layer -> qtip_cost_gpu.json
    w4a4      benchmarks/w4a4_speed.py: W4A4 (integer GEMMs, 4-bit KV cache) vs dense fp16 on a Llama-2-7B-shaped
              random model, prefill of 2048 tokens and batch-32 decode (and weight groups of 128 on the
              Triton GEMM) -> w4a4_speed_gpu.json

`run` writes DIR/<stage>/result.json (stage, result, commit, device, date, wall time, summary) and
DIR/<stage>/log.txt beside the stage's own files: at most 8 files, 2 folders down (what the device
tool brings back). `--smoke` runs the same code on the CPU on tiny shapes (Triton's interpreter, a
tiny random model), as CI does, so a lease does not meet a bug the CPU could have shown; smoke
results are never merged.

On the device the package is not installed: `run` imports this checkout through a folder of links
(gq_kernels -> kernels/, ...) with a dist-info for vLLM's plugin entry point, and the few missing
wheels (pydantic) travel in .gpu-carry/.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"
STATUS = RESULTS / "gpu_status.json"
CARRY = ".gpu-carry"
IMPORT_NAMES = {"gq_serve": "gq_serve", "gq_kernels": "kernels", "gq_quantize": "quantize"}
# Wheels the device image lacks (its package list: ../.library/device/KINDS.md), for CPython 3.12.
WHEELS = ["pydantic==2.14.3", "pydantic-core==2.50.4", "annotated-types==0.8.0", "typing-inspection==0.4.5"]
OUT_LIMITS = {"files": 8, "file_mb": 16, "total_mb": 64}


@dataclass(frozen=True)
class Stage:
    name: str
    budget_s: int  # wall time the stage may take on the device (one `run` call is at most 600 s)
    about: str


STAGES = {s.name: s for s in (
    Stage("correct", 420, "gpu-marked tests: kernels vs reference (every format, bits, 1..16 rows, fp16/bf16, "
                          "Llama-2-7B shapes), CUDA graphs through GQLinear, static decode, calibration and "
                          "quantization on CUDA"),
    Stage("kernels", 420, "benchmarks/kernels.py: every Triton-served format at 2/3/4 bits, batch 1..16, "
                          "Llama-2-7B shapes, copy bandwidth and dense F.linear in the same run"),
    Stage("e2e", 420, "benchmarks/e2e_random.py: embedded engine, Llama-2-7B-shaped random model, dense fp16 "
                      "vs lut 2/3/4 and bcq 4, batch 1, 100 tokens, static cache + CUDA graph"),
    Stage("vllm", 480, "benchmarks/vllm_random.py: vLLM 0.26 + our plugin on the same shape, fp16 vs lut 3-bit "
                       "vs vLLM's GPTQ 4-bit (g128), batch 1/8/32, CUDA graphs (vLLM carried in pieces)"),
    Stage("qtip", 420, "benchmarks/qtip_cost.py: QTIP's tail-biting Viterbi on CUDA (tiles/s per code and "
                       "bits) and one 4096x11008 layer quantized end to end, wall time per stage"),
    Stage("w4a4", 420, "benchmarks/w4a4_speed.py: W4A4KV4 (torch._int_mm vs the Triton int8 x int4 GEMM, online "
                       "Hadamard, 4-bit KV cache) vs "
                       "dense fp16 and bf16 on a Llama-2-7B-shaped random model: prefill of 2048 tokens, batch-32 "
                       "decode"),
)}
VLLM_PIECES = ".vllm-gpu-p"  # ../shared/tools/vllm-gpu/prepare.sh writes .vllm-gpu-p0..pN and .vllm-gpu-tool


# ============================================================================ device side: run
def import_dir(tmp: Path) -> Path:
    """A folder that imports this checkout under its installed names, plus a dist-info declaring the
    vLLM plugin entry point (vLLM finds plugins through package metadata)."""
    d = tmp / "gq-import"
    d.mkdir(parents=True, exist_ok=True)
    for name, folder in IMPORT_NAMES.items():
        link = d / name
        if not link.exists():
            link.symlink_to(ROOT / folder, target_is_directory=True)
    info = d / "gq_serve-0.0.0+checkout.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: gq-serve\nVersion: 0.0.0+checkout\n")
    (info / "entry_points.txt").write_text("[vllm.general_plugins]\nguidedquant = gq_serve.vllm_plugin:register\n")
    return d


def _env_with(path: Path, extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(path), *filter(None, [env.get("PYTHONPATH")])])
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def run_logged(argv: list[str], log: Path, env: dict, timeout: float) -> tuple[int, bool]:
    """Run argv in its own process group, its output appended to ``log`` (and echoed) as it comes;
    killed with its children after ``timeout`` s. Returns (returncode, timed_out)."""
    with open(log, "a") as f:
        f.write(f"$ {' '.join(argv)}\n")
        f.flush()
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, bufsize=1, start_new_session=True)

        def pump() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                f.write(line)
                f.flush()
                sys.stdout.write(line)
                sys.stdout.flush()

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            proc.wait(timeout=max(timeout, 1))
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            timed_out = True
        reader.join(10)
        if timed_out:
            f.write(f"\n[gpu_check] killed after {timeout:.0f} s (the stage's budget)\n")
    return proc.returncode, timed_out


def gpu_test_files() -> list[str]:
    """Test files holding `gpu`-marked tests (collected alone: the device lacks fastapi, vLLM, ...)."""
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py")
                  if "pytest.mark.gpu" in p.read_text())


def junit_summary(path: Path) -> dict:
    out = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failures": []}
    if not path.exists():
        return out
    for case in ET.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        if bad is not None:
            out["failed" if bad.tag == "failure" else "errors"] += 1
            out["failures"].append({"test": name, "message": (bad.get("message") or "")[:300]})
        elif case.find("skipped") is not None:
            out["skipped"] += 1
        else:
            out["passed"] += 1
    return out


def stage_correct(out: Path, smoke: bool, env: dict, timeout: float) -> tuple[str, dict]:
    argv = [sys.executable, "-P", "-m", "pytest", "-q", "-rfE", "-m", "gpu", "-p", "no:cacheprovider",
            "--junitxml", str(out / "junit.xml"), *gpu_test_files()]
    if not smoke and _has("xdist"):
        argv += ["-n", "8"]  # one GPU, 16 cores: Triton compiles and small tests in parallel
    if _has("pytest_timeout"):
        argv += ["--timeout", "300"]
    rc, timed_out = run_logged(argv, out / "log.txt", env, timeout)
    summary = junit_summary(out / "junit.xml")
    if timed_out:
        return "timeout", summary
    ran = summary["passed"] + summary["failed"] + summary["errors"]
    ok = rc in (0, 5) and summary["failed"] == summary["errors"] == 0 and (smoke or summary["passed"] > 0)
    summary["collected"] = ran + summary["skipped"]
    return ("pass" if ok else "fail"), summary


def stage_kernels(out: Path, smoke: bool, env: dict, timeout: float) -> tuple[str, dict]:
    argv = [sys.executable, "benchmarks/kernels.py", "--out", str(out / "kernels.json")]
    if smoke:
        argv += ["--allow-cpu", "--shapes", "64x96", "--bits", "2,3", "--batches", "1,3", "--iters", "2",
                 "--warmup", "0", "--copy-mb", "4", "--group-size", "32"]
    rc, timed_out = run_logged(argv, out / "log.txt", env, timeout)
    summary: dict = {}
    if (out / "kernels.json").exists():
        rows = json.loads((out / "kernels.json").read_text())["rows"]
        summary = {"rows": len(rows), "failed_checks": sum(not r["check_ok"] for r in rows)}
        b1 = [r for r in rows if r["batch"] == 1 and r["speedup_vs_fp16"] is not None]
        if b1:
            best = max(b1, key=lambda r: r["speedup_vs_fp16"])
            summary["best_batch1"] = {k: best[k] for k in ("format", "bits", "shape", "speedup_vs_fp16", "pct_copy_bw")}
    return ("timeout" if timed_out else "pass" if rc == 0 else "fail"), summary


def stage_e2e(out: Path, smoke: bool, env: dict, timeout: float) -> tuple[str, dict]:
    argv = [sys.executable, "benchmarks/e2e_random.py", "--out", str(out / "e2e.json")]
    if smoke:
        argv += ["--device", "cpu", "--shape", "tiny", "--dtype", "fp32", "--decode", "static", "--new-tokens", "8",
                 "--runs", "1", "--variants", "dense,lut:2,bcq:4"]
    else:
        argv += ["--device", "cuda", "--shape", "llama2-7b", "--dtype", "fp16", "--new-tokens", "100", "--runs", "3",
                 "--variants", "dense,lut:2,lut:3,lut:4,bcq:4"]
    rc, timed_out = run_logged(argv, out / "log.txt", env, timeout)
    summary: dict = {}
    if (out / "e2e.json").exists():
        summary = {r["variant"]: {"tok_s": r["tok_s"], "pct_of_bw_limit": r["pct_of_bw_limit"], "ratio": r["ratio"]}
                   for r in json.loads((out / "e2e.json").read_text())["rows"]}
    return ("timeout" if timed_out else "pass" if rc == 0 else "fail"), summary


def stage_vllm(out: Path, smoke: bool, env: dict, timeout: float) -> tuple[str, dict]:
    argv = [sys.executable, "benchmarks/vllm_random.py", "--out", str(out / "vllm.json")]
    if smoke:
        argv += ["--device", "cpu", "--shape", "tiny", "--variants", "fp16,lut:3", "--batches", "1,2",
                 "--new-tokens", "8", "--runs", "1"]
    else:
        argv += ["--device", "cuda", "--shape", "llama2-7b", "--variants", "fp16,lut:3,gptq:4", "--batches", "1,8,32"]
    rc, timed_out = run_logged(argv, out / "log.txt", env, timeout)
    summary: dict = {}
    if (out / "vllm.json").exists():  # written after every variant: partial results survive a timeout
        for r in json.loads((out / "vllm.json").read_text())["rows"]:
            summary[f"{r['variant']} b{r['batch']}"] = {"tok_s": r["tok_s"], "throughput_tok_s": r["throughput_tok_s"]}
    return ("timeout" if timed_out else "pass" if rc == 0 else "fail"), summary


def stage_qtip(out: Path, smoke: bool, env: dict, timeout: float) -> tuple[str, dict]:
    argv = [sys.executable, "benchmarks/qtip_cost.py", "--out", str(out / "qtip_cost.json")]
    if smoke:
        argv += ["--device", "cpu", "--codes", "hyb", "--bits", "2", "--tiles", "4", "--layer", "32x64"]
    else:
        argv += ["--device", "cuda", "--tiles", "256", "--layer", "4096x11008"]
    rc, timed_out = run_logged(argv, out / "log.txt", env, timeout)
    summary: dict = {}
    if (out / "qtip_cost.json").exists():
        for r in json.loads((out / "qtip_cost.json").read_text())["rows"]:
            key = f"{r['code']} {r['bits']}-bit" if r["kind"] == "viterbi" else f"layer {r['shape']}"
            summary[key] = {k: r[k] for k in ("tiles_per_s", "rel_mse", "wall_s") if k in r}
    return ("timeout" if timed_out else "pass" if rc == 0 else "fail"), summary


def stage_w4a4(out: Path, smoke: bool, env: dict, timeout: float) -> tuple[str, dict]:
    argv = [sys.executable, "benchmarks/w4a4_speed.py", "--out", str(out / "w4a4_speed.json")]
    if smoke:
        argv += ["--device", "cpu", "--shape", "tiny-had", "--dtype", "fp32", "--variants", "dense:fp32,w4a4,w4a4:4:w64",
                 "--prefill-tokens", "64", "--batch", "4", "--prompt-tokens", "8", "--decode-steps", "2", "--runs", "1"]
    else:
        argv += ["--device", "cuda", "--shape", "llama2-7b", "--dtype", "fp16", "--variants",
                 "dense:fp16,dense:bf16,w4a4@w4a4-int,w4a4@w4a4-triton,w4a4:4:w128@w4a4-triton", "--prefill-tokens", "2048", "--batch", "32",
                 "--prompt-tokens", "128",
                 "--decode-steps", "32", "--runs", "3"]
    rc, timed_out = run_logged(argv, out / "log.txt", env, timeout)
    summary: dict = {}
    if (out / "w4a4_speed.json").exists():
        for r in json.loads((out / "w4a4_speed.json").read_text())["rows"]:
            summary[f"{r['variant']} {r['case']}"] = {"tok_s": r["tok_s"], "speedup": r["speedup_vs_baseline"]}
    return ("timeout" if timed_out else "pass" if rc == 0 else "fail"), summary


RUNNERS = {"correct": stage_correct, "kernels": stage_kernels, "e2e": stage_e2e, "vllm": stage_vllm,
           "qtip": stage_qtip, "w4a4": stage_w4a4}


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def device_description() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            return f"{p.name} (sm_{p.major}{p.minor}), torch {torch.__version__}"
        return f"CPU ({platform.machine()}), torch {torch.__version__}"
    except ImportError:
        return f"{platform.machine()} (no torch)"


def missing_modules(smoke: bool, stage: str = "") -> list[str]:
    need = ["torch", "transformers", "safetensors", "pydantic", "numpy"]
    need += {"kernels": ["matplotlib"], "vllm": ["vllm"]}.get(stage, [])
    if not smoke:
        need.append("triton")
    return [m for m in need if not _has(m)]


def cmd_run(args) -> int:
    stage = STAGES[args.stage]
    t0 = time.monotonic()
    out = Path(args.out) / stage.name
    out.mkdir(parents=True, exist_ok=True)
    (out / "log.txt").write_text(f"[gpu_check] stage {stage.name} ({'smoke' if args.smoke else 'device'}), "
                                 f"{date.today().isoformat()}, budget {args.budget or stage.budget_s} s\n")
    result = {"stage": stage.name, "smoke": args.smoke, "commit": args.commit, "dirty": args.dirty,
              "device": device_description(), "date": date.today().isoformat()}
    missing = missing_modules(args.smoke, stage.name)
    if not args.smoke:
        import torch

        if not torch.cuda.is_available():
            missing.append("a CUDA device (use --smoke on the CPU)")
    if missing:
        result.update(result="error", summary={"missing": missing,
                                               "fix": "python scripts/gpu_check.py prepare STAGE, and carry .gpu-carry"})
    else:
        tmp = Path(tempfile.mkdtemp(prefix="gq-check-"))
        extra = {"TRITON_INTERPRET": "1"} if args.smoke else {}
        env = _env_with(import_dir(tmp), extra)
        if args.block:
            env["PYTHONPATH"] = os.pathsep.join([str(_blocker(tmp, args.block)), env["PYTHONPATH"]])
        budget = (args.budget or stage.budget_s) - (time.monotonic() - t0) - 5
        res, summary = RUNNERS[stage.name](out, args.smoke, env, budget)
        result.update(result=res, summary=summary)
    result["wall_s"] = round(time.monotonic() - t0, 1)
    (out / "result.json").write_text(json.dumps(result, indent=1) + "\n")
    problems = check_out_limits(Path(args.out))
    if problems:
        print("[gpu_check] output will not all come back: " + "; ".join(problems), file=sys.stderr)
        return 1
    print(f"[gpu_check] {stage.name}: {result['result']} in {result['wall_s']} s -> {out}")
    return 0 if result["result"] == "pass" else 1


def _blocker(tmp: Path, names: list[str]) -> Path:
    """A folder whose modules shadow ``names`` with an ImportError: the smoke run meets the device's
    missing packages (fastapi, uvicorn, vllm, gguf) where it would."""
    d = tmp / "blocked"
    d.mkdir(exist_ok=True)
    for n in names:
        (d / f"{n}.py").write_text(f"raise ImportError('{n} is not installed on the GPU machine')\n")
    return d


def check_out_limits(out: Path) -> list[str]:
    """What the device tool would not bring back from $OUT (its README: files, sizes, depth, names)."""
    files = [p for p in out.rglob("*") if p.is_file()]
    problems = []
    if len(files) > OUT_LIMITS["files"]:
        problems.append(f"{len(files)} files > {OUT_LIMITS['files']}")
    total = 0
    for p in files:
        rel = p.relative_to(out)
        size = p.stat().st_size
        total += size
        if len(rel.parts) > 3:
            problems.append(f"{rel} is more than 2 folders down")
        if size > OUT_LIMITS["file_mb"] << 20:
            problems.append(f"{rel} is {size >> 20} MiB > {OUT_LIMITS['file_mb']}")
        if any(not all(c.isalnum() or c in "._-" for c in part) for part in rel.parts):
            problems.append(f"{rel} has characters other than letters, digits, '.', '_', '-'")
    if total > OUT_LIMITS["total_mb"] << 20:
        problems.append(f"{total >> 20} MiB in all > {OUT_LIMITS['total_mb']}")
    return problems


# ============================================================================ here: plan, carry, merge
def read_status(path: Path = STATUS) -> dict:
    return json.loads(path.read_text()) if path.exists() else {"stages": {}}


def next_stage(status: dict) -> tuple[str, str]:
    """(stage, why): the first stage in order that has not passed on a GPU, else the oldest pass."""
    stages = status.get("stages", {})
    for name in STAGES:
        st = stages.get(name)
        if st is None:
            return name, "never run on a GPU"
        if st.get("result") != "pass":
            return name, f"last run {st.get('date')} at {str(st.get('commit'))[:10]}: {st.get('result')}"
    name = min(STAGES, key=lambda n: (stages[n].get("date") or "", list(STAGES).index(n)))
    return name, f"every stage passed; {name} is the oldest ({stages[name].get('date')})"


def cmd_next(args) -> int:
    name, why = next_stage(read_status(Path(args.status)))
    print(f"{name}: {why}\n  {STAGES[name].about}\n  python scripts/gpu_check.py prepare {name} && "
          f"python scripts/gpu_check.py command {name}")
    return 0


def _git(*a: str) -> str:
    return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()


def device_calls(stage: str, root: Path = ROOT) -> list[dict]:
    """The device tool's `run` calls for ``stage``, in order (each command at most 2000 chars).

    One call per stage, except ``vllm``: vLLM travels in 60 MiB pieces, one `run` each, sent in ONE
    message so the machine stays warm; the last call installs it and runs the stage.
    """
    try:
        commit = _git("rev-parse", "HEAD")
        dirty = bool(_git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.CalledProcessError):
        commit, dirty = "unknown", True
    run = (f"python3 scripts/gpu_check.py run {stage} --out $OUT --commit {commit}" + (" --dirty" if dirty else ""))
    prefix = "set -o pipefail; export PYTHONUNBUFFERED=1; "
    timeout = min(600, STAGES[stage].budget_s + 120)
    if stage != "vllm":
        install = (f"python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "
                   f"{CARRY}/whl/*.whl && export PYTHONPATH=/tmp/site && ")
        return [{"command": prefix + install + run, "carry": [CARRY], "timeout_s": timeout}]
    pieces = sorted(p.name for p in root.glob(VLLM_PIECES + "*") if p.name[len(VLLM_PIECES):].isdigit())
    if not pieces:
        raise SystemExit("no vLLM pieces: run `python scripts/gpu_check.py prepare vllm` first")
    calls = [{"command": f"mkdir -p /tmp/vw && cp {p}/* /tmp/vw/", "carry": [p], "timeout_s": 120}
             for p in pieces[:-1]]
    # vLLM's wheels bring pydantic (the same versions as WHEELS): nothing else to install.
    calls.append({"command": prefix + f"mkdir -p /tmp/vw && cp {pieces[-1]}/* /tmp/vw/ && bash .vllm-gpu-tool/"
                  f"install-on-device.sh && export PYTHONPATH=/tmp/site && " + run,
                  "carry": [pieces[-1], ".vllm-gpu-tool"], "timeout_s": timeout})
    return calls


def cmd_command(args) -> int:
    print(json.dumps(device_calls(args.stage), indent=1))
    return 0


def cmd_prepare(args) -> int:
    """Download what the stage carries: the wheels the device lacks into .gpu-carry/whl, and for
    ``vllm`` the vLLM pieces (../shared/tools/vllm-gpu/prepare.sh); all git-ignored."""
    if args.stage == "vllm":
        tool = ROOT.parent / "shared" / "tools" / "vllm-gpu" / "prepare.sh"
        if not tool.exists():
            raise SystemExit(f"{tool} not found: the vLLM stage needs the shared vllm-gpu tool")
        subprocess.run(["bash", str(tool)], cwd=ROOT, check=True)
        return 0
    dest = ROOT / CARRY / "whl"
    dest.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
            "3.12", "--implementation", "cp", "-d", str(dest)]
    for tag in ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"):
        argv += ["--platform", tag]
    subprocess.run(argv + WHEELS, check=True)
    got = sorted(p.name for p in dest.glob("*.whl"))
    size = sum(p.stat().st_size for p in dest.glob("*.whl"))
    print(f"{dest}: {len(got)} wheels, {size / 2**20:.1f} MiB: {', '.join(got)}")
    return 0


def merge(src: Path, results: Path = RESULTS) -> list[str]:
    """Merge stage outputs under ``src`` into ``results``; returns what was done. Smoke results and
    stages that did not pass update the status file only."""
    status_path = results / STATUS.name
    status = read_status(status_path)
    done = []
    for res_file in sorted(src.glob("*/result.json")):
        res = json.loads(res_file.read_text())
        stage, out = res["stage"], res_file.parent
        if res.get("smoke"):
            done.append(f"{stage}: smoke result, not merged")
            continue
        status.setdefault("stages", {})[stage] = {k: res.get(k) for k in
                                                  ("commit", "dirty", "device", "date", "result", "wall_s", "summary")}
        done.append(f"{stage}: {res['result']}")
        if res["result"] != "pass":
            continue
        if stage == "correct":
            shutil.copyfile(out / "junit.xml", results / "gpu_correct.xml")
        elif stage == "kernels":
            for name in ("kernels.json", "kernels.png"):
                shutil.copyfile(out / name, results / name)
        elif stage in ("e2e", "vllm"):
            merge_e2e_rows(json.loads((out / f"{stage}.json").read_text())["rows"], results / "e2e.json")
        elif stage == "qtip":
            shutil.copyfile(out / "qtip_cost.json", results / "qtip_cost_gpu.json")
        elif stage == "w4a4":
            shutil.copyfile(out / "w4a4_speed.json", results / "w4a4_speed_gpu.json")
    tmp = status_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(status, indent=1) + "\n")
    tmp.replace(status_path)
    return done


def merge_e2e_rows(new: list[dict], path: Path) -> None:
    """Replace rows of the same (device, engine, model, format, bits, batch) and append the rest."""
    def key(r):
        return r["device"], r["engine"], r["model"], r["format"], r["bits"], r["batch"]

    rows = json.loads(path.read_text()) if path.exists() else []
    fresh = {key(r) for r in new}
    rows = [r for r in rows if key(r) not in fresh] + new
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(rows, indent=1) + "\n")
    tmp.replace(path)


def cmd_merge(args) -> int:
    for line in merge(Path(args.dir)):
        print(line)
    subprocess.run([sys.executable, str(ROOT / "scripts" / "render_results.py")], check=True)
    print("rendered docs/results.md; commit docs/results/ with the stage's numbers")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run one stage (on the GPU machine, or with --smoke on the CPU)")
    r.add_argument("stage", choices=list(STAGES))
    r.add_argument("--out", required=True, help="output folder ($OUT on the device)")
    r.add_argument("--smoke", action="store_true", help="CPU, tiny shapes: what CI runs")
    r.add_argument("--commit", default=None, help="the commit the working tree is at (the device has no .git)")
    r.add_argument("--dirty", action="store_true", help="the working tree had uncommitted changes")
    r.add_argument("--budget", type=int, default=None, help="seconds (default: the stage's budget)")
    r.add_argument("--block", nargs="*", default=[], help="modules to make unimportable (simulate the device image)")
    r.set_defaults(func=cmd_run)
    n = sub.add_parser("next", help="name the next stage to run")
    n.add_argument("--status", default=str(STATUS))
    n.set_defaults(func=cmd_next)
    c = sub.add_parser("command", help="print the device `run` call for a stage")
    c.add_argument("stage", choices=list(STAGES))
    c.set_defaults(func=cmd_command)
    p = sub.add_parser("prepare", help="download what the stage carries into .gpu-carry/")
    p.add_argument("stage", choices=list(STAGES))
    p.set_defaults(func=cmd_prepare)
    m = sub.add_parser("merge", help="merge a call's returned files into docs/results/")
    m.add_argument("dir")
    m.set_defaults(func=cmd_merge)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
