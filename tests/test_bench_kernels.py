"""benchmarks/kernels.py (GPU kernel benchmark) on the CPU: byte accounting, rows, refusal without
CUDA, an --allow-cpu smoke run on tiny shapes, and the docs/results.md table."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gq_serve.util import import_file

ROOT = Path(__file__).resolve().parents[1]


bk = import_file("bench_kernels", ROOT / "benchmarks" / "kernels.py")
render = import_file("render_results", ROOT / "scripts" / "render_results.py")

ROW_KEYS = {"device", "format", "bits", "batch", "n", "k", "shape", "dtype", "group_size", "path", "us", "fp16_us",
            "bytes_read", "gbps", "fp16_gbps", "pct_copy_bw", "speedup_vs_fp16", "max_rel_err", "check_ok",
            "error"}


def reference_call(spec, tensors, x):
    """The format's reference kernel (packed tensors, dequantized per call)."""
    return bk.kernel_call(spec, tensors, x, "reference")


# --------------------------------------------------------------------------------- pure helpers
def test_bytes_read_by_hand():
    # lut 3-bit 4096x4096, batch 1, fp16: planes + 8-entry fp16 codebook per row + x.
    assert bk.bytes_read("lut", 3, 1, 4096, 4096) == 3 * 4096 * 128 * 4 + 4096 * 8 * 2 + 4096 * 2
    # lut 2-bit down_proj (k = 11008 = 344 words), batch 8.
    assert bk.bytes_read("lut", 2, 8, 4096, 11008) == 2 * 4096 * 344 * 4 + 4096 * 4 * 2 + 8 * 11008 * 2
    # bcq 4-bit, g=128 -> 86 groups; scales + offsets fp16; x in bf16 (also 2 bytes).
    assert bk.bytes_read("bcq", 4, 16, 4096, 11008, dtype="bf16", group_size=128) == (
        4 * 4096 * 344 * 4 + 2 * 4096 * 86 * 2 + 16 * 11008 * 2)
    # padding: k=100 -> 4 words, 1 group of 128; per-channel bcq -> 1 group.
    assert bk.bytes_read("bcq", 3, 2, 64, 100, group_size=128) == 3 * 64 * 4 * 4 + 2 * 64 * 1 * 2 + 2 * 100 * 2
    assert bk.bytes_read("bcq", 2, 1, 22016, 4096, group_size=-1) == 2 * 22016 * 128 * 4 + 2 * 22016 * 2 + 4096 * 2
    assert bk.dense_bytes_read(4, 12288, 4096) == (12288 * 4096 + 4 * 4096) * 2
    with pytest.raises(ValueError):
        bk.bytes_read("gptq", 4, 1, 8, 8)


def test_parse_shape_and_lists():
    assert bk.parse_shape("gate_up") == ("gate_up", 22016, 4096)
    assert bk.parse_shape("64x96") == ("64x96", 64, 96)
    assert [bk.LLAMA2_7B_SHAPES[s] for s in bk.LLAMA2_7B_SHAPES] == [
        (4096, 4096), (11008, 4096), (4096, 11008), (12288, 4096), (22016, 4096)]
    for bad in ("64x", "x96", "0x8", "64*96", "qkvz"):
        with pytest.raises(Exception):
            bk.parse_shape(bad)
    assert bk.split_list(["1,2", "4", "8,16"]) == ["1", "2", "4", "8", "16"]
    args = bk.parse_args(["--formats", "lut", "--bits", "3,4", "--batches", "1", "16", "--shapes", "qkv,8x32"])
    assert args.formats == ["lut"] and args.bits == [3, 4] and args.batches == [1, 16]
    assert args.shapes == [("qkv", 12288, 4096), ("8x32", 8, 32)]
    with pytest.raises(SystemExit):
        bk.parse_args(["--formats", "bcq", "--bits", "8"])  # bcq has no 8-bit kernels


def test_make_row_schema_and_arithmetic():
    row = bk.make_row(device="NVIDIA H100", fmt="lut", bits=3, batch=1, n=4096, k=4096, dtype="fp16",
                      group_size=None, shape="qkvo", us=10.0, fp16_us=25.0, copy_gbps=3000.0,
                      max_rel_err=1e-3, tolerance=2e-2, path="gemv")
    assert set(row) == ROW_KEYS
    nbytes = 3 * 4096 * 128 * 4 + 4096 * 8 * 2 + 4096 * 2
    assert row["bytes_read"] == nbytes
    assert row["gbps"] == pytest.approx(nbytes / 10e-6 / 1e9, rel=1e-3)
    assert row["pct_copy_bw"] == pytest.approx(100 * row["gbps"] / 3000.0, rel=1e-3)
    assert row["speedup_vs_fp16"] == 2.5 and row["check_ok"] is True and row["group_size"] is None
    assert row["fp16_gbps"] == pytest.approx((4096 * 4096 + 4096) * 2 / 25e-6 / 1e9, rel=1e-3)
    bad = bk.make_row(device="NVIDIA H100", fmt="bcq", bits=2, batch=4, n=64, k=96, dtype="bf16",
                      group_size=32, shape="64x96", us=None, fp16_us=None, copy_gbps=3000.0,
                      max_rel_err=0.9, tolerance=5e-2)
    assert bad["check_ok"] is False and bad["group_size"] == 32
    assert all(bad[f] is None for f in ("us", "fp16_us", "gbps", "fp16_gbps", "pct_copy_bw", "speedup_vs_fp16"))
    json.dumps([row, bad], allow_nan=False)


def test_max_rel_err():
    ref = torch.tensor([[1.0, -2.0], [0.5, 4.0]])
    assert bk.max_rel_err(ref.half(), ref) == 0.0
    assert bk.max_rel_err(ref + torch.tensor([[0.0, 0.4], [0.0, 0.0]]), ref) == pytest.approx(0.1)
    assert bk.max_rel_err(torch.full_like(ref, float("nan")), ref) == float("inf")
    assert bk.max_rel_err(ref[:1], ref) == float("inf")


# --------------------------------------------------------------------------------- CLI
def test_refuses_without_cuda(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bk.main(["--shapes", "8x32", "--out", str(tmp_path / "k.json")]) != 0
    assert "no CUDA device" in capsys.readouterr().err
    # --allow-cpu still needs an explicit --out: CPU numbers never land in docs/results by default.
    assert bk.main(["--allow-cpu", "--shapes", "8x32"]) != 0
    assert "--out" in capsys.readouterr().err
    assert not (tmp_path / "k.json").exists()


def test_script_entry_refuses_without_cuda():
    """As a script (`kernels` must resolve to the package, not benchmarks/kernels.py): exit status != 0."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernels.py"), "--shapes", "8x32"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "no CUDA device" in r.stderr and "--allow-cpu" in r.stderr


def _smoke(tmp_path, call, extra=()):
    out = tmp_path / "kernels.json"
    argv = ["--allow-cpu", "--formats", "lut,bcq", "--shapes", "64x96,32x100", "--bits", "2", "3", "--batches", "1,3",
            "--iters", "2", "--warmup", "0", "--copy-mb", "4", "--group-size", "32", "--out", str(out), *extra]
    return bk.main(argv, call=call), out


def test_allow_cpu_smoke_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    rc, out = _smoke(tmp_path, reference_call)
    assert rc == 0
    doc = json.loads(out.read_text())
    assert set(doc) >= {"provenance", "copy_gbps", "rows", "settings", "conventions", "device"}
    assert set(doc["provenance"]) >= {"command", "machine", "date", "git_commit", "torch"}
    assert "--allow-cpu" in doc["provenance"]["command"] and doc["device"] == "cpu" and doc["copy_gbps"] > 0
    rows = doc["rows"]
    assert len(rows) == 2 * 2 * 2 * 2  # shapes x bits x formats x batches
    for r in rows:
        assert set(r) == ROW_KEYS
        assert r["device"] == "cpu" and r["check_ok"] and r["max_rel_err"] < 1e-2
        assert r["us"] > 0 and r["fp16_us"] > 0 and r["gbps"] > 0 and r["speedup_vs_fp16"] > 0
        assert r["bytes_read"] == bk.bytes_read(r["format"], r["bits"], r["batch"], r["n"], r["k"], group_size=32)
        assert r["group_size"] == (32 if r["format"] == "bcq" else None)
    assert {(r["n"], r["k"]) for r in rows} == {(64, 96), (32, 100)}
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "[16/16]" in capsys.readouterr().out
    table = render.kernels_table(doc)
    assert table.count("\n| lut ") == 8 and table.count("\n| bcq (g=32) ") == 8


def test_broken_kernel_is_not_timed(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    def broken(spec, tensors, x):
        # lut: wrong sign (a fast wrong kernel); bcq: raises. Neither may produce a speed.
        if spec.format == "bcq":
            raise RuntimeError("no kernel for this shape")
        fn, path = reference_call(spec, tensors, x)
        return (lambda: -fn()), path

    rc, out = _smoke(tmp_path, broken, extra=["--bits", "2", "--batches", "1"])
    assert rc == 1  # JSON written, exit status says it failed
    rows = json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))["rows"]
    assert len(rows) == 4 and not any(r["check_ok"] for r in rows)
    assert all(r["us"] is None and r["speedup_vs_fp16"] is None and r["gbps"] is None for r in rows)
    lut = [r for r in rows if r["format"] == "lut"]
    bcq = [r for r in rows if r["format"] == "bcq"]
    assert all(r["max_rel_err"] > 1 and r["error"] is None for r in lut)
    assert all(r["max_rel_err"] is None and "no kernel for this shape" in r["error"] for r in bcq)
    assert "None" not in render.kernels_table(json.loads(out.read_text()))


# --------------------------------------------------------------------------------- docs table
def test_kernels_table_sample():
    ok = bk.make_row(device="NVIDIA H100 80GB HBM3 (sm_90, 79 GiB)", fmt="lut", bits=3, batch=1, n=4096,
                     k=4096, dtype="fp16", group_size=None, shape="qkvo", us=12.34, fp16_us=30.0,
                     copy_gbps=2900.0, max_rel_err=2e-4, tolerance=2e-2, path="gemv")
    bad = bk.make_row(device="NVIDIA H100 80GB HBM3 (sm_90, 79 GiB)", fmt="bcq", bits=4, batch=16, n=4096,
                      k=11008, dtype="fp16", group_size=128, shape="down", us=None, fp16_us=None,
                      copy_gbps=2900.0, max_rel_err=0.7, tolerance=2e-2, path="gemv")
    doc = {"provenance": {"date": "2026-01-01", "git_commit": "0123456789abcdef", "git_dirty": False},
           "device": ok["device"], "copy_gbps": 2900.0, "rows": [bad, ok],
           "settings": {"dtype": "fp16", "iters": 50, "timer": "cuda events", "l2_flush_mib": 256}}
    lines = render.kernels_table(doc).splitlines()
    assert "NVIDIA H100" in lines[0] and "2900 GB/s" in lines[0] and "0123456789" in lines[0]
    assert lines[2].startswith("| format | bits | layer | n x k | batch | path | us |")
    # sorted by format then bits: bcq before lut; a failed check shows dashes and FAILED, never a speed
    assert lines[4] == "| bcq (g=128) | 4 | down | 4096x11008 | 16 | gemv | – | – | – | – | – | 7.0e-01 FAILED |"
    assert lines[5] == (f"| lut | 3 | qkvo | 4096x4096 | 1 | gemv | 12.3 | 30.0 | {ok['gbps']:.0f} | "
                        f"{ok['pct_copy_bw']:.1f} | 2.43 | 2.0e-04 |")
    # and main() fills the (empty) block of docs/results.md
    md = render.replace_block("x\n<!-- BEGIN kernels -->\n<!-- END kernels -->\ny", "kernels", "\n".join(lines))
    assert "| lut | 3 | qkvo |" in md and md.endswith("<!-- END kernels -->\ny")
    assert "<!-- BEGIN kernels -->\n<!-- END kernels -->" in (ROOT / "docs" / "results.md").read_text() or \
        (ROOT / "docs" / "results" / "kernels.json").exists()


def test_trellis_smoke_skips_shapes_it_cannot_hold(tmp_path, monkeypatch, capsys):
    """trellis rows through the same harness (the reference call on the CPU); 32x100 is not made of
    16x16 tiles: skipped with the reason, not a failed kernel."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "kernels.json"
    argv = ["--allow-cpu", "--formats", "trellis", "--shapes", "64x96,32x100", "--bits", "2", "--batches", "1,3",
            "--iters", "2", "--warmup", "0", "--copy-mb", "4", "--out", str(out)]
    assert bk.main(argv, call=reference_call) == 0
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 2 and all(r["format"] == "trellis" and r["check_ok"] and (r["n"], r["k"]) == (64, 96)
                                  for r in rows)
    assert "32x100): skipped, the format cannot hold it (trellis needs in_features to be a multiple of 16" in capsys.readouterr().out
