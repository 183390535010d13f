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
