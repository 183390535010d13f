"""`gq serve --engine hf` on SIGTERM (issue 13): drains what it accepted, answers new requests 503,
exits 0, within a bounded time (gq_serve/lifecycle.py).

The server runs as a real `gq serve` process on a tiny random Llama with a long context, so that
requests of a few thousand tokens are still decoding when the signal arrives.
"""
from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

MODEL = "tiny"
LONG = 1500  # tokens per request: a few seconds of decoding for the tiny model on 2 cores


@pytest.fixture(scope="module")
def long_lm_dir(tmp_path_factory):
    from conftest import build_tiny_lm

    return build_tiny_lm(tmp_path_factory.mktemp("tiny-long"), max_position_embeddings=4096)


def _start(model_dir, tmp_path, *extra: str) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "gq_serve.cli", "serve", str(model_dir), "--port", str(port), "--threads", "1",
         "--served-model-name", MODEL, "--log-level", "info", *extra],
        stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "server did not start"
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)


def _stream(url: str, out: dict, key: str, max_tokens: int = LONG) -> None:
    """One streaming completion; out[key] = (finish_reason, [DONE] seen, token count) or the error."""
    body = {"model": MODEL, "prompt": "the cat", "max_tokens": max_tokens, "ignore_eos": True, "stream": True,
            "temperature": 0, "stream_options": {"include_usage": True}}
    try:
        finish, done, tokens = None, False, 0
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
            out[key + ".status"] = r.status_code
            for line in r.iter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    chunk = json.loads(line[6:])
                    if chunk.get("choices"):
                        finish = chunk["choices"][0]["finish_reason"] or finish
                    if chunk.get("usage"):
                        tokens = chunk["usage"]["completion_tokens"]
        out[key] = (finish, done, tokens)
    except Exception as exc:  # noqa: BLE001 -- recorded, asserted by the test
        out[key] = exc


def _wait(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


@pytest.mark.slow
def test_sigterm_drains_refuses_new_work_and_exits_0(long_lm_dir, tmp_path):
    proc, url = _start(long_lm_dir, tmp_path, "--drain-timeout", "60", "--max-queue", "4")
    try:
        out: dict = {}
        threads = [threading.Thread(target=_stream, args=(url, out, f"r{i}")) for i in range(3)]
        for t in threads:
            t.start()
            time.sleep(0.2)
        # one decoding, two waiting in the queue
        _wait(lambda: "gq_queue_depth 2" in httpx.get(url + "/metrics").text, 30, "requests not queued")
        t_signal = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _wait(lambda: httpx.get(url + "/health").status_code == 503, 5, "/health did not turn 503")
        r = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2})
        assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down"
        assert r.headers["retry-after"] == "1"
        for t in threads:
            t.join(120)
        # every accepted request ran to its end, with its [DONE]
        assert [out[f"r{i}"] for i in range(3)] == [("length", True, LONG)] * 3, out
        assert proc.wait(30) == 0
        elapsed = time.monotonic() - t_signal
        log = (tmp_path / "server.log").read_text()
        assert "drained in" in log and "Traceback" not in log, log[-3000:]
        print(f"\ndrained 3 x {LONG} tokens and exited 0 in {elapsed:.1f} s")
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.slow
def test_drain_is_bounded(long_lm_dir, tmp_path):
    proc, url = _start(long_lm_dir, tmp_path, "--drain-timeout", "1")
    try:
        out: dict = {}
        t = threading.Thread(target=_stream, args=(url, out, "r", 4000))
        t.start()
        _wait(lambda: "gq_requests_running 1" in httpx.get(url + "/metrics").text, 30, "request not running")
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        assert time.monotonic() - t0 < 10  # 1 s of drain + the close, not the 4000 tokens
        t.join(30)
        assert not isinstance(out.get("r"), Exception) or isinstance(out["r"], httpx.HTTPError), out
        assert "drain timeout" in (tmp_path / "server.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
