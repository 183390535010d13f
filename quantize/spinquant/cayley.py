"""One Cayley SGD step on the Stiefel manifold (orthogonal matrices), spec section 2.

The update follows the loss downhill while staying orthogonal without a matrix inverse: the Cayley
transform ``(I - a/2 W)^-1 (I + a/2 W)`` of a skew-symmetric W is orthogonal, and its fixed point is
approximated by a few iterations. Momentum is 0, so a step needs only R and its gradient.
"""
from __future__ import annotations

import torch

FIXED_POINT_ITERS = 5
REORTHO_PROBABILITY = 1 / 101   # occasional QR against the drift of the truncated fixed point


def orthonormalize(r: torch.Tensor) -> torch.Tensor:
    """The orthogonal factor of ``r [n, n]`` by QR with the signs fixed (diag of the triangular factor
    positive), so a nearly orthogonal r barely moves instead of flipping columns."""
    q, t = torch.linalg.qr(r)
    signs = torch.sign(torch.diagonal(t))
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return q * signs[None, :]


def cayley_step(r: torch.Tensor, grad: torch.Tensor, lr: float,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """One step for the orthogonal ``r [n, n]`` with loss gradient ``grad [n, n]`` (dL/dr) at learning
    rate ``lr``; returns the new r in r's dtype (computed in float64). ``generator`` draws the
    ~1/101 re-orthonormalisation, so a seeded run is reproducible."""
    dtype = r.dtype
    r64 = r.detach().double()
    # 1. Rows back to unit length (cheap drift control); X is the point, M the descent direction.
    r64 = r64 / r64.norm(dim=1, keepdim=True)
    x = r64.t()
    m = -grad.detach().double().t()
    # 2. Project onto the tangent space: a skew-symmetric generator W.
    a = m @ x.t() - 0.5 * x @ (x.t() @ m @ x.t())
    w = a - a.t()
    # 3. Cap the step by 1/||W||_1 (max abs column sum): keeps the fixed point below a contraction
    #    bound, which is what lets a huge lr (1.5) stay stable.
    alpha = min(float(lr), 1.0 / (float(w.abs().sum(dim=0).max()) + 1e-8))
    # 4. Cayley transform by fixed-point iteration instead of solving (I - a/2 W) Y = (I + a/2 W) X.
    y = x + alpha * m
    for _ in range(FIXED_POINT_ITERS):
        y = x + (alpha / 2) * (w @ (x + y))
    r_new = y.t()
    # 5. Occasionally snap back to exactly orthogonal.
    if float(torch.rand((), generator=generator)) < REORTHO_PROBABILITY:
        r_new = orthonormalize(r_new)
    return r_new.to(dtype)


__all__ = ["cayley_step", "orthonormalize", "FIXED_POINT_ITERS", "REORTHO_PROBABILITY"]
