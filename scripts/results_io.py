"""What every results script stores beside its numbers, and how it writes them."""
from __future__ import annotations

import json
import platform
import sys
from datetime import date
from pathlib import Path

import torch


def provenance() -> dict:
    """Machine, torch version, date and the exact command of this run."""
    return {"machine": f"{platform.machine()} CPU, {torch.get_num_threads()} torch threads",
            "torch": torch.__version__, "date": date.today().isoformat(),
            "command": "python " + " ".join(sys.argv)}


def write_json(path: Path, obj) -> None:
    """Write to a temporary name, then rename: an interrupted run never leaves half a file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    tmp.replace(path)


# ------------------------------------------------------------------ other jobs on a shared machine
def machine_busy_s() -> float:
    """CPU seconds every process of the machine has spent busy so far (/proc/stat, all cores)."""
    import os

    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_cpu_s() -> float:
    """CPU seconds of this process (every thread) and of its waited-for children."""
    import os

    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class OtherLoad:
    """``with OtherLoad() as o: ...`` -> ``o.cores``: the cores other processes kept busy meanwhile
    ((machine busy - this process tree) CPU seconds / wall seconds)."""

    def __enter__(self):
        import time

        self.t0, self.m0, self.o0 = time.monotonic(), machine_busy_s(), own_cpu_s()
        return self

    def __exit__(self, *exc):
        import time

        wall = max(time.monotonic() - self.t0, 1e-9)
        self.cores = round(max(0.0, (machine_busy_s() - self.m0 - (own_cpu_s() - self.o0)) / wall), 2)
        return False


def wait_for_quiet(max_load: float, max_wait_s: float, window_s: float = 5.0) -> float:
    """Wait until other jobs use at most ``max_load`` cores over ``window_s`` (this process idle), or
    ``max_wait_s`` passed; returns the last load seen."""
    import time

    deadline = time.monotonic() + max_wait_s
    while True:
        b0 = machine_busy_s()
        time.sleep(window_s)
        load = (machine_busy_s() - b0) / window_s
        if load <= max_load or time.monotonic() >= deadline:
            return round(load, 2)
