"""scripts/gpu_check.py: every stage's CPU smoke run (what the GPU lease will run, on tiny shapes, with
the packages the device lacks made unimportable), the files that come back, `next`, `merge` and the
device command."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from gq_serve.util import import_file

ROOT = Path(__file__).resolve().parents[1]
gc = import_file("gpu_check", ROOT / "scripts" / "gpu_check.py")

# Not on the GPU machine's image (../.library/device/KINDS.md): a stage that imports one fails here too.
DEVICE_MISSING = ["fastapi", "uvicorn", "vllm", "gguf"]


def _have_vllm() -> bool:
    return importlib.util.find_spec("vllm") is not None


SMOKES = [pytest.param(s, marks=[pytest.mark.vllm, pytest.mark.slow,
                                 pytest.mark.skipif(not _have_vllm(), reason="vLLM is not installed")])
          if s == "vllm" else s for s in gc.STAGES]


@pytest.mark.parametrize("stage", SMOKES)
def test_stage_smoke_passes_and_its_files_come_back(stage, tmp_path):
    out = tmp_path / "OUT"
    block = [] if stage == "vllm" else DEVICE_MISSING  # vLLM's wheels bring fastapi and uvicorn there
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "run", stage, "--smoke", "--out",
                        str(out), "--commit", "abc123", "--block", *block],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads((out / stage / "result.json").read_text())
    assert res["result"] == "pass" and res["smoke"] is True and res["commit"] == "abc123"
    # Tiny shapes on the CPU: inside the device budget (vLLM's engine start-up dominates its smoke).
    assert res["wall_s"] < gc.STAGES[stage].budget_s / (1 if stage == "vllm" else 4)
    assert gc.check_out_limits(out) == []
    assert (out / stage / "log.txt").read_text().startswith(f"[gpu_check] stage {stage}")
    if stage == "correct":
        assert res["summary"]["collected"] > 100 and res["summary"]["errors"] == 0  # every gpu test collected
    if stage == "kernels":
        # bits x batches x the Triton-served formats (lut, bcq, trellis, w4a4), each checked against its spec
        assert res["summary"]["rows"] == 2 * 2 * 4 and res["summary"]["failed_checks"] == 0
    if stage == "e2e":
        rows = json.loads((out / "e2e" / "e2e.json").read_text())["rows"]
        assert [r["variant"] for r in rows] == ["dense", "lut:2", "bcq:4"]
        assert all(r["pct_of_bw_limit"] > 0 and r["bytes_per_token"] > 0 for r in rows)
    if stage == "qtip":
        rows = json.loads((out / "qtip" / "qtip_cost.json").read_text())["rows"]
        assert [r["kind"] for r in rows] == ["viterbi", "layer"] and rows[0]["tiles_per_s"] > 0
        assert rows[1]["time_viterbi_s"] > 0 and rows[1]["shape"] == "32x64"
    if stage == "w4a4":
        rows = json.loads((out / "w4a4" / "w4a4_speed.json").read_text())["rows"]
        assert [(r["variant"], r["case"]) for r in rows] == [("dense:fp32", "prefill"), ("dense:fp32", "decode"),
                                                            ("w4a4", "prefill"), ("w4a4", "decode"),
                                                            ("w4a4:4:w64", "prefill"), ("w4a4:4:w64", "decode")]
        assert sum(rows[2]["kernels"].values()) == 14 and set(rows[2]["kernels"]) <= {"w4a4-int", "w4a4-cpu-avx512vnni", "w4a4-cpu-avx512", "w4a4-cpu-avx2"}
        assert rows[3]["kv_bits"] == 4 and rows[4]["tok_s"] > 0
    if stage == "vllm":
        rows = json.loads((out / "vllm" / "vllm.json").read_text())["rows"]
        assert [(r["variant"], r["batch"]) for r in rows] == [("fp16", 1), ("fp16", 2), ("lut:3", 1), ("lut:3", 2)]
        assert all(r["engine"] == "vllm" and r["tok_s"] > 0 and r["throughput_tok_s"] > 0 for r in rows)


def test_gpu_test_files_hold_the_gpu_tests():
    files = gc.gpu_test_files()
    for name in ("tests/test_ops.py", "tests/test_kernels_lut_triton.py", "tests/test_kernels_bcq_triton.py",
                 "tests/test_static_decode.py", "tests/test_calibration.py", "tests/test_pipeline_cli.py"):
        assert name in files


def test_a_missing_package_is_an_error_result(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(gc, "missing_modules", lambda smoke, stage: ["pydantic"])
    assert gc.main(["run", "e2e", "--smoke", "--out", str(tmp_path)]) == 1
    res = json.loads((tmp_path / "e2e" / "result.json").read_text())
    assert res["result"] == "error" and res["summary"]["missing"] == ["pydantic"]
    assert "prepare" in res["summary"]["fix"]


def test_a_stage_past_its_budget_is_killed(tmp_path):
    log = tmp_path / "log.txt"
    rc, timed_out = gc.run_logged([sys.executable, "-c", "import time; print('hi', flush=True); time.sleep(30)"],
                                  log, {"PATH": "/usr/bin:/bin"}, timeout=2)
    assert timed_out and "hi" in log.read_text() and "killed after 2 s" in log.read_text()


def test_out_limits():
    assert gc.check_out_limits(ROOT / "docs" / "results" / "nonexistent") == []


def test_out_limits_catch_what_would_not_come_back(tmp_path):
    (tmp_path / "a" / "b" / "c").mkdir(parents=True)
    (tmp_path / "a" / "b" / "c" / "deep.txt").write_text("x")
    (tmp_path / "a" / "bad name.txt").write_text("x")
    for i in range(8):
        (tmp_path / f"f{i}").write_text("x")
    problems = " ".join(gc.check_out_limits(tmp_path))
    assert "10 files > 8" in problems and "2 folders down" in problems and "bad name.txt" in problems


def test_next_stage_order():
    assert gc.next_stage({"stages": {}}) == ("correct", "never run on a GPU")
    passed = {"result": "pass", "date": "2026-12-01", "commit": "a" * 40}
    st = {"stages": {"correct": passed, "kernels": {**passed, "result": "fail"}}}
    name, why = gc.next_stage(st)
    assert name == "kernels" and "fail" in why
    st = {"stages": {n: {**passed, "date": f"2026-12-0{i + 1}"} for i, n in enumerate(gc.STAGES)}}
    st["stages"]["e2e"]["date"] = "2026-11-30"
    assert gc.next_stage(st)[0] == "e2e"


def test_merge_updates_status_and_results_but_never_from_smoke(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    (results / "e2e.json").write_text(json.dumps([{"device": "CPU", "engine": "hf", "model": "m", "format": "fp16",
                                                   "bits": 16, "batch": 1, "tok_s": 1.0}]))
    src = tmp_path / "files"
    for stage, smoke, result in (("e2e", False, "pass"), ("kernels", True, "pass"), ("correct", False, "fail")):
        (src / stage).mkdir(parents=True)
        (src / stage / "result.json").write_text(json.dumps({"stage": stage, "smoke": smoke, "result": result,
                                                             "commit": "c0ffee", "device": "NVIDIA H200 (sm_90)",
                                                             "date": "2026-12-01", "wall_s": 100.0, "summary": {}}))
    row = {"device": "NVIDIA H200 (sm_90)", "engine": "hf", "model": "llama2-7b (random weights)", "format": "lut",
           "bits": 3, "batch": 1, "tok_s": 300.0, "pct_of_bw_limit": 71.0}
    (src / "e2e" / "e2e.json").write_text(json.dumps({"rows": [row]}))
    done = gc.merge(src, results)
    assert done == ["correct: fail", "e2e: pass", "kernels: smoke result, not merged"]
    status = json.loads((results / "gpu_status.json").read_text())["stages"]
    assert set(status) == {"correct", "e2e"} and status["e2e"]["commit"] == "c0ffee"
    rows = json.loads((results / "e2e.json").read_text())
    assert len(rows) == 2 and rows[-1] == row
    gc.merge(src, results)  # the same rows again replace, not duplicate
    assert len(json.loads((results / "e2e.json").read_text())) == 2
    assert not (results / "kernels.json").exists() and not (results / "gpu_correct.xml").exists()


def test_device_calls_fit_and_name_the_commit(tmp_path):
    for p in ("p0", "p1", "p2", "tool"):
        (tmp_path / f".vllm-gpu-{p}").mkdir()
    for stage in gc.STAGES:
        calls = gc.device_calls(stage, root=tmp_path)
        last = calls[-1]
        assert all(len(c["command"]) <= 2000 and 0 < c["timeout_s"] <= 600 and len(c["carry"]) <= 8 for c in calls)
        assert f"gpu_check.py run {stage} --out $OUT --commit " in last["command"]
        assert gc.STAGES[stage].budget_s < last["timeout_s"]
        if stage == "vllm":
            assert [c["carry"] for c in calls] == [[".vllm-gpu-p0"], [".vllm-gpu-p1"], [".vllm-gpu-p2", ".vllm-gpu-tool"]]
            assert "install-on-device.sh" in last["command"]
        else:
            assert calls == [last] and last["carry"] == [gc.CARRY]
    assert (ROOT / ".gitignore").read_text().count(gc.CARRY) == 1  # carried, never committed
