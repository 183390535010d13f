"""Run schemathesis's CLI over a live server's /openapi.json and summarise it.

Used by tests/test_openapi_fuzz.py (CI) and scripts/reliability.py (docs/results/reliability.json).
Every check (`--checks all`, plus the custom one in gq_st_hooks.py), a fixed seed, at most
``max_examples`` generated cases per operation and phase, bodies included.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent


def st_executable() -> str:
    """`st` next to the running Python (the venv's)."""
    return str(Path(sys.executable).with_name("st"))


def run_schemathesis(base_url: str, workdir: Path, api_key: str | None = None, max_examples: int = 200,
                     seed: int = 1, timeout: float = 900) -> dict:
    """{'exit_code', 'cases' (total), 'cases_per_operation', 'failures', 'output'} of one run.

    The run happens in ``workdir`` (schemathesis keeps state in its working directory).
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    events = workdir / "events.ndjson"
    report = workdir / "report.json"
    argv = [st_executable(), "--config-file", str(HERE / "schemathesis.toml"), "run",
            f"{base_url}/openapi.json", "--checks", "all", "-n", str(max_examples), "--seed", str(seed),
            "--workers", "1", "--request-timeout", "600", "--wait-for-schema", "60",
            "--report", "ndjson,json", "--report-ndjson-path", str(events), "--report-json-path", str(report)]
    if api_key:
        argv += ["-H", f"Authorization: Bearer {api_key}"]
    env = dict(os.environ, SCHEMATHESIS_HOOKS="gq_st_hooks",
               PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    proc = subprocess.run(argv, cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout)
    per_op: Counter = Counter()
    if events.exists():
        for line in events.read_text().splitlines():
            event = json.loads(line)
            done = event.get("ScenarioFinished")
            if done and done.get("recorder"):
                per_op[done["recorder"]["label"]] += len(done["recorder"].get("cases") or ())
    summary = json.loads(report.read_text()) if report.exists() else {}
    return {
        "exit_code": proc.returncode,
        "cases": sum(per_op.values()),
        "cases_per_operation": dict(sorted(per_op.items())),
        "failures": summary.get("test_cases", {}).get("unique_failures"),
        "output": proc.stdout[-6000:] + proc.stderr[-3000:],
    }
