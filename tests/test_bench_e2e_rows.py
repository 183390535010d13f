"""Row logic of scripts/bench_e2e_vllm_cpu.py (no vLLM needed: the script imports vLLM only in its worker)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from gq_serve.util import import_file

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(SCRIPTS))  # the script imports results_io from its own folder at run time
    try:
        yield import_file("bench_e2e_vllm_cpu", SCRIPTS / "bench_e2e_vllm_cpu.py")
    finally:
        sys.path.remove(str(SCRIPTS))


def _row(engine: str, device: str, bits: int, tok_s: float = 1.0) -> dict:
    return {"device": device, "engine": engine, "bits": bits, "tok_s": tok_s}


def test_merge_keeps_hf_and_gpu_rows_and_replaces_vllm_cpu_rows(bench):
    old = [
        _row("hf", "CPU (x86_64, 2 threads)", 16),
        _row("hf", "CPU (x86_64, 2 threads)", 2),
        _row("vllm", "CPU (x86_64, 1 threads)", 16, tok_s=5.0),  # an older vLLM CPU run, other thread count
        _row("vllm", "CPU (x86_64, 2 threads)", 2, tok_s=5.0),
        _row("vllm", "NVIDIA H100 80GB HBM3", 2),
    ]
    new = [_row("vllm", "CPU (x86_64, 2 threads)", 16, 20.0), _row("vllm", "CPU (x86_64, 2 threads)", 2, 21.0)]
    merged = bench.merge_rows(old, new)
    assert merged == old[:2] + [old[4]] + new
    assert bench.merge_rows(merged, new) == merged  # idempotent: re-running replaces, never duplicates
    assert bench.merge_rows([], new) == new


def test_merge_keeps_earlier_days_vllm_cpu_rows(bench):
    old = [{**_row("vllm", "CPU (x86_64, 2 threads)", 16, 24.2), "date": "2026-11-22"},
           {**_row("vllm", "CPU (x86_64, 1 threads)", 16, 9.0), "date": "2026-11-30"}]
    new = [{**_row("vllm", "CPU (x86_64, 1 threads)", 16, 10.0), "date": "2026-11-30"}]
    assert bench.merge_rows(old, new) == [old[0], new[0]]


def _result(tok_s: float) -> dict:
    return {"tok_s": tok_s, "tok_s_runs": [tok_s] * 3, "e2e_tok_s": tok_s * 0.9, "e2e_tok_s_runs": [tok_s * 0.9] * 3,
            "prompt_tokens": 5, "other_cpu_load": 0.01, "attempts": 1, "worker_threads": 2, "vllm": "0.32.0"}


def test_make_rows_fp16_baseline_and_formats(bench):
    rows = bench.make_rows({"fp16": _result(20.0), "lut2": _result(22.0), "lut4": _result(19.0)},
                           "CPU (x86_64, 2 threads)", {"date": "2026-11-22"})
    assert [(r["format"], r["bits"]) for r in rows] == [("fp16", 16), ("lut", 2), ("lut", 4)]
    assert all(r["engine"] == "vllm" and r["batch"] == 1 and r["new_tokens"] == 100 for r in rows)
    assert all(r["fp16_tok_s"] == 20.0 and r["date"] == "2026-11-22" for r in rows)
    assert [r["ratio"] for r in rows] == [1.0, 1.1, 0.95]
    assert rows[1]["e2e_tok_s"] == 19.8
    # the columns scripts/render_results.py's e2e table reads
    need = {"device", "engine", "format", "bits", "batch", "new_tokens", "tok_s", "fp16_tok_s", "ratio"}
    assert all(need <= r.keys() for r in rows)


def test_run_quiet_retries_while_other_jobs_load_the_cores(bench, tmp_path, monkeypatch):
    loads = iter([0.9, 0.4, 0.6])
    calls = []

    def fake_worker(label, path, args, run_root):
        calls.append(run_root.name)
        return {"other_cpu_load": next(loads), "tok_s": float(len(calls))}

    monkeypatch.setattr(bench, "run_worker", fake_worker)
    args = type("A", (), {"attempts": 3, "max_other_load": 0.25, "quiet_wait": 0})()
    best = bench.run_quiet("fp16", tmp_path, args, tmp_path)
    assert calls == ["try1", "try2", "try3"]
    assert best["other_cpu_load"] == 0.4 and best["attempts"] == 2  # the least loaded attempt is kept

    loads = iter([0.1])
    calls.clear()
    assert bench.run_quiet("fp16", tmp_path, args, tmp_path)["attempts"] == 1 and calls == ["try1"]


def test_wait_for_quiet_returns_once_the_load_drops(bench, monkeypatch):
    # busy seconds sampled in pairs around each 5 s window: 7.5 s busy (1.5 cores), then 0.5 s (0.1 cores)
    samples = iter([0.0, 7.5, 10.0, 10.5, 20.0, 20.0])
    monkeypatch.setattr(bench, "_machine_busy_s", lambda: next(samples))
    monkeypatch.setattr(bench.time, "sleep", lambda s: None)
    assert bench.wait_for_quiet(0.25, max_wait_s=3600) == pytest.approx(0.1)
    assert next(samples) == 20.0  # it stopped after the quiet window
    samples = iter([0.0, 10.0])  # never quiet, no time to wait: returns the load it saw
    assert bench.wait_for_quiet(0.25, max_wait_s=0) == pytest.approx(2.0)
