"""Calibration split over processes (quantize/calibration/distributed.py): two CPU processes with
the gloo backend build the same calibration cache as one process."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gq_quantize.calibration import CalibrationCache
from gq_quantize.calibration.distributed import my_windows, spread_rows

SEQ = 16


def windows_for(model_dir: Path, n: int) -> torch.Tensor:
    import json

    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    return torch.randint(0, vocab, (n, SEQ), generator=torch.Generator().manual_seed(3))


def build(model_dir: Path, root: Path, n: int, streamed: bool, offload_dir: Path | None = None) -> CalibrationCache:
    from transformers import AutoModelForCausalLM

    from gq_quantize.calibration.streamed import StreamedModel

    sm = StreamedModel(model_dir) if streamed else None
    model = sm.model if streamed else AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return CalibrationCache.open_or_build(root, model, model_dir, windows_for(model_dir, n), groups=2,
                                          need_guided=True, need_fisher=True, progress=False, chunk_windows=2,
                                          streamed=sm, offload_dir=offload_dir)


def _worker(rank: int, world: int, rendezvous: str, model_dir: str, root: str, n: int, streamed: bool,
            offload: str | None) -> None:
    torch.set_num_threads(1)  # two processes on a 2-core machine
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    try:
        build(Path(model_dir), Path(root), n, streamed, Path(offload) if offload else None)
    finally:
        dist.destroy_process_group()


def test_rows_of_each_process_land_in_their_windows():
    mine = my_windows(4, 9, rank=1, world=2)
    assert mine == [5, 7]
    local = torch.arange(2 * 3, dtype=torch.float32).reshape(6, 1)  # 2 windows x 3 rows
    full = spread_rows(local, [w - 4 for w in mine], count=5, rows_per_window=3)
    assert full.shape == (15, 1)
    assert full[3:6, 0].tolist() == [0, 1, 2] and full[9:12, 0].tolist() == [3, 4, 5]
    assert full[:3].abs().sum() == 0 and full[12:].abs().sum() == 0


@pytest.mark.parametrize("streamed", [False, True])
def test_two_gloo_processes_build_the_one_process_cache(tiny_lm_dir, tmp_path, streamed):
    n = 3  # chunks of 2 windows: the last chunk leaves process 1 without a window
    offload = str(tmp_path / "offload") if streamed else None
    mp.spawn(_worker, args=(2, str(tmp_path / "rdv"), str(tiny_lm_dir), str(tmp_path / "two"), n, streamed, offload),
             nprocs=2, join=True)
    one = build(tiny_lm_dir, tmp_path / "one", n, streamed)
    two = CalibrationCache.open_or_build(tmp_path / "two", one._streamed.model if streamed else _model(tiny_lm_dir),
                                         tiny_lm_dir, windows_for(tiny_lm_dir, n), groups=2, need_guided=True,
                                         need_fisher=True, progress=False, streamed=one._streamed)
    assert two.manifest["hessians"]["complete"] and two.manifest["saliency"]["complete"]
    for name in one.manifest["linears"]:
        assert torch.equal(one.saliency(name), two.saliency(name)), name  # rows are copied, not summed
        # Sums of per-process sums: fp32 re-association, within round-off of the largest entry.
        for a, b in [(one.weight_fisher(name), two.weight_fisher(name)),
                     (one.hessian(name, guided=True, groups=2), two.hessian(name, guided=True, groups=2)),
                     (one.hessian(name, guided=False), two.hessian(name, guided=False))]:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(a.abs().max()), msg=name)


def _model(model_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def test_more_processes_than_windows_is_refused(tiny_lm_dir, tmp_path, monkeypatch):
    from gq_quantize.calibration import cache as cache_mod

    monkeypatch.setattr(cache_mod, "rank_world", lambda: (0, 4))
    with pytest.raises(ValueError, match="4 processes for 3 calibration windows"):
        build(tiny_lm_dir, tmp_path, 3, streamed=False)


def test_gq_quantize_under_torchrun_writes_the_one_process_checkpoint(tiny_lm_dir, tmp_path):
    """`torchrun --nproc_per_node 2 -m gq_serve.cli quantize ...` on the CPU (gloo)."""
    import json
    import os
    import random
    import socket
    import subprocess
    import sys

    from conftest import _TINY_WORDS

    rng = random.Random(0)
    corpus = tmp_path / "text.txt"
    corpus.write_text("\n\n".join(" ".join(rng.choices(_TINY_WORDS, k=200)) for _ in range(4)))
    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    args = ["quantize", str(tiny_lm_dir), "--method", "gptq", "--guided", "--groups", "2", "--bits", "3",
            "--n-samples", "4", "--seq-len", "16", "--calib", str(corpus), "--quiet", "--streamed"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_addr", "127.0.0.1", "--master_port", str(port), "-m", "gq_serve.cli",
                          "--cache", str(tmp_path / "c2"), *args, "--out", str(tmp_path / "two")],
                         capture_output=True, text=True, timeout=300, env=env)
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run([sys.executable, "-m", "gq_serve.cli", "--cache", str(tmp_path / "c1"), *args,
                          "--out", str(tmp_path / "one")], capture_output=True, text=True, timeout=300, env=env)
    assert one.returncode == 0, one.stderr[-3000:]
    s1, s2 = json.loads(one.stdout), json.loads(two.stdout)  # only process 0 prints its summary
    assert s2["layers"] == 14
    assert abs(s1["objective_sum"] - s2["objective_sum"]) <= 1e-5 * abs(s1["objective_sum"])
