"""GPTQ (Frantar et al., 2023) onto the same uniform grid as :mod:`.rtn`, as a pure function.

Columns are quantized left to right; the error of each column is spread over the not yet
quantized columns through the upper Cholesky factor of H^-1, with GPTQ's lazy block updates
(updates inside a block of columns immediately, one GEMM for everything to its right).

The options users know from AutoGPTQ / llm-compressor:

* ``act_order`` (desc_act): visit the columns in order of decreasing Hessian diagonal, so the
  inputs that matter most are quantized first, while the most error feedback is still possible.
  The codes are written back in the original column order: the stored tensors are an ordinary
  ``bcq`` weight, no permutation index is kept.
* ``static_groups``: every group's grid is fixed before GPTQ starts, from the original weights of
  its contiguous input columns (without it, a group's grid comes from the weights as updated when
  the group starts). The ``bcq`` format stores one grid per contiguous group in the original
  column order, so act-order with groups needs static groups: a group formed in activation order
  (llm-compressor's "group" ordering) would need a per-column group index the format does not have.
* ``sym`` / asymmetric grid, damping, lazy-update block width, and ``grid_search`` (GPTQ's
  ``mse`` option: each grid's min/max range shrunk to the one that rounds its weights best).
"""
from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import Field, model_validator

from gq_kernels.bcq.format import UniformQuant
from gq_quantize.methods.objective import quadratic_objective
from gq_quantize.methods.registry import register_method
from gq_quantize.methods.rtn import UniformGridOptions, make_grid, n_groups, quantize_to_grid


def inverse_hessian_factor(H: torch.Tensor, damp: float) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor U of (H + damp * mean(diag H) * I)^-1, with dead inputs made inert.

    Args:
        H: float32 [in, in], symmetric PSD.
        damp: relative damping; multiplied by 10 until the Cholesky succeeds (a Hessian from
            few tokens is often singular in float32).
    Returns:
        (U float32 [in, in] upper triangular with H^-1 = U^T U, the damping actually used).
    """
    H = H.float().clone()
    n = H.shape[0]
    diag = torch.arange(n)
    # An input that never fires has a zero row and column; a unit diagonal makes H invertible
    # without coupling that input to any other, so its weight is simply rounded.
    dead = H[diag, diag] <= 0
    H[dead, dead] = 1.0
    mean_diag = float(H[diag, diag].mean())
    d = damp
    for _ in range(8):
        Hd = H.clone()
        Hd[diag, diag] += d * mean_diag
        L, info = torch.linalg.cholesky_ex(Hd)
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if int(info) == 0:
                return U, d
        d = max(d * 10.0, 1e-6)
    raise RuntimeError(f"GPTQ: H is not positive definite even with damping {d:g} * mean(diag H)")


def _block_bounds(in_f: int, block: int, group_size: int) -> list[tuple[int, int]]:
    """Column blocks whose starts include every group start.

    Then, when a group starts, all earlier columns' updates have been applied to every column of
    the group, so the group's grid is fixed from the fully updated weights (GPTQ's reference
    implementation reads partially stale columns when a group starts inside a block).
    """
    cuts = set(range(0, in_f, block))
    if group_size != -1:
        cuts |= set(range(0, in_f, group_size))
    starts = sorted(cuts)
    return list(zip(starts, starts[1:] + [in_f]))


def gptq(
    w: torch.Tensor,
    H: torch.Tensor,
    bits: int,
    group_size: int = -1,
    sym: bool = False,
    damp: float = 0.01,
    block: int = 128,
    act_order: bool = False,
    static_groups: bool = False,
    grid_search: bool = False,
) -> UniformQuant:
    """GPTQ with a min/max uniform grid per output channel or per group.

    Args:
        w: float32 [out, in].
        H: float32 [in, in] layer Hessian (X^T X, or a saliency-weighted one for GuidedQuant).
        bits: code width.
        group_size: inputs per grid, -1 = per output channel. A group's grid is fixed when the
            group starts, from the weights as updated by all earlier columns (static_groups: from
            the original weights).
        sym: symmetric grid (see :func:`.rtn.uniform_grid`).
        damp: fraction of mean(diag H) added to the diagonal.
        block: lazy-update block width (columns).
        act_order: visit columns by decreasing diag(H) (desc_act); codes are stored unpermuted.
        static_groups: fix every group's grid from the original weights before quantizing
            (required with act_order and group_size != -1; see the module docstring).
        grid_search: clip each grid's range (:func:`.rtn.searched_grid`, GPTQ's mse option).
    Returns:
        UniformQuant (codes uint8 [out, in], scales / offsets float16 [out, G]);
        ``stats["objective"]``: the objective of the stored W_hat under the *undamped* H (float64),
        ``stats["damp"]``: damping used.
    """
    H_in = H
    if H.dim() != 2:
        raise ValueError(f"gptq takes one Hessian [in, in]; got {tuple(H.shape)} (use guided_quantize for groups)")
    out_f, in_f = w.shape
    if H.shape != (in_f, in_f):
        raise ValueError(f"H {tuple(H.shape)} does not match w {tuple(w.shape)}")
    if act_order and group_size != -1 and not static_groups:
        raise ValueError(
            "GPTQ act-order with groups needs static groups (--gptq-static-groups): the bcq format "
            "stores one grid per contiguous group of input columns, in their original order")
    G = n_groups(in_f, group_size)
    gs = in_f if group_size == -1 else group_size
    scales = torch.empty(out_f, G, dtype=torch.float16)
    offsets = torch.empty(out_f, G, dtype=torch.float16)
    # Static grids: each contiguous group's grid from the original weights, before any update.
    static = static_groups or (group_size == -1 and act_order)
    if static:
        for k in range(G):
            scales[:, k], offsets[:, k] = make_grid(w[:, k * gs : min((k + 1) * gs, in_f)], bits, sym, grid_search)

    if act_order:
        # Dead inputs (zero diagonal) go last, as in GPTQ's reference code; a stable sort keeps ties in order.
        perm = torch.argsort(torch.diagonal(H).float(), descending=True, stable=True)
        H = H[perm][:, perm]
        W = w.float()[:, perm].clone()
    else:
        perm = None
        W = w.float().clone()
    U, used_damp = inverse_hessian_factor(H, damp)
    group_of = (perm if perm is not None else torch.arange(in_f)) // gs  # grid of each visited column

    codes = torch.empty(out_f, in_f, dtype=torch.uint8)  # in visiting order
    s = o = None
    bounds = [(i, min(i + block, in_f)) for i in range(0, in_f, block)] if static else \
        _block_bounds(in_f, block, group_size)
    for i1, i2 in bounds:
        W1 = W[:, i1:i2].clone()
        E1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if static:
                k = int(group_of[col])
                s, o = scales[:, k], offsets[:, k]
            elif col % gs == 0:
                # Block bounds start at every group start, so W[:, col:] is fully updated here.
                s, o = make_grid(W[:, col : min(col + gs, in_f)], bits, sym, grid_search)
                scales[:, col // gs], offsets[:, col // gs] = s, o
            x = W1[:, i]
            q = quantize_to_grid(x.unsqueeze(1), s, o, bits).squeeze(1)
            codes[:, col] = q.to(torch.uint8)
            xq = q.float() * s.float() + o.float()
            err = (x - xq) / U1[i, i]
            W1[:, i + 1 :] -= err.unsqueeze(1) * U1[i, i + 1 :].unsqueeze(0)
            E1[:, i] = err
        W[:, i1:i2] = W1
        W[:, i2:] -= E1 @ U[i1:i2, i2:]
    if perm is not None:
        unpermuted = torch.empty_like(codes)
        unpermuted[:, perm] = codes
        codes = unpermuted

    q = UniformQuant(codes=codes, scales=scales, offsets=offsets, bits=bits, group_size=group_size)
    q.stats["objective"] = quadratic_objective(w, q.dequantize(), H_in)
    q.stats["damp"] = used_damp
    return q


class GPTQConfig(UniformGridOptions):
    """GPTQ onto the uniform grid; with --guided, GuidedQuant's per-group Hessians."""

    name: ClassVar[str] = "gptq"
    needs: ClassVar[frozenset[str]] = frozenset({"hessian"})
    gptq_damp: float = Field(0.01, ge=0.0, description="GPTQ: fraction of mean(diag H) added to the diagonal")
    gptq_block: int = Field(128, ge=1, description="GPTQ: lazy-update block width (columns)")
    gptq_act_order: bool = Field(False, description="GPTQ: quantize columns by decreasing Hessian diagonal "
                                                    "(desc_act); codes are stored in the original order")
    gptq_static_groups: bool = Field(False, description="GPTQ: fix every group's grid from the original "
                                                        "weights up front (needed by act-order with groups)")

    @model_validator(mode="after")
    def _act_order_groups(self) -> "GPTQConfig":
        if self.gptq_act_order and self.group_size != -1 and not self.gptq_static_groups:
            raise ValueError("--gptq-act-order with --group-size needs --gptq-static-groups: the bcq format "
                             "stores one grid per contiguous group of input columns")
        return self


@register_method(GPTQConfig)
def quantize_gptq(w: torch.Tensor, hessian: torch.Tensor, fisher, cfg: GPTQConfig) -> UniformQuant:
    return gptq(w, hessian, cfg.bits, group_size=cfg.group_size, sym=cfg.sym, damp=cfg.gptq_damp,
                block=cfg.gptq_block, act_order=cfg.gptq_act_order, static_groups=cfg.gptq_static_groups,
                grid_search=cfg.grid_search)
