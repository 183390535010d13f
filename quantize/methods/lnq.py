"""LNQ -- Layer-wise Non-uniform Quantization (GuidedQuant paper, Algorithms 2-4), as pure functions.

Per output row r with Hessian H (the row's group Hessian for GuidedQuant), LNQ minimises
``(w_r - P_r c_r)^T H (w_r - P_r c_r)`` over the row's codebook c_r (2^b values) and its one-hot
assignment P_r [in, 2^b] by alternating

  (a) the codebook step -- a k x k ridge least squares per row, solved in closed form:
      ``(P^T H P + lam I) c = P^T H w``;
  (b) the assignment step -- K sweeps of cyclic coordinate descent over the inputs j: with all
      other coordinates fixed, the objective is a 1-D quadratic in what_j with minimiser
      ``w_j - sum_{i != j} H_ji (what_i - w_i) / H_jj``, so the best codebook value is the one
      nearest to it.

Both steps can only lower the objective (Prop. 4.1 of the paper). Here that also holds for what a
checkpoint stores: the codebook is rounded to fp16 *before* assignment, and a row keeps its old
codebook when the rounded new one would be worse.

Everything runs on all rows at once; the only Python loop is over input coordinates (inherent to
cyclic CD). Layout inside the sweeps is transposed, [g, in, rows], so that the per-coordinate
slices are contiguous.

Initialisation: as in the authors' code (``layerwise_nuq.py`` starts from a SqueezeLLM
quantization of the same bit-width), LNQ starts from weighted k-means with the *diagonal Fisher*
weights when they are given (``fisher=``); without them it falls back to the row's diag(H_k),
which is the Hessian-weighted k-means that the layer objective implies when H is diagonal.
"""
from __future__ import annotations

from typing import Callable, ClassVar

import torch
from pydantic import Field

from gq_kernels.lut.format import LutQuant
from gq_quantize.methods.base import MethodConfig
from gq_quantize.methods.objective import as_groups, check_groups, quadratic_objective_rows
from gq_quantize.methods.registry import register_method
from gq_quantize.methods.squeezellm import weighted_kmeans

CD_VARIANTS = ("naive", "closed_form", "precompute", "lazy")


# --------------------------------------------------------------------------- codebook step


def codebook_update(
    w: torch.Tensor, H: torch.Tensor, codes: torch.Tensor, k: int, lam: float = 1e-7, max_chunk_elems: int = 1 << 22
) -> torch.Tensor:
    """Closed-form codebook for fixed assignments: ``argmin_c (w - P c)^T H (w - P c) + lam ||c||^2``.

    Normal equations per row, ``(P^T H P + lam I) c = P^T H w``, formed with one GEMM per chunk of
    rows (H @ one-hot) and solved by a batched float64 Cholesky (k <= 16, so the solve is free
    and float64 keeps the ill-conditioned Gram matrices of nearly-empty clusters accurate). Rows
    whose system is singular (lam = 0 with an empty cluster) fall back to minimum-norm least
    squares, which puts an empty cluster at 0.

    Args:
        w: float [out, in]; H: float [in, in] or [g, in, in]; codes: integer [out, in] in [0, k).
        max_chunk_elems: bound on the one-hot temporaries (rows_per_chunk * in * k elements).
    Returns:
        float [out, k] (dtype of w), not rounded.
    """
    Hg = as_groups(H).to(w.dtype)
    g, n = Hg.shape[0], Hg.shape[1]
    rows = check_groups(w.shape[0], g)
    codes = codes.long()
    out = torch.empty(w.shape[0], k, dtype=w.dtype)
    rc = max(1, min(rows, max_chunk_elems // (n * k)))
    eye = torch.eye(k, dtype=torch.float64)
    for gi in range(g):
        Hk = Hg[gi]
        for r0 in range(gi * rows, (gi + 1) * rows, rc):
            r1 = min(r0 + rc, (gi + 1) * rows)
            cc = codes[r0:r1]
            m = torch.nn.functional.one_hot(cc, k).to(w.dtype)  # [rc, in, k]
            # H @ P for every row of the chunk as one GEMM: [in, in] @ [in, rc*k].
            hp = (Hk @ m.transpose(0, 1).reshape(n, -1)).reshape(n, r1 - r0, k).transpose(0, 1)
            A = torch.bmm(m.transpose(1, 2), hp).double()  # P^T H P, [rc, k, k]
            hw = w[r0:r1] @ Hk  # (H w)^T, [rc, in]
            b = torch.zeros(r1 - r0, k, dtype=w.dtype).scatter_add_(1, cc, hw).double()
            A = 0.5 * (A + A.transpose(1, 2)) + lam * eye
            L, info = torch.linalg.cholesky_ex(A)
            c = torch.cholesky_solve(b.unsqueeze(-1), L).squeeze(-1)
            bad = info != 0
            if bool(bad.any()):
                c[bad] = torch.linalg.lstsq(A[bad], b[bad].unsqueeze(-1), driver="gelsd").solution.squeeze(-1)
            out[r0:r1] = c.to(w.dtype)
    return out


def sort_codebook(codes: torch.Tensor, codebook: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort each row's codebook ascending and relabel its codes (the nearest-value search needs it).

    Args: codes integer [out, in]; codebook float [out, k]. Returns (codes int64, codebook).
    """
    cb, perm = torch.sort(codebook, dim=1)
    inv = torch.argsort(perm, dim=1)
    return torch.gather(inv, 1, codes.long()), cb


# --------------------------------------------------------------------------- assignment step


def _nearest(sol: torch.Tensor, midT: torch.Tensor) -> torch.Tensor:
    """Codes of the sorted-codebook values nearest to ``sol`` [g, r], given the midpoints between
    consecutive codebook values as [g, k-1, r]: the number of midpoints below the value.

    Ties (exactly on a midpoint) go to the lower code, as in :func:`.squeezellm.nearest_codes`.
    A comparison against k-1 contiguous rows is ~30x faster on CPU than a batched searchsorted
    over per-row sequences, and this is the innermost operation of LNQ.
    """
    return (sol.unsqueeze(1) > midT).sum(1)


def _take(cbT: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Codebook values [g, r] for codes [g, r]; cbT is the codebook as [g, k, r]."""
    return torch.gather(cbT, 1, idx.unsqueeze(1)).squeeze(1)


def _sweep_naive(Wt, Dt, Ct, cbT, midT, Hg, Hn, HnT, block, LT, stop):
    """Per coordinate: recompute the gradient entry (H (what - w))_j from scratch with a full
    mat-vec over all inputs, then evaluate the 1-D objective change of *every* codebook value and
    take the best. O(rows * in) + O(rows * k) per coordinate, no state kept between coordinates."""
    g, n, r = Wt.shape
    for j in range(stop):
        hjj = Hg[:, j, j]
        hjj = torch.where(hjj > 0, hjj, torch.ones_like(hjj)).view(g, 1, 1)
        grad = torch.bmm(Hg[:, j : j + 1, :], Dt).squeeze(1)  # sum_i H_ji d_i, [g, r]
        off = grad - Hg[:, j, j].view(g, 1) * Dt[:, j, :]  # drop the coordinate's own term
        delta = cbT - Wt[:, j, :].unsqueeze(1)  # candidate what_j - w_j, [g, k, r]
        f = hjj * delta * delta + 2.0 * delta * off.unsqueeze(1)
        idx = f.argmin(dim=1)
        Ct[:, j, :] = idx
        Dt[:, j, :] = _take(cbT, idx) - Wt[:, j, :]


def _sweep_closed_form(Wt, Dt, Ct, cbT, midT, Hg, Hn, HnT, block, LT, stop):
    """Per coordinate: closed-form 1-D optimum from a fresh mat-vec over all inputs, then the
    nearest codebook value. O(rows * in) per coordinate, no state kept between coordinates."""
    g, n, r = Wt.shape
    for j in range(stop):
        s = torch.bmm(HnT[:, j : j + 1, :], Dt).squeeze(1)  # sum_i H_ij/H_jj d_i, [g, r]
        s = s - Hn[:, j, j].view(g, 1) * Dt[:, j, :]
        idx = _nearest(Wt[:, j, :] - s, midT)
        Ct[:, j, :] = idx
        Dt[:, j, :] = _take(cbT, idx) - Wt[:, j, :]


def _sweep_precompute(Wt, Dt, Ct, cbT, midT, Hg, Hn, HnT, block, LT, stop):
    """Algorithm 3: keep, for every coordinate not yet visited in this sweep, its closed-form
    target ``T_j = w_j - sum_{i != j} Hn_ij d_i``.

    At the start of a sweep T holds the contributions of the later coordinates (one GEMM with the
    strictly lower triangle: the earlier ones are about to change); each update then adds the new
    coordinate's contribution to *all* later coordinates with a rank-1 update.
    O(rows * (in - j)) per coordinate."""
    g, n, r = Wt.shape
    Tt = Wt - torch.bmm(LT, Dt)  # [g, in, r]
    for j in range(stop):
        idx = _nearest(Tt[:, j, :], midT)
        Ct[:, j, :] = idx
        torch.sub(_take(cbT, idx), Wt[:, j, :], out=Dt[:, j, :])
        if j + 1 < n:
            Tt[:, j + 1 :, :].baddbmm_(HnT[:, j + 1 :, j : j + 1], Dt[:, j : j + 1, :], alpha=-1.0)


def _sweep_lazy(Wt, Dt, Ct, cbT, midT, Hg, Hn, HnT, block, LT, stop):
    """Algorithm 4: as :func:`_sweep_precompute`, but a coordinate's rank-1 update only reaches the
    rest of its column block; the block's contribution to all later coordinates is applied with
    one GEMM when the block is done (GPTQ-style lazy batching: the bulk of the work becomes GEMM).
    The per-coordinate work is a handful of [g, rows] vector ops plus a rank-1 update of at most
    ``block`` coordinates."""
    g, n, r = Wt.shape
    Tt = Wt - torch.bmm(LT, Dt)
    for s0 in range(0, stop, block):
        e = min(s0 + block, stop)
        picked = []
        for j in range(s0, e):
            idx = _nearest(Tt[:, j, :], midT)
            picked.append(idx)
            torch.sub(_take(cbT, idx), Wt[:, j, :], out=Dt[:, j, :])
            if j + 1 < e:
                Tt[:, j + 1 : e, :].baddbmm_(HnT[:, j + 1 : e, j : j + 1], Dt[:, j : j + 1, :], alpha=-1.0)
        Ct[:, s0:e, :] = torch.stack(picked, 1)
        if e < stop:
            Tt[:, e:, :].baddbmm_(HnT[:, e:, s0:e], Dt[:, s0:e, :], alpha=-1.0)


_SWEEPS: dict[str, Callable] = {
    "naive": _sweep_naive,
    "closed_form": _sweep_closed_form,
    "precompute": _sweep_precompute,
    "lazy": _sweep_lazy,
}


def normalized_hessian(H: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Hg [g, in, in], Hn = H with column j divided by H_jj, HnT = Hn^T contiguous,
    LT = strictly lower triangle of Hn, transposed: ``(LT @ D)[j] = sum_{i > j} Hn_ij d_i``).

    A non-positive diagonal entry (an input that never fires: its row and column are zero) is
    treated as 1, so that coordinate's optimum is w_j itself and the objective is unaffected.
    """
    Hg = as_groups(H)
    d = torch.diagonal(Hg, dim1=1, dim2=2)
    d = torch.where(d > 0, d, torch.ones_like(d))
    Hn = Hg / d.unsqueeze(1)
    HnT = Hn.transpose(1, 2).contiguous()
    return Hg, Hn, HnT, torch.triu(HnT, 1)


def cd_sweeps(
    w: torch.Tensor,
    H: torch.Tensor,
    codes: torch.Tensor,
    codebook: torch.Tensor,
    sweeps: int = 1,
    variant: str = "lazy",
    block: int = 128,
    prepared: tuple | None = None,
    callback: Callable[[torch.Tensor], None] | None = None,
    coords: int | None = None,
) -> torch.Tensor:
    """Cyclic coordinate descent on the assignments with the codebook fixed (Algorithms 3/4).

    Coordinates are visited in order 0..in-1 in every sweep; all rows (and all groups) move
    together.

    Args:
        w: float [out, in]; H: float [in, in] or [g, in, in].
        codes: integer [out, in]; codebook: float [out, k], ascending per row (see
            :func:`sort_codebook`) -- the values used are exactly these (round to fp16 first).
        sweeps: K.
        variant: one of ``CD_VARIANTS``; all give the same codes up to floating-point ties.
        block: column block of the ``lazy`` variant.
        prepared: the output of :func:`normalized_hessian` for H, to reuse across calls.
        callback: called with the codes [out, in] after every sweep.
        coords: visit only the first ``coords`` inputs in each sweep (for timing the slow
            variants on part of a large layer); None = all.
    Returns:
        int64 [out, in]: the new codes.
    """
    if variant not in _SWEEPS:
        raise ValueError(f"cd_variant must be one of {CD_VARIANTS}, got {variant!r}")
    Hg, Hn, HnT, LT = prepared if prepared is not None else normalized_hessian(H.to(w.dtype))
    g, n = Hg.shape[0], Hg.shape[1]
    out_f = w.shape[0]
    r = check_groups(out_f, g)
    cb = codebook.to(w.dtype)  # [g*r, k]
    mid = (0.5 * (cb[:, 1:] + cb[:, :-1])).reshape(g, r, -1).transpose(1, 2).contiguous()  # [g, k-1, r]
    # [g, in, r]: per-coordinate slices contiguous.
    Wt = w.reshape(g, r, n).transpose(1, 2).contiguous()
    Ct = codes.long().reshape(g, r, n).transpose(1, 2).contiguous()
    Dt = torch.gather(cb, 1, codes.long()).reshape(g, r, n).transpose(1, 2).contiguous() - Wt
    cbT = cb.reshape(g, r, -1).transpose(1, 2).contiguous()  # [g, k, r]
    sweep = _SWEEPS[variant]
    for _ in range(sweeps):
        sweep(Wt, Dt, Ct, cbT, mid, Hg, Hn, HnT, block, LT, n if coords is None else min(coords, n))
        if callback is not None:
            callback(Ct.transpose(1, 2).reshape(out_f, n))
    return Ct.transpose(1, 2).reshape(out_f, n).contiguous()


# --------------------------------------------------------------------------- LNQ


def lnq(
    w: torch.Tensor,
    H: torch.Tensor,
    bits: int,
    T: int = 2,
    K: int = 4,
    lam: float = 1e-7,
    init: LutQuant | None = None,
    cd_variant: str = "lazy",
    fisher: torch.Tensor | None = None,
    block: int = 128,
    kmeans_iters: int = 50,
    final_codebook_update: bool = True,
    track_objective: bool = True,
) -> LutQuant:
    """LNQ: T alternations of (closed-form codebook, K sweeps of coordinate descent).

    Order of steps: init -> [codebook, K x CD] * T -> codebook (final, optional). The authors'
    code runs codebook, (CD, codebook) * (T-1) with their default T=3, i.e. the same number of CD
    sweeps as T=2 here, and also ends on a codebook step.

    Args:
        w: float32 [out, in] (float64 is honoured, for exact comparisons in tests).
        H: float32 [in, in], or [g, in, in] for GuidedQuant (rows of group k use H[k]; g | out).
        bits: code width, k = 2^bits.
        T, K, lam: paper's iterations, CD sweeps per iteration and codebook ridge (absolute).
        init: starting point (codes + fp16 codebook); default weighted k-means (see module doc).
        cd_variant: one of ``CD_VARIANTS`` (identical results; ``lazy`` is the fast one).
        fisher: float [out, in] diagonal Fisher for the default initialisation.
        block: column block of the lazy CD.
        kmeans_iters: iterations of the default initialisation.
        final_codebook_update: one more codebook step after the last CD (as the authors' code
            ends its loop on a codebook step); it is guarded, so it never hurts.
        track_objective: record the objective after every step (costs one float64 GEMM each);
            when off, only the guard's evaluations before/after codebook steps are done.
    Returns:
        LutQuant (codes uint8 [out, in], codebook float16 [out, 2^bits] ascending). ``stats``:
        ``objective`` (of the stored W_hat, float64), ``objective_history`` and
        ``history_steps`` (same length: "init", "codebook t", "cd t.k", ...), ``rows_kept``
        (rows per codebook step whose old codebook was kept because the rounded new one was worse).
    """
    if cd_variant not in _SWEEPS:
        raise ValueError(f"cd_variant must be one of {CD_VARIANTS}, got {cd_variant!r}")
    dtype = torch.float64 if w.dtype == torch.float64 else torch.float32
    w = w.to(dtype)
    Hg = as_groups(H).to(dtype)
    g, n = Hg.shape[0], Hg.shape[1]
    if w.shape[1] != n:
        raise ValueError(f"H {tuple(H.shape)} does not match w {tuple(w.shape)}")
    rows = check_groups(w.shape[0], g)
    k = 2**bits

    if init is None:
        if fisher is not None:
            weights = fisher.to(dtype)
        else:
            diag = torch.diagonal(Hg, dim1=1, dim2=2).clamp_min(0)  # [g, in]
            weights = diag.repeat_interleave(rows, dim=0)
        init = weighted_kmeans(w.float(), weights.float(), bits, iters=kmeans_iters)
    if init.codebook.shape != (w.shape[0], k) or init.codes.shape != w.shape:
        raise ValueError("init does not match w / bits")
    codes, cb = sort_codebook(init.codes, init.codebook.to(dtype))
    cb = cb.half().to(dtype)

    prepared = normalized_hessian(Hg)

    def rows_obj(c, b):
        return quadratic_objective_rows(w, torch.gather(b, 1, c), Hg)

    history: list[float] = []
    steps: list[str] = []
    rows_kept: list[int] = []
    cur = rows_obj(codes, cb)  # per-row objective of the current (codes, fp16 codebook)
    history.append(float(cur.sum()))
    steps.append("init")

    def codebook_step(label: str):
        nonlocal codes, cb, cur
        new = codebook_update(w, Hg, codes, k, lam).half().to(dtype)
        new_codes, new = sort_codebook(codes, new)
        obj = rows_obj(new_codes, new)
        # Rounding to fp16 can cost more than the exact step gained; such a row keeps its codebook
        # (written so that a non-finite new objective also keeps the old one).
        keep = ~(obj <= cur)
        rows_kept.append(int(keep.sum()))
        codes = torch.where(keep.unsqueeze(1), codes, new_codes)
        cb = torch.where(keep.unsqueeze(1), cb, new)
        cur = torch.where(keep, cur, obj)
        history.append(float(cur.sum()))
        steps.append(label)

    for t in range(T):
        codebook_step(f"codebook {t}")
        last = {"k": 0, "rows": None}

        def after_sweep(c, t=t, last=last):
            if track_objective:
                last["rows"] = rows_obj(c, cb)
                history.append(float(last["rows"].sum()))
                steps.append(f"cd {t}.{last['k']}")
            last["k"] += 1

        codes = cd_sweeps(w, Hg, codes, cb, sweeps=K, variant=cd_variant, block=block, prepared=prepared,
                          callback=after_sweep)
        cur = last["rows"] if last["rows"] is not None else rows_obj(codes, cb)
    if final_codebook_update:
        codebook_step("codebook final")

    q = LutQuant(codes=codes.to(torch.uint8), codebook=cb.half(), bits=bits)
    q.stats.update(
        objective=float(cur.sum()),
        objective_history=history,
        history_steps=steps,
        rows_kept=rows_kept,
        groups=g,
    )
    return q


class LNQConfig(MethodConfig):
    """LNQ (GuidedQuant paper, Algorithms 2-4); with --guided, LNQ + GuidedQuant."""

    name: ClassVar[str] = "lnq"
    format: ClassVar[str] = "lut"
    needs: ClassVar[frozenset[str]] = frozenset({"hessian", "fisher"})
    lnq_iters: int = Field(2, ge=1, description="LNQ T: alternations of codebook update and assignment")
    lnq_cd_sweeps: int = Field(4, ge=1, description="LNQ K: coordinate-descent sweeps per assignment step")
    lnq_lambda: float = Field(1e-7, ge=0.0, description="LNQ: ridge on the codebook least squares")
    kmeans_iters: int = Field(50, ge=1, description="weighted k-means iterations (SqueezeLLM, LNQ's initialisation)")


@register_method(LNQConfig)
def quantize_lnq(w: torch.Tensor, hessian: torch.Tensor, fisher: torch.Tensor | None, cfg: LNQConfig) -> LutQuant:
    return lnq(w, hessian, cfg.bits, T=cfg.lnq_iters, K=cfg.lnq_cd_sweeps, lam=cfg.lnq_lambda, fisher=fisher,
               kmeans_iters=cfg.kmeans_iters, track_objective=False)


# LNQ handles [g, in, in] natively (all groups batched), so guided_quantize calls it once.
lnq.accepts_grouped_hessian = True
quantize_lnq.accepts_grouped_hessian = True
