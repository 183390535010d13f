"""GuidedQuant, Algorithm 1: a layer-wise quantizer run per output-channel group with that group's
saliency-weighted Hessian.

The output channels of a layer are split into g blocks of out/g consecutive rows; block k is
quantized with ``H_k = X^T Diag(s_k) X`` (s_k: the averaged squared end-loss gradients of the
block's outputs) in place of the plain ``X^T X``, and the results are concatenated.
"""
from __future__ import annotations

from typing import Callable

import torch

from gq_kernels.format import QuantResult
from gq_quantize.methods.objective import as_groups, check_groups

# Keyword arguments holding one entry per output row: they are sliced along with w.
ROW_ALIGNED_KWARGS = ("init", "fisher", "fisher_diag")


def accepts_grouped_hessian(quantizer: Callable) -> bool:
    """Whether ``quantizer(w, H[g, in, in])`` handles all groups in one call (e.g. LNQ)."""
    return bool(getattr(quantizer, "accepts_grouped_hessian", False))


def _slice_rows(value, r0: int, r1: int, out_f: int):
    if isinstance(value, QuantResult):
        return value.slice_rows(r0, r1)
    if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == out_f:
        return value[r0:r1]
    return value


def concat_results(parts: list[QuantResult]) -> QuantResult:
    """Stack per-group results along the output dimension.

    ``stats``: ``objective`` is the sum over groups; ``objective_history`` the element-wise sum
    when all groups recorded the same steps; the per-group stats are kept under ``group_stats``.
    """
    first = parts[0]
    if not isinstance(first, QuantResult):
        raise TypeError(f"unsupported quantizer result {type(first).__name__}")
    res = type(first).concat(parts)
    if all("objective" in p.stats for p in parts):
        res.stats["objective"] = float(sum(p.stats["objective"] for p in parts))
    hists = [p.stats.get("objective_history") for p in parts]
    if all(h is not None for h in hists) and len({len(h) for h in hists}) == 1:
        res.stats["objective_history"] = [float(sum(v)) for v in zip(*hists)]
        if "history_steps" in first.stats:
            res.stats["history_steps"] = list(first.stats["history_steps"])
    res.stats["group_stats"] = [p.stats for p in parts]
    res.stats["groups"] = len(parts)
    return res


def guided_quantize(quantizer: Callable, w: torch.Tensor, H_groups: torch.Tensor, **kw) -> QuantResult:
    """Run ``quantizer(w_k, H_k, **kw)`` on every output-channel group and concatenate.

    Args:
        quantizer: a Hessian-based layer-wise quantizer ``(w [rows, in], H [in, in], **kw)``,
            e.g. :func:`.gptq.gptq` or :func:`.lnq.lnq`. One that declares
            ``accepts_grouped_hessian`` (LNQ) gets all groups in one batched call.
        w: float32 [out, in].
        H_groups: float32 [g, in, in] (or [in, in] for g = 1); g must divide out.
        **kw: forwarded; the row-aligned ones (``init``, ``fisher``, ``fisher_diag``) are sliced
            per group.
    Returns:
        The quantizer's result type for the whole [out, in] weight. With g = 1 it is exactly
        ``quantizer(w, H, **kw)``.
    """
    Hg = as_groups(H_groups)
    g = Hg.shape[0]
    out_f = w.shape[0]
    rows = check_groups(out_f, g)
    if Hg.shape[1] != w.shape[1]:
        raise ValueError(f"H_groups {tuple(H_groups.shape)} does not match w {tuple(w.shape)}")
    if g == 1:
        return quantizer(w, Hg[0], **kw)
    if accepts_grouped_hessian(quantizer):
        return quantizer(w, Hg, **kw)
    parts = []
    for k in range(g):
        r0, r1 = k * rows, (k + 1) * rows
        kw_k = {name: (_slice_rows(v, r0, r1, out_f) if name in ROW_ALIGNED_KWARGS else v) for name, v in kw.items()}
        parts.append(quantizer(w[r0:r1], Hg[k], **kw_k))
    return concat_results(parts)
