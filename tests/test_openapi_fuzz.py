"""schemathesis over the whole /openapi.json of a real `gq serve` process (issue 13): every check,
at least 200 cases for each generation endpoint, bodies included, 0 failures.

Bounded: a fixed seed, a per-operation cap on generated cases, one worker, and a timeout.
"""
from __future__ import annotations

import importlib.util
import socket
import subprocess
import sys
import time

import httpx
import pytest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("schemathesis") is None, reason="schemathesis is not installed"),
]


def test_schemathesis_finds_nothing(tiny_lm_dir, tmp_path):
    from openapi_fuzz.runner import run_schemathesis

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    key = "st-key"
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "gq_serve.cli", "serve", str(tiny_lm_dir), "--port", str(port),
                             "--api-key", key, "--max-queue", "64", "--threads", "1", "--log-level", "warning"],
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "server.log").read_text()
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        result = run_schemathesis(url, tmp_path / "st", api_key=key, max_examples=200, seed=1, timeout=1200)
        assert result["exit_code"] == 0, result["output"]
        per_op = result["cases_per_operation"]
        print(f"\nschemathesis: {result['cases']} cases, {per_op}")
        for op in ("POST /v1/completions", "POST /v1/chat/completions"):
            assert per_op.get(op, 0) >= 200, per_op
        assert set(per_op) >= {"GET /health", "GET /metrics", "GET /v1/models"}
        assert "Traceback" not in (tmp_path / "server.log").read_text()
    finally:
        proc.terminate()
        proc.wait(30)
