"""The layer-wise quadratic objective every Hessian-based quantizer minimises.

For a weight W [out, in] and its quantized version W_hat, the objective is

    sum_r (w_r - what_r)^T H_{k(r)} (w_r - what_r)

where ``H`` is either one matrix [in, in] shared by all rows (plain layer-wise: H = X^T X) or a
stack [g, in, in] of per-output-group Hessians (GuidedQuant: rows ``k*out/g .. (k+1)*out/g - 1``
use ``H[k]``).
"""
from __future__ import annotations

import torch


def as_groups(H: torch.Tensor) -> torch.Tensor:
    """View a Hessian as a stack: [in, in] -> [1, in, in]; [g, in, in] is returned unchanged."""
    if H.dim() == 2:
        return H.unsqueeze(0)
    if H.dim() == 3 and H.shape[1] == H.shape[2]:
        return H
    raise ValueError(f"H must be [in, in] or [g, in, in], got shape {tuple(H.shape)}")


def check_groups(out_features: int, n_groups: int) -> int:
    """Rows per output-channel group; a ValueError that names both numbers if g does not divide out."""
    if n_groups < 1 or out_features % n_groups != 0:
        raise ValueError(
            f"the number of Hessian groups g={n_groups} must divide the number of output channels "
            f"out={out_features} (each group is a block of out/g consecutive rows)"
        )
    return out_features // n_groups


def quadratic_objective_rows(
    w: torch.Tensor, w_hat: torch.Tensor, H: torch.Tensor, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """Per-row objective ``(w_r - what_r)^T H_{k(r)} (w_r - what_r)``.

    Args:
        w, w_hat: float [out, in].
        H: float [in, in] or [g, in, in] with g dividing out.
        dtype: accumulation dtype. float64 by default so that monotonicity checks and the values
            written to the manifest are not dominated by GEMM rounding (the quadratic form of a
            small residual against a large H cancels badly in float32).
    Returns:
        ``dtype`` [out].
    """
    Hg = as_groups(H)
    g, n_in = Hg.shape[0], Hg.shape[1]
    if w.shape != w_hat.shape or w.shape[1] != n_in:
        raise ValueError(f"shape mismatch: w {tuple(w.shape)}, w_hat {tuple(w_hat.shape)}, H {tuple(H.shape)}")
    rows = check_groups(w.shape[0], g)
    d = (w_hat.to(dtype) - w.to(dtype)).reshape(g, rows, n_in)
    dh = torch.bmm(d, Hg.to(dtype))
    return (dh * d).sum(-1).reshape(-1)


def quadratic_objective(w: torch.Tensor, w_hat: torch.Tensor, H: torch.Tensor) -> float:
    """Total layer objective ``sum_r (w_r - what_r)^T H_{k(r)} (w_r - what_r)`` as a Python float.

    Shapes as in :func:`quadratic_objective_rows`; accumulated in float64.
    """
    return float(quadratic_objective_rows(w, w_hat, H).sum())
