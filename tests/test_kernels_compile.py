"""The Triton GEMV kernels (and the w4a4 GEMM) compile for every supported GPU architecture, without a GPU.

Triton ships ptxas, so ``triton.compile`` can target sm_80/86/89/90/120 on this CPU machine
(benchmarks/kernel_sass.py). This catches what the interpreter cannot: code Triton fails to lower
for real hardware, and register spills. It runs in a subprocess because tests/conftest.py puts
this session's kernels in interpreter mode, and interpreted kernels cannot be compiled.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="Triton is not installed (pip install triton)")

ROOT = Path(__file__).resolve().parents[1]
ARCHS = "80,86,89,90,120"  # RTX 30 / 40 / 50 class and A100 / H100


@pytest.mark.parametrize("kernels,bits", [("lut", "2,3,4,8"), ("bcq", "2,3,4"), ("trellis", "2,3,4"), ("w4a4", "4")])
def test_gemv_kernels_compile_for_every_arch_without_spills(kernels, bits):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "kernel_sass.py"), "--arch", ARCHS, "--kernels", kernels,
         "--shapes", "4096x11008", "--m", "1,8", "--bits", bits],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    assert r.returncode == 0, f"compile failed or spilled:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    lines = [x for x in r.stdout.splitlines() if "spills=" in x]
    for arch in ARCHS.split(","):
        assert any(x.startswith(f"sm_{arch} ") for x in lines), f"nothing compiled for sm_{arch}"
    assert lines and all("spills=0" in x for x in lines)
