"""benchmarks/e2e_random.py --e2e-json: how its rows join docs/results/e2e.json (nothing is run)."""
from __future__ import annotations

from pathlib import Path

from gq_serve.util import import_file

ROOT = Path(__file__).resolve().parent.parent


def _mod():
    return import_file("e2e_random", ROOT / "benchmarks" / "e2e_random.py")


def _row(model: str, device: str, date: str, tok_s: float) -> dict:
    return {"model": model, "device": device, "date": date, "tok_s": tok_s}


def test_merge_replaces_only_the_same_model_device_and_day():
    cpu = "CPU (x86_64, 1 threads)"
    old = [_row("SmolLM2-135M-Instruct", cpu, "2026-11-30", 30.0),
           _row("llama-1b (random weights)", cpu, "2026-11-22", 1.0),
           _row("llama-1b (random weights)", cpu, "2026-11-30", 2.0),
           _row("llama-1b (random weights)", "CPU (x86_64, 2 threads)", "2026-11-30", 3.0)]
    new = [_row("llama-1b (random weights)", cpu, "2026-11-30", 2.5)]
    merged = _mod().merge_e2e(old, new)
    assert merged == [old[0], old[1], old[3], new[0]]
    assert _mod().merge_e2e(merged, new) == merged
