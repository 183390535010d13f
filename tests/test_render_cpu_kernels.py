"""scripts/render_results.py's table of benchmarks/cpu_kernels.py's JSON (no kernels run)."""
from __future__ import annotations

from pathlib import Path

from gq_serve.util import import_file

ROOT = Path(__file__).resolve().parent.parent


def _render():
    return import_file("render_results", ROOT / "scripts" / "render_results.py")


def _row(impl: str, rows: int, us: float, detail: str | None = None) -> dict:
    return {"shape": "1b.down", "n": 2048, "k": 5632, "format": "lut", "bits": 3, "group_size": None, "rows": rows,
            "impl": impl, "impl_detail": detail or f"{impl}:gemv", "us": us, "dense_fp32_us": 2000.0,
            "speedup_vs_dense_fp32": round(2000.0 / us, 2), "gbps": 8.5, "pct_read_bw": 22.0}


def test_kernels_cpu_table_one_row_per_shape_and_inductor_beside_the_extension():
    doc = {"provenance": {"cpu_model": "AMD EPYC", "cpu_flags": ["avx2", "avx512f", "avx512_bf16"], "threads": 1,
                          "read_gbps": 39.3, "copy_gbps": 38.6, "load_avg_1min": [1.0, 2.0], "date": "2026-11-30",
                          "command": "python benchmarks/cpu_kernels.py --threads 1"},
           "rows": [_row("lut-cpu-avx512", 1, 500.0), _row("lut-cpu-avx2", 1, 1000.0),
                    _row("lut-cpu-avx512", 8, 2400.0), _row("inductor", 1, 24000.0, "inductor-fused")]}
    lines = _render().kernels_cpu_table(doc).splitlines()
    assert "AVX-512 (BF16)" in lines[0] and "1 thread" in lines[0]
    gemv = [ln for ln in lines if ln.startswith("| 1b.down | 2048x5632")]
    assert gemv == ["| 1b.down | 2048x5632 | lut | 3 | 2000 | 500 (4.00) | 1000 (2.00) | 8.50 | 22 |"]
    ind = [ln for ln in lines if "inductor-fused" in ln]
    assert ind == ["| 1b.down | lut | 3 | 1 | 24000 (inductor-fused) | 500 | 2000 | 0.08 | 4.00 |"]
    assert "None" not in "\n".join(lines)
