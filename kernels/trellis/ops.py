"""``trellis`` on the GPU: ``torch.library`` operators over the Triton kernels, and the kernel class
that serves ``trellis`` layers with them.

    torch.ops.gq.trellis_matmul(x, trellis, SU, SV, Wscale, tlut, bits, code, out_rht_blocks) -> y [..., m]

Per call: x~ = ((x * SU) R_n) in fp32 (the O(n log n) transform of :mod:`.hadamard` as one Triton
launch, ``hadamard_transform_triton``), then ``gemv`` (CUDA, 1..GEMV_MAX_ROWS rows: the Triton decode-and-multiply kernel
reading the packed states) or ``dequant`` (CUDA otherwise: the Triton kernel writes W_code, then a
dense ``F.linear`` in x's dtype), or ``reference`` (no Triton or not CUDA), then the output
transform R_m^T and ``SV * Wscale``. All compute the reference's ``y`` up to summation order.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from gq_kernels.kernel import TritonKernel, kernels_serve, n_rows, rows_2d
from gq_kernels.trellis import reference as ref
from gq_kernels.trellis.format import NAME
from gq_kernels.hadamard import hadamard_factor, hadamard_k

GEMV_MAX_ROWS = 8


def choose_path(x: torch.Tensor) -> str:
    if not kernels_serve(x.device):
        return "reference"
    return "gemv" if 1 <= n_rows(x) <= GEMV_MAX_ROWS else "dequant"


def _tlut(tlut: torch.Tensor, code: str):
    return tlut if code == "hyb" else None


@torch.library.custom_op("gq::trellis_matmul", mutates_args=())
def trellis_matmul(x: torch.Tensor, trellis: torch.Tensor, SU: torch.Tensor, SV: torch.Tensor, Wscale: torch.Tensor,
                   tlut: torch.Tensor, bits: int, code: str, out_rht_blocks: int) -> torch.Tensor:
    """``x @ W_hat.T`` for x [..., n] (any float dtype); returns [..., m] in x's dtype."""
    path = choose_path(x)
    if path == "reference":
        return ref.matmul(x, trellis, SU, SV, Wscale, _tlut(tlut, code), code, bits, out_rht_blocks)
    from gq_kernels.trellis.triton_kernels import (hadamard_transform_triton, trellis_dequantize_code,
                                                   trellis_gemv_code)

    m, n = SV.shape[0], SU.shape[0]
    x2 = rows_2d(x)
    xr = hadamard_transform_triton(x2.float() * SU.float())
    if path == "gemv":
        y = trellis_gemv_code(xr, trellis, _tlut(tlut, code), m, bits, code)
    else:
        wc = trellis_dequantize_code(trellis, _tlut(tlut, code), m, n, bits, code, dtype=x.dtype)
        y = F.linear(xr.to(x.dtype), wc).float()
    y = hadamard_transform_triton(y, transpose=True, blocks=out_rht_blocks) * (SV.float() * Wscale.float())
    return y.to(x.dtype).reshape(*x.shape[:-1], m)


@trellis_matmul.register_fake
def _(x, trellis, SU, SV, Wscale, tlut, bits, code, out_rht_blocks):
    return x.new_empty((*x.shape[:-1], SV.shape[0]))


class TrellisTritonKernel(TritonKernel):
    """Packed ``trellis`` weights on a CUDA GPU: Hadamard transforms around the Triton decode-and-
    multiply GEMV (1..8 rows) or the Triton dequantize + dense matmul (more rows). No dense copy."""

    name = "trellis-triton"
    formats = (NAME,)

    def path(self, x):
        return f"{self.name}:{choose_path(x)}"

    def prepare(self, tensors):
        out = dict(tensors)
        if "tlut" not in out:  # V=1 codes: the op still takes a tensor
            out["tlut"] = torch.zeros(0, 2, dtype=torch.float16, device=out["SU"].device)
        # The small H_K matrices are made (host -> device copies) now, not in a call a CUDA graph captures.
        layer = self.layer
        for size in (layer.in_features, layer.out_features // layer.params.out_rht_blocks):
            K, _ = hadamard_factor(size)
            if K > 1:
                hadamard_k(K, torch.float32, out["SU"].device)
        return out

    def apply(self, tensors, x, bias=None):
        p = self.layer.params
        y = torch.ops.gq.trellis_matmul(x, tensors["trellis"], tensors["SU"], tensors["SV"], tensors["Wscale"],
                                        tensors["tlut"], p.bits, p.trellis_code, p.out_rht_blocks)
        return y if bias is None else y + bias.to(y.dtype)
