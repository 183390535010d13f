"""Perplexity of a causal LM over fixed-length token windows (``gq eval``)."""
from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F


def _model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def window_nll(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Summed next-token NLL of one batch.

    Args:
        batch: int64 [B, ctx] token ids, on the model's device.
    Returns:
        float64 scalar: sum over the B * (ctx - 1) predicted positions of -log p(x_{t+1} | x_<=t),
        computed from fp32 logits.
    """
    logits = model(input_ids=batch, use_cache=False).logits[:, :-1, :].float()
    targets = batch[:, 1:]
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")
    return nll.double()


def perplexity(model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 4, progress: bool = True) -> dict:
    """exp(mean next-token NLL) over every predicted position of every window.

    Args:
        model: HF causal LM (returns ``.logits`` [B, ctx, vocab]).
        windows: LongTensor [W, ctx], ctx >= 2; each window is scored independently (no overlap).
        batch_size: windows per forward pass.
        progress: show a tqdm bar.
    Returns:
        dict(ppl, nll (mean, nats/token), tokens (= W * (ctx - 1) predicted tokens), windows, ctx, seconds).
    """
    if windows.dim() != 2 or windows.shape[1] < 2:
        raise ValueError(f"windows must be a LongTensor [W, ctx] with ctx >= 2, got shape {tuple(windows.shape)}")
    if windows.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"windows must hold integer token ids, got {windows.dtype}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n_windows, ctx = windows.shape
    device = _model_device(model)
    starts = range(0, n_windows, batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="perplexity", unit="batch")
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    total = torch.zeros((), dtype=torch.float64)
    try:
        with torch.inference_mode():
            for i in starts:
                batch = windows[i : i + batch_size].to(device=device, dtype=torch.long)
                total += window_nll(model, batch).cpu()
    finally:
        model.train(was_training)
    tokens = n_windows * (ctx - 1)
    nll = total.item() / tokens
    return {
        # exp overflows a float past nll ~709 (a broken model): report inf, not a math range error
        "ppl": math.exp(nll) if nll < 709 else (nll if math.isnan(nll) else math.inf),
        "nll": nll,
        "tokens": tokens,
        "windows": n_windows,
        "ctx": ctx,
        "seconds": time.perf_counter() - t0,
    }
