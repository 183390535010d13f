"""Calibration over several processes (torchrun / torch.distributed): windows split, sums reduced.

Every process runs the same calibration code on its share of the windows (window w goes to rank
w mod world, inside every saliency chunk and over the whole Hessian pass) and the results are
summed across processes with ``all_reduce``:

* saliency rows are per window: each process writes its windows' rows into a zero tensor of the
  whole chunk, and the sum is the concatenation (exact: x + 0 = x);
* the weight Fisher and the Hessians are sums over windows: the per-process sums are added (fp32
  round-off differs from one process's order only by re-association);
* a layer's outputs (the inputs the next layer resumes from) are gathered the same way.

Process 0 alone writes the cache; the others reread its manifest at every synchronisation point,
so a cache built by N processes is the same directory one process would have built (and either
can resume the other's).
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def rank_world() -> tuple[int, int]:
    """(this process's rank, the number of processes); (0, 1) without torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_from_env(device: str) -> str:
    """Join the process group torchrun describes (``WORLD_SIZE`` > 1 in the environment) and return
    this process's device: ``cuda:LOCAL_RANK`` for a CUDA run (NCCL), else ``device`` (gloo).
    Without torchrun (or with one process) nothing happens and ``device`` is returned."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or (dist.is_available() and dist.is_initialized()):
        return device
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed; run one process")
    cuda = device.startswith("cuda")
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return f"cuda:{local}"
    return device


def my_windows(start: int, stop: int, rank: int, world: int) -> list[int]:
    """The windows of [start, stop) this rank computes: every world-th one from start + rank."""
    return list(range(start + rank, stop, world))


def spread_rows(local: torch.Tensor, positions: list[int], count: int, rows_per_window: int) -> torch.Tensor:
    """Place per-window rows into a zero tensor for all ``count`` windows.

    local: [len(positions) * rows_per_window, ...] (window-major); positions: each local window's
    index among the ``count``. Returns [count * rows_per_window, ...] of local's dtype, zero elsewhere.
    """
    full = torch.zeros((count, rows_per_window, *local.shape[1:]), dtype=local.dtype)
    if positions:
        full[positions] = local.reshape(len(positions), rows_per_window, *local.shape[1:])
    return full.reshape(count * rows_per_window, *local.shape[1:])


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over every process, in place (moved to the backend's device and back)."""
    _, world = rank_world()
    if world == 1:
        return t
    if dist.get_backend() == "nccl":
        dev = t.to(f"cuda:{torch.cuda.current_device()}")
        dist.all_reduce(dev)
        t.copy_(dev.cpu() if t.device.type == "cpu" else dev)
    else:
        dist.all_reduce(t)
    return t


def barrier() -> None:
    if rank_world()[1] > 1:
        dist.barrier()
