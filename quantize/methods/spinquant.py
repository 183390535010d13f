"""SpinQuant's weight quantizer (W4A4KV4, ``w4a4`` format): GPTQ onto a symmetric per-channel
integer grid (or one per channel and group of ``--weight-group`` input columns) whose scales are
fixed beforehand by a clipping search.

It runs on a model whose rotations are already folded in (``gq rotate``: RMSNorm gains fused,
R1 / R2 applied; :mod:`gq_quantize.spinquant`). Two rotations stay online and are the format's:
down_proj's input goes through the Hadamard R4, so its weight is quantized as ``W R4`` against the
Hessian ``R4^T H R4``; o_proj's input is quantized per attention head. :meth:`SpinQuantConfig.for_layer`
tells the handler which layer it quantizes.

With ``--guided --groups 1`` the Hessian is GuidedQuant's ``X^T diag(s) X``. The saliency s comes
from the rotated, unquantized model, and at g = 1 that is exactly the saliency of the original
model: s(token) = ||dL/dz||^2 / d_out over all output channels of the linear; the rotated model
computes the same function, and a linear's output z is either unrotated (q, k, gate, up) or
multiplied by an orthogonal matrix (v by the block-diagonal R2, o and down by R1), which keeps
||dL/dz||. With g > 1 the groups of rotated outputs would mix channels, so only g = 1 is exact.
"""
from __future__ import annotations

import dataclasses
import functools
import sys
from typing import ClassVar

import torch
from pydantic import Field, PrivateAttr
from torch import nn
from tqdm import tqdm

from gq_kernels.hadamard import hadamard_transform, has_hadamard, rotate_hessian
from gq_kernels.format import head_dim
from gq_kernels.w4a4 import reference as ref
from gq_kernels.w4a4.format import W4A4Quant, layer_layout
from gq_quantize.methods.base import MethodConfig
from gq_quantize.methods.gptq import inverse_hessian_factor
from gq_quantize.methods.objective import quadratic_objective
from gq_quantize.methods.registry import register_method

CLIP_STEPS = 80          # p = 1.00, 0.99, ..., 0.21
CLIP_NORM = 2.4
# Activation clip ratios --per-linear-act-clip chooses from (plus --act-clip itself).
ACT_CLIP_GRID = (0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 1.0)


def clipped_scale(w: torch.Tensor, bits: int, search: bool = True, group: int = 0) -> torch.Tensor:
    """Per-row symmetric scale ``p * max|w| / (2^(b-1) - 1)``, p in {1, 0.99, ..., 0.21} chosen per
    row to minimise sum |w - Q(w)|^2.4 (search=False: p = 1). w float32 [out, in] -> fp16 [out];
    with ``group`` columns per scale, fp16 [out, in / group] (each group searched on its own)."""
    if group:
        return clipped_scale(w.reshape(-1, group), bits, search).reshape(w.shape[0], -1)
    hi = (1 << (bits - 1)) - 1
    amax = w.abs().amax(dim=1).clamp_min(1e-8)
    best = (amax / hi).half()
    if not search:
        return best
    best_err = torch.full_like(amax, float("inf"))
    for i in range(CLIP_STEPS):
        s = ((1.0 - i / 100) * amax / hi).half()
        err = (ref.dequantize_weight(ref.quantize_weight(w, s, bits), s) - w).abs().pow(CLIP_NORM).sum(dim=1)
        better = err < best_err
        best_err, best = torch.where(better, err, best_err), torch.where(better, s, best)
    return best


def gptq_fixed_scale(w: torch.Tensor, H: torch.Tensor, scale: torch.Tensor, bits: int, damp: float = 0.01,
                     block: int = 128) -> tuple[torch.Tensor, float]:
    """GPTQ with a fixed symmetric grid per row (or per row and group of columns): columns rounded
    left to right, each one's error spread over the later columns through the upper Cholesky factor
    of H^-1 (lazy block updates).

    Args:
        w: float32 [out, in]; H: float32 [in, in]; scale: fp16 [out] or [out, G] (weight groups).
    Returns:
        (codes int8 [out, in], damping used).
    """
    W = w.float().clone()
    out_f, in_f = W.shape
    U, used = inverse_hessian_factor(H, damp)
    lo, hi = ref.weight_range(bits)
    s = ref.column_scales(scale.clamp_min(torch.finfo(torch.float16).tiny), in_f)
    codes = torch.empty(out_f, in_f, dtype=torch.int8)
    for i1 in range(0, in_f, block):
        i2 = min(i1 + block, in_f)
        W1, E1, U1 = W[:, i1:i2].clone(), torch.zeros(out_f, i2 - i1), U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            x, si = W1[:, i], s[:, i1 + i]
            q = torch.clamp(torch.round(x / si), lo, hi)
            codes[:, i1 + i] = q.to(torch.int8)
            err = (x - q * si) / U1[i, i]
            W1[:, i + 1:] -= err.unsqueeze(1) * U1[i, i + 1:].unsqueeze(0)
            E1[:, i] = err
        W[:, i2:] -= E1 @ U[i1:i2, i2:]
    return codes, used


class SpinQuantConfig(MethodConfig):
    """SpinQuant W4A4KV4 (run ``gq rotate`` first); with --guided --groups 1, SpinQuant + GuidedQuant."""

    name: ClassVar[str] = "spinquant"
    format: ClassVar[str] = "w4a4"
    needs: ClassVar[frozenset[str]] = frozenset({"hessian"})
    max_groups: ClassVar[int] = 1
    max_groups_reason: ClassVar[str] = ("the rotations R1/R2 mix the output channels of v, o and down_proj, so only "
                                        "g = 1 saliency is the original model's (see gq_quantize.methods.spinquant)")
    after_quantize_off: ClassVar[str] = "--no-per-linear-act-clip"
    bits: int = 4
    act_bits: int = Field(4, description="SpinQuant: activation bits (16: weights only)")
    act_clip: float = Field(0.8, gt=0, le=1, description="SpinQuant: activation range clip ratio (published: 1.0; "
                                                          "0.8 was chosen on validation text, docs/w4a4.md)")
    kv_bits: int = Field(4, description="SpinQuant: KV cache bits (16: not quantized)")
    kv_clip: float = Field(0.95, gt=0, le=1, description="SpinQuant: KV cache range clip ratio (published: 1.0; "
                                                          "QuaRot's 0.95)")
    act_group: int = Field(0, ge=0, description="SpinQuant: quantize activations in groups of this many input "
                                                 "channels (0: per token, the published setting; o_proj keeps "
                                                 "one group per head unless this is smaller)")
    kv_group: int = Field(0, ge=0, description="SpinQuant: quantize the KV cache in groups of this many of a head's "
                                                "channels (0: one range per token and head, the published setting)")
    weight_group: int = Field(0, ge=0, description="SpinQuant: one weight scale per output channel and group of "
                                                    "this many input channels (0: per channel, the published "
                                                    "setting); it must divide every linear's input size")
    w_clip: bool = Field(True, description="SpinQuant: per-row weight clipping search before GPTQ")
    gptq_damp: float = Field(0.01, ge=0.0, description="GPTQ: fraction of mean(diag H) added to the diagonal")
    gptq_block: int = Field(128, ge=1, description="GPTQ: lazy-update block width (columns)")
    rtn: bool = Field(False, description="SpinQuant: round to nearest instead of GPTQ (reads no calibration "
                                          "data with --no-per-linear-act-clip)")
    per_linear_act_clip: bool = Field(True, description="SpinQuant: once the weights are quantized, give each "
                                                        "linear the activation clip ratio (0.6 ... 1.0, and "
                                                        "--act-clip) whose output comes closest to float "
                                                        "activations on calibration windows (off: --act-clip for "
                                                        "every linear)")
    act_clip_windows: int = Field(2, ge=1, description="SpinQuant: calibration windows --per-linear-act-clip "
                                                        "measures on")

    _input_hadamard: bool = PrivateAttr(False)
    _act_group_size: int = PrivateAttr(0)

    def required(self) -> frozenset[str]:
        return frozenset() if self.rtn else type(self).needs

    def for_layer(self, name: str, model_config) -> "SpinQuantConfig":
        if self.kv_bits < 16:
            # Checked here, at the first layer: the cache is built only once every weight is quantized.
            ref.check_kv_group(self.kv_group, head_dim(model_config))
        c = self.model_copy()
        c._input_hadamard, group = layer_layout(name, model_config)
        c._act_group_size = self.act_group if self.act_group and (not group or self.act_group < group) else group
        return c

    def format_params(self, groups: int = 1):
        return super().format_params(groups).model_copy(update={"weight_group_size": self.weight_group,
                                                                "kv_group_size": self.kv_group})

    def after_quantize(self):
        return functools.partial(choose_act_clips, cfg=self) if self.per_linear_act_clip else None


def quantize_w4a4(w: torch.Tensor, H: torch.Tensor | None, cfg: SpinQuantConfig) -> W4A4Quant:
    """One linear's w4a4 result. w float32 [out, in] (rotations R1/R2 folded); H float32 [in, in]
    (None or ``cfg.rtn``: round to nearest)."""
    had, group = cfg._input_hadamard, cfg._act_group_size
    if cfg.weight_group and w.shape[1] % cfg.weight_group:
        raise ValueError(f"weight groups of {cfg.weight_group} do not divide this linear's {w.shape[1]} input channels; "
                         "pass a --weight-group that divides every linear's input size (64 for 576 and 1536)")
    if group and w.shape[1] % group:
        raise ValueError(f"activation groups of {group} do not divide this linear's {w.shape[1]} input channels; "
                         "pass an --act-group that divides every linear's input size (64 for 576 and 1536)")
    ref.gemm_group_size(w.shape[1], group, cfg.weight_group)   # refuses groupings that do not nest
    if had:
        if not has_hadamard(w.shape[1]):
            raise ValueError(f"down_proj input size {w.shape[1]} has no Hadamard construction (R4); "
                             "SpinQuant supports sizes K * 2^m with K in gq_kernels.hadamard.K_ORDER")
        w = hadamard_transform(w.float())                       # W R4
        if H is not None:
            H = rotate_hessian(H.float())                           # R4^T H R4
    scale = clipped_scale(w.float(), cfg.bits, cfg.w_clip, cfg.weight_group)
    stats = {}
    if H is None or cfg.rtn:
        codes = ref.quantize_weight(w, scale, cfg.bits)
    else:
        codes, stats["damp"] = gptq_fixed_scale(w, H, scale, cfg.bits, cfg.gptq_damp, cfg.gptq_block)
    result = W4A4Quant(codes=codes, scale=scale, bits=cfg.bits, input_hadamard=had,
                       act_group_size=cfg._act_group_size, act_bits=cfg.act_bits, act_clip=cfg.act_clip,
                       kv_bits=cfg.kv_bits, kv_clip=cfg.kv_clip, per_linear_act_clip=cfg.per_linear_act_clip,
                       weight_group_size=cfg.weight_group, kv_group_size=cfg.kv_group)
    if H is not None:
        stats["objective"] = quadratic_objective(w, ref.dequantize_weight(codes, scale), H)
    result.stats.update(stats)
    return result


@register_method(SpinQuantConfig)
def quantize_spinquant(w: torch.Tensor, hessian: torch.Tensor | None, fisher, cfg: SpinQuantConfig) -> W4A4Quant:
    return quantize_w4a4(w, hessian, cfg)


# ------------------------------------------------------------------ per-linear activation clip ratios
class _ClipProbe(nn.Module):
    """Stands in for one linear during :func:`choose_act_clips`: computes the w4a4 specification
    (:func:`gq_kernels.w4a4.reference.matmul`) with the result's starting ratio, and adds to
    ``errors`` [len(grid)] float64 the squared error of the output at each ratio of ``grid``
    against the same weights with float activations."""

    def __init__(self, result: W4A4Quant, bias: torch.Tensor | None, grid: list[float], errors: torch.Tensor) -> None:
        super().__init__()
        self.r, self.bias, self.grid, self.errors = result, bias, grid, errors

    def _out(self, x: torch.Tensor, bits: int, clip: float, bias: torch.Tensor | None = None) -> torch.Tensor:
        r = self.r
        return ref.matmul(x, r.codes, r.scale, bits, r.act_group_size, r.input_hadamard, clip, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = {}

        def out(clip: float | None) -> torch.Tensor:
            y = self._out(x, 16, 1.0) if clip is None else self._out(x, self.r.act_bits, clip)
            outs[clip] = y
            return y

        self.errors += clip_errors(out, self.grid)
        # Without a bias the output at the starting ratio is one the grid already computed.
        start = outs.get(self.r.act_clip)
        return start if self.bias is None and start is not None else \
            self._out(x, self.r.act_bits, self.r.act_clip, self.bias)


def clip_errors(out, grid: list[float]) -> torch.Tensor:
    """float64 [len(grid)]: ``||out(c) - out(None)||^2`` for each activation clip ratio c of ``grid``,
    where ``out(c)`` is a linear's output with its input quantized at ratio c and ``out(None)`` the
    output with its input in float."""
    want = out(None).double()
    return torch.stack([(out(c).double() - want).pow(2).sum() for c in grid]).cpu()


def choose_act_clips(model: nn.Module, results: dict[str, W4A4Quant], windows: torch.Tensor,
                     progress: bool = True, *, cfg: SpinQuantConfig) -> dict[str, W4A4Quant]:
    """Each linear's activation clip ratio, by its own output error (``gq quantize --per-linear-act-clip``).

    The model runs as its checkpoint will (w4a4 linears at ``cfg.act_clip``, the ``kv_bits`` KV
    cache) on the first ``cfg.act_clip_windows`` of ``windows`` [N, T]; each linear sums, for every
    ratio of :data:`ACT_CLIP_GRID` (and ``cfg.act_clip``), the squared difference between its output
    with its input quantized at that ratio and with its input in float, and keeps the least. Linears
    fed one input (q/k/v) each choose their own (one shared ratio measured worse, docs/w4a4.md), so
    a fused q/k/v may quantize its input per part. Only calibration text is read. Returns the
    results with ``linear_act_clip`` set (and the ratio in their stats); ``model`` is left as it was.
    """
    from gq_kernels.w4a4.format import W4A4Format
    from gq_quantize.calibration import quantizable_linears

    linears = quantizable_linears(model)
    if set(linears) != set(results):
        raise ValueError("--per-linear-act-clip needs every quantized linear's result; missing: "
                         f"{sorted(set(linears) ^ set(results))[:3]}")
    grid = sorted(set(ACT_CLIP_GRID) | {float(cfg.act_clip)})
    device = next(model.parameters()).device
    errors = {n: torch.zeros(len(grid), dtype=torch.float64) for n in linears}
    parents = {n: model.get_submodule(n.rpartition(".")[0]) for n in linears}
    probes = {n: _ClipProbe(results[n].to(device), lin.bias, grid, errors[n]) for n, lin in linears.items()}
    fmt, params = W4A4Format(), cfg.format_params()
    bar = tqdm(windows[:cfg.act_clip_windows], desc="activation clip ratios", unit="window", disable=not progress,
               file=sys.stderr)
    try:
        for n, probe in probes.items():
            setattr(parents[n], n.rpartition(".")[2], probe)
        with torch.inference_mode():
            for w in bar:
                kv = fmt.kv_cache(params, model.config, store=False)
                model(input_ids=w[None].to(device), use_cache=False, **({} if kv is None else {"past_key_values": kv}))
    finally:
        for n, lin in linears.items():
            setattr(parents[n], n.rpartition(".")[2], lin)
    out = {}
    for n, r in results.items():
        best = grid[int(errors[n].argmin())]
        out[n] = dataclasses.replace(r, per_linear_act_clip=True, linear_act_clip=best, stats={**r.stats, "act_clip": best})
    return out
