"""SqueezeLLM's non-uniform quantization: per-row 1-D weighted k-means (``lut`` format).

Every output channel gets its own codebook of 2^bits values. Each weight is pulled towards its
centroid in proportion to a sensitivity weight -- the diagonal Fisher (accumulated squared
gradients of the loss w.r.t. that weight) in SqueezeLLM. All rows are clustered at once.
"""
from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import Field

from gq_kernels.lut.format import LutQuant
from gq_quantize.methods.base import MethodConfig
from gq_quantize.methods.registry import register_method


def nearest_codes(w: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centroid of each weight, for row-wise *sorted* centroids.

    A nearest-centroid search in 1-D is a search among the midpoints, which needs no
    [rows, in, k] distance tensor (1 GB at 4096 x 4096 x 16). Ties go to the lower centroid.

    Args:
        w: float32 [rows, in]; centroids: float32 [rows, k], ascending along dim 1.
    Returns:
        int64 [rows, in] in [0, k).
    """
    mid = 0.5 * (centroids[:, 1:] + centroids[:, :-1])
    return torch.searchsorted(mid.contiguous(), w.contiguous())


def weighted_quantile_init(w: torch.Tensor, weights: torch.Tensor, k: int) -> torch.Tensor:
    """Deterministic initial centroids: the weighted quantiles at levels (i + 1/2) / k.

    Args:
        w, weights: float32 [rows, in] (weights >= 0 with a positive sum per row).
    Returns:
        float32 [rows, k], ascending.
    """
    ws, order = torch.sort(w, dim=1)
    cw = torch.cumsum(torch.gather(weights, 1, order), dim=1)
    cw = cw / cw[:, -1:]
    levels = (torch.arange(k, dtype=torch.float32) + 0.5) / k
    idx = torch.searchsorted(cw.contiguous(), levels.expand(w.shape[0], k).contiguous())
    return torch.gather(ws, 1, idx.clamp_max(w.shape[1] - 1))


def _weighted_sse(w: torch.Tensor, weights: torch.Tensor, centroids: torch.Tensor, codes: torch.Tensor) -> float:
    """sum weights * (w - centroid[code])^2 in float64."""
    d = w.double() - torch.gather(centroids.double(), 1, codes)
    return float((weights.double() * d * d).sum())


def weighted_kmeans(
    w: torch.Tensor, weights: torch.Tensor, bits: int, iters: int = 50, seed: int = 0
) -> LutQuant:
    """Per-row weighted 1-D k-means with k = 2^bits, vectorized over rows (Lloyd iterations).

    In 1-D the clusters of a nearest-centroid assignment are intervals of the sorted row, so
    each row is sorted once and every Lloyd iteration needs only the k-1 cluster boundaries
    (a search of the midpoints in the sorted row) and prefix sums of weights, weights*w and
    weights*w^2 (float64): O(rows * k * log in) per iteration instead of O(rows * in).

    Args:
        w: float32 [out, in].
        weights: float [out, in], >= 0 (e.g. the diagonal Fisher). A row whose weights are all
            zero is clustered with uniform weights (nothing says any weight matters more).
        bits: code width; k = 2^bits clusters per row.
        iters: maximum Lloyd iterations (stops early when no boundary moves).
        seed: unused -- the initialisation is the deterministic weighted-quantile one; kept so
            callers can pass one uniformly.
    Returns:
        LutQuant: codes uint8 [out, in], codebook float16 [out, 2^bits] (ascending per row).
        ``stats``: ``objective`` = weighted SSE of the stored (fp16) W_hat (float64),
        ``objective_history`` (weighted SSE after each iteration, fp32 centroids), ``iters`` run.
    """
    del seed
    if weights.shape != w.shape:
        raise ValueError(f"weights {tuple(weights.shape)} must have the shape of w {tuple(w.shape)}")
    if bool((weights < 0).any()):
        raise ValueError("k-means weights must be non-negative")
    k = 2**bits
    w = w.float()
    weights = weights.float()
    dead_rows = weights.sum(dim=1) <= 0
    if bool(dead_rows.any()):
        weights = torch.where(dead_rows.unsqueeze(1), torch.ones_like(weights), weights)
    rows, n = w.shape

    ws, order = torch.sort(w, dim=1)
    wt = torch.gather(weights, 1, order).double()
    zero = torch.zeros(rows, 1, dtype=torch.float64)
    # Prefix sums with a leading 0: the sum over sorted positions [a, b) is P[b] - P[a].
    P0 = torch.cat([zero, torch.cumsum(wt, 1)], 1)
    P1 = torch.cat([zero, torch.cumsum(wt * ws.double(), 1)], 1)
    P2 = torch.cat([zero, torch.cumsum(wt * ws.double() ** 2, 1)], 1)

    def bounds(c: torch.Tensor) -> torch.Tensor:
        # Cluster a holds the sorted positions [b[a], b[a+1]); a weight exactly on a midpoint goes
        # to the lower centroid, as in nearest_codes.
        mid = 0.5 * (c[:, 1:] + c[:, :-1])
        inner = torch.searchsorted(ws, mid.contiguous(), right=True)
        return torch.cat([torch.zeros_like(inner[:, :1]), inner, torch.full_like(inner[:, :1], n)], 1)

    def seg(P: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.gather(P, 1, b[:, 1:]) - torch.gather(P, 1, b[:, :-1])

    c = weighted_quantile_init(w, weights, k)
    b = bounds(c)
    history = []
    n_run = 0
    for n_run in range(1, iters + 1):
        # Centroid step: weighted mean of each cluster.
        den, num = seg(P0, b), seg(P1, b)
        empty = den <= 0
        c = torch.where(empty, c.double(), num / den.clamp_min(1e-300)).float()
        if bool(empty.any()):
            codes = nearest_codes(w, c)  # centroids are still ascending: intervals never cross
            c = _refill_empty(w, weights, c, codes, empty)
        c, _ = torch.sort(c, dim=1)
        # Assignment step.
        new_b = bounds(c)
        cd = c.double()
        sse = seg(P2, new_b) - 2.0 * cd * seg(P1, new_b) + cd * cd * seg(P0, new_b)
        history.append(float(sse.sum()))
        changed = bool((new_b != b).any())
        b = new_b
        if not changed:
            break

    # The stored codebook is fp16 (rounding is monotone, so it stays sorted); assign against the
    # rounded values so the codes are optimal for what the checkpoint holds.
    cb16 = c.half()
    codes = nearest_codes(w, cb16.float())
    q = LutQuant(codes=codes.to(torch.uint8), codebook=cb16, bits=bits)
    q.stats.update(objective=_weighted_sse(w, weights, cb16.float(), codes), objective_history=history, iters=n_run)
    return q


def _refill_empty(
    w: torch.Tensor, weights: torch.Tensor, c: torch.Tensor, codes: torch.Tensor, empty: torch.Tensor
) -> torch.Tensor:
    """Move empty centroids onto the worst-fitted weights of their row.

    The e-th empty centroid of a row takes the value of the row's weight with the e-th largest
    weighted squared error: that is the split that lowers the objective the most to first order.
    """
    err = weights * (w - torch.gather(c, 1, codes)) ** 2
    m = int(empty.sum(dim=1).max())
    top = torch.topk(err, min(m, w.shape[1]), dim=1).indices  # [rows, m]
    rank = (torch.cumsum(empty.long(), dim=1) - 1).clamp(0, top.shape[1] - 1)  # [rows, k]
    cand = torch.gather(w, 1, torch.gather(top, 1, rank))
    return torch.where(empty, cand, c)


def squeezellm(w: torch.Tensor, fisher_diag: torch.Tensor, bits: int, iters: int = 50) -> LutQuant:
    """SqueezeLLM (dense part): Fisher-weighted per-row k-means.

    Args:
        w: float32 [out, in]; fisher_diag: float [out, in] >= 0 (squared weight gradients summed
            over calibration data).
    Returns:
        LutQuant as :func:`weighted_kmeans`.
    """
    return weighted_kmeans(w, fisher_diag, bits, iters=iters)


class SqueezeLLMConfig(MethodConfig):
    """Fisher-weighted per-row k-means (the dense part of SqueezeLLM)."""

    name: ClassVar[str] = "squeezellm"
    format: ClassVar[str] = "lut"
    needs: ClassVar[frozenset[str]] = frozenset({"fisher"})
    kmeans_iters: int = Field(50, ge=1, description="weighted k-means iterations (SqueezeLLM, LNQ's initialisation)")


@register_method(SqueezeLLMConfig)
def quantize_squeezellm(w: torch.Tensor, hessian, fisher: torch.Tensor, cfg: SqueezeLLMConfig) -> LutQuant:
    return squeezellm(w, fisher, cfg.bits, iters=cfg.kmeans_iters)
