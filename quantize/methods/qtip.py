"""QTIP (bitshift-trellis vector quantization with incoherence processing) and QTIP + GuidedQuant.

Per linear W [m, n] (``../shared/qtip-spec.md``, our clean-room specification):

1. damp each Hessian, H <- H + damp * mean(diag H) I (dead inputs get a unit diagonal);
2. draw random signs S_U [n], S_V [m] (seeded from ``qtip_seed`` and the weight's bytes, so a rerun
   reproduces them), rotate W~ = R_m^T S_V W S_U R_n and H~ = R_n^T S_U H S_U R_n
   (:mod:`gq_kernels.hadamard`), Wscale = RMS(W~) / (0.9 RMS(code)); quantize W~ / Wscale;
3. block LDL of H~ with 16x16 blocks: H~ = L D L^T, A = L - I;
4. BlockLDLQ over 16-column blocks from the last to the first: the target of block J is
   ``W~[:, J] + (W~ - W^)[:, after J] A[after J, J]``, each 16x16 tile of it one tail-biting
   Viterbi search (:mod:`.viterbi`) under plain squared error.

GuidedQuant: the g saliency-weighted Hessians H_k belong to g blocks of m/g consecutive *original*
output channels. ``qtip_group_rht=False`` pairs H_k with block k of the rows of the output-rotated
W~ as GuidedQuant's code does, which is exact only for g = 1 since R_m mixes all rows;
``qtip_group_rht=True`` (the default, see docs/results.md "QTIP") uses one output transform per
group (``out_rht_blocks = g``), so the rotated rows of block k are a rotation of exactly the
original rows of group k and the objective tr(E_k H_k E_k^T) is preserved exactly.

Stats per layer: the proxy error tr(E H~ E^T) / tr(W~ H~ W~^T) (summed over groups), the damping,
and wall time per stage (``time_rht_s``, ``time_ldl_s``, ``time_viterbi_s``, ``time_ldlq_s``).
"""
from __future__ import annotations

import hashlib
import time
from typing import ClassVar

import torch
from pydantic import Field, field_validator

from gq_kernels.trellis import reference as ref
from gq_kernels.trellis.codes import CODES, VALUES_PER_STATE, code_rms, code_table, default_tlut
from gq_kernels.trellis.format import TrellisParams, TrellisQuant, check_shape
from gq_kernels.hadamard import random_signs, rotate_hessian, rotate_weight
from gq_quantize.methods.base import MethodConfig
from gq_quantize.methods.objective import as_groups, check_groups
from gq_quantize.methods.registry import register_method
from gq_quantize.methods.viterbi import quantize_tiles

TILE = ref.TILE
SCALE_OVERRIDE = 0.9


def damp_hessian(H: torch.Tensor, damp: float) -> torch.Tensor:
    """float64 copy of H [n, n] with dead inputs given a unit diagonal and damp * mean(diag) added."""
    H = H.double().clone()
    n = H.shape[0]
    d = torch.arange(n)
    if not torch.isfinite(H).all():
        raise ValueError("the Hessian holds non-finite values; recalibrate (gq quantize --recalibrate)")
    dead = H[d, d] <= 0
    H[dead, :] = 0
    H[:, dead] = 0
    H[d[dead], d[dead]] = 1.0
    H[d, d] += damp * float(H[d, d].mean())
    return H


def block_ldl(H: torch.Tensor, block: int = TILE) -> tuple[torch.Tensor, torch.Tensor]:
    """H = L D L^T with L unit block-lower-triangular (block x block identity diagonal blocks) and D
    block-diagonal: from the Cholesky factor C, D_j = C_jj C_jj^T, L = C blockdiag(C_jj^-1).

    Retries with more damping (x10, up to 6 times) when H is not positive definite.
    Returns (L, D as [n/block, block, block]) in H's dtype."""
    n = H.shape[0]
    if n % block:
        raise ValueError(f"block LDL needs n divisible by {block}, got {n}")
    mean = float(H.diagonal().mean())
    extra = 0.0
    for _ in range(7):
        Hd = H if extra == 0 else H + extra * mean * torch.eye(n, dtype=H.dtype, device=H.device)
        C, info = torch.linalg.cholesky_ex(Hd)
        if int(info) == 0:
            break
        extra = max(extra * 10, 1e-4)
    else:
        raise ValueError("block LDL: the rotated Hessian is not positive definite even with extra damping")
    nb = n // block
    Cb = C.reshape(nb, block, nb, block)
    diag = torch.stack([Cb[j, :, j, :] for j in range(nb)])  # [nb, b, b] lower triangular
    D = diag @ diag.transpose(1, 2)
    inv = torch.linalg.solve_triangular(diag, torch.eye(block, dtype=H.dtype, device=H.device).expand(nb, -1, -1),
                                        upper=False)
    L = (Cb.permute(0, 2, 1, 3) @ inv[None]).permute(0, 2, 1, 3).reshape(n, n)
    return L, D


def _signs(w: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    digest = hashlib.sha256(w.detach().cpu().contiguous().numpy().tobytes()).digest()
    g = torch.Generator().manual_seed((int.from_bytes(digest[:8], "little") ^ seed) & ((1 << 63) - 1))
    m, n = w.shape
    su = random_signs(n, g)
    sv = random_signs(m, g)
    return su, sv


def block_ldlq(Wn: torch.Tensor, A: torch.Tensor, table: torch.Tensor, kV: int, V: int,
               impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor, float]:
    """BlockLDLQ of Wn [m, n] (rotated, in code units) with feedback A = L - I [n, n].

    Returns (states int64 [m/16, n/16, N], W^ float32 [m, n] (decoded), seconds spent in Viterbi)."""
    m, n = Wn.shape
    N = ref.TILE_WEIGHTS // V
    Wn = Wn.float()
    Af = A.to(Wn.dtype)
    What = torch.zeros_like(Wn)
    E = torch.zeros_like(Wn)  # Wn - What, filled from the right
    states = torch.empty(m // TILE, n // TILE, N, dtype=torch.int64, device=Wn.device)
    tab = table.to(Wn.device)
    t_vit = 0.0
    for j in range(n // TILE - 1, -1, -1):
        c0, c1 = j * TILE, (j + 1) * TILE
        T = Wn[:, c0:c1]
        if c1 < n:
            T = T + E[:, c1:] @ Af[c1:, c0:c1]
        x = T.reshape(m // TILE, TILE, TILE).reshape(m // TILE, N, V)  # row-major inside a tile
        t0 = time.perf_counter()
        st = quantize_tiles(x, tab, kV, impl=impl)
        t_vit += time.perf_counter() - t0
        states[:, j] = st
        q = tab[st].reshape(m // TILE, TILE, TILE).reshape(m, TILE)
        What[:, c0:c1] = q
        E[:, c0:c1] = Wn[:, c0:c1] - q
    return states, What, t_vit


def qtip(w: torch.Tensor, H: torch.Tensor, bits: int, code: str = "hyb", group_rht: bool = True,
         damp: float = 0.01, seed: int = 0, feedback: bool = True, impl: str = "auto") -> TrellisQuant:
    """QTIP of one weight w [m, n] with Hessian(s) H [n, n] or [g, n, n] (GuidedQuant's groups of m/g
    consecutive output channels). ``feedback=False`` quantizes every tile on its own (A = 0: the
    baseline BlockLDLQ is measured against). Returns a :class:`TrellisQuant`."""
    if code not in CODES:
        raise ValueError(f"unknown trellis code {code!r}; codes: {list(CODES)}")
    Hg = as_groups(H)
    g = Hg.shape[0]
    m, n = w.shape
    rows = check_groups(m, g)
    if Hg.shape[1] != n:
        raise ValueError(f"H {tuple(H.shape)} does not match w {tuple(w.shape)}")
    blocks = g if (group_rht and g > 1) else 1
    params = TrellisParams(bits=bits, trellis_code=code, out_rht_blocks=blocks)
    check_shape(params, m, n)
    if rows % TILE:
        raise ValueError(f"QTIP with g={g} needs out/g={rows} to be a multiple of {TILE}")
    stats: dict = {}
    dev = w.device
    t0 = time.perf_counter()
    su, sv = _signs(w, seed)
    su, sv = su.to(dev), sv.to(dev)
    Wt = rotate_weight(w.float(), su, sv, blocks)
    tlut = default_tlut()
    V = VALUES_PER_STATE[code]
    kV = bits * V
    table = code_table(code, tlut if code == "hyb" else None)
    wscale = float(Wt.pow(2).mean().sqrt()) / (SCALE_OVERRIDE * code_rms(code, tlut if code == "hyb" else None))
    wscale_t = torch.tensor([wscale], dtype=torch.float32)
    wscale = float(wscale_t[0])  # the stored fp32 value
    Wn = Wt / wscale
    Hd = torch.stack([damp_hessian(Hg[k].to(dev), damp) for k in range(g)])
    Ht = rotate_hessian(Hd, su.double())
    stats["time_rht_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    As = []
    for k in range(g):
        Lk, _ = block_ldl(Ht[k])
        As.append(Lk - torch.eye(n, dtype=Lk.dtype, device=dev))
    stats["time_ldl_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    states = torch.empty(m // TILE, n // TILE, ref.TILE_WEIGHTS // V, dtype=torch.int64, device=dev)
    What = torch.empty(m, n, dtype=torch.float32, device=dev)
    t_vit = 0.0
    num = den = 0.0
    for k in range(g):
        r0, r1 = k * rows, (k + 1) * rows
        A = As[k] if feedback else torch.zeros_like(As[k])
        st, wh, tv = block_ldlq(Wn[r0:r1], A, table, kV, V, impl=impl)
        states[r0 // TILE:r1 // TILE], What[r0:r1] = st, wh
        t_vit += tv
        Ek = (Wn[r0:r1] - wh).double()
        num += float(((Ek @ Ht[k]) * Ek).sum())
        den += float(((Wn[r0:r1].double() @ Ht[k]) * Wn[r0:r1].double()).sum())
    stats["time_ldlq_s"] = time.perf_counter() - t0 - t_vit
    stats["time_viterbi_s"] = t_vit
    stats["tiles"] = (m // TILE) * (n // TILE)
    stats["proxy_err"] = num / den if den > 0 else 0.0
    stats["wscale"] = wscale

    trellis = ref.states_to_words(states.reshape(-1, states.shape[-1]).cpu(), kV)
    q = TrellisQuant(trellis=trellis, SU=su.cpu().half(), SV=sv.cpu().half(), Wscale=wscale_t,
                     tlut=tlut if code == "hyb" else torch.zeros(0, 2, dtype=torch.float16), bits=bits,
                     trellis_code=code, out_rht_blocks=blocks, stats=stats)
    return q


class QTIPConfig(MethodConfig):
    """QTIP: random Hadamard transforms + BlockLDLQ + tail-biting trellis (format trellis); with
    --guided, QTIP + GuidedQuant."""

    name: ClassVar[str] = "qtip"
    format: ClassVar[str] = "trellis"
    needs: ClassVar[frozenset[str]] = frozenset({"hessian"})

    bits: int = 2
    trellis_code: str = Field("hyb", description="QTIP: trellis code: hyb (V=2, 9-bit LUT), 1mad or 3inst (V=1)")
    qtip_group_rht: bool = Field(True, description="QTIP+GQ: one output Hadamard transform per GuidedQuant group "
                                 "(exact pairing of group Hessians); off: one transform over all rows (paper code)")
    qtip_damp: float = Field(0.01, ge=0.0, description="QTIP: fraction of mean(diag H) added to the diagonal")
    qtip_seed: int = Field(0, description="QTIP: seed of the random signs (mixed with a hash of each weight)")
    qtip_viterbi: str = Field("auto", description="QTIP: Viterbi implementation: auto, cpp or torch")

    @field_validator("trellis_code")
    @classmethod
    def _code(cls, v: str) -> str:
        if v not in CODES:
            raise ValueError(f"trellis code must be one of {list(CODES)}, got {v!r}")
        return v

    @field_validator("qtip_viterbi")
    @classmethod
    def _impl(cls, v: str) -> str:
        if v not in ("auto", "cpp", "torch"):
            raise ValueError(f"must be auto, cpp or torch, got {v!r}")
        return v

    def format_params(self, groups: int = 1) -> TrellisParams:
        blocks = groups if (self.qtip_group_rht and groups > 1) else 1
        return TrellisParams(bits=self.bits, trellis_code=self.trellis_code, out_rht_blocks=blocks)


@register_method(QTIPConfig)
def quantize_qtip(w: torch.Tensor, hessian: torch.Tensor, fisher, cfg: QTIPConfig) -> TrellisQuant:
    return qtip(w, hessian, cfg.bits, code=cfg.trellis_code, group_rht=cfg.qtip_group_rht, damp=cfg.qtip_damp,
                seed=cfg.qtip_seed, impl=cfg.qtip_viterbi)


qtip.accepts_grouped_hessian = True
quantize_qtip.accepts_grouped_hessian = True
