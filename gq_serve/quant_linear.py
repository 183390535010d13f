"""``GQLinear``: a linear layer whose weight is a packed ``lut`` or ``bcq`` checkpoint tensor set.

Buffers (names equal the checkpoint's tensor suffixes, so ``state_dict`` keys match the file):
    lut: qweight int32 [bits, out, ceil(in/32)], codebook float16 [out, 2^bits]
    bcq: qweight int32 [bits, out, ceil(in/32)], scales / offsets float16 [out, n_groups]
    bias (parameter, optional): [out] in the model dtype.

On the CPU (or any device without a registered kernel) ``forward`` dequantizes once, caches the
dense weight in the activation's dtype and device, and calls ``F.linear``: that is the fast CPU path
and numerically identical to the kernels' reference ``matmul``. On CUDA ``forward`` calls the
``torch.ops.gq.*_matmul`` operators of ``kernels.ops`` (Triton GEMV for decode, dequantize + dense
matmul for prefill), which read the packed weights on every call and keep no dense copy; other
devices can plug in through :func:`register_kernel`.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from kernels import ops
from kernels.bcq import reference as bcq_ref
from kernels.lut import reference as lut_ref
from kernels.packing import packed_words

FORMATS = ("lut", "bcq")

# (format, device type) -> kernel(module, x) -> y. Filled by GPU kernel packages at import time.
KernelFn = Callable[["GQLinear", torch.Tensor], torch.Tensor]
_KERNELS: dict[tuple[str, str], KernelFn] = {}


def register_kernel(fmt: str, device_type: str, fn: KernelFn) -> None:
    """Route ``GQLinear.forward`` for ``fmt`` on ``device_type`` (e.g. "cuda") to ``fn(module, x)``."""
    if fmt not in FORMATS:
        raise ValueError(f"register_kernel: unknown format {fmt!r}; expected one of {FORMATS}")
    _KERNELS[(fmt, device_type)] = fn


def expected_buffers(fmt: str, bits: int, out_features: int, in_features: int, group_size: int = -1) -> dict:
    """Checkpoint tensor suffix -> (shape tuple, dtype) for one quantized linear (bias excluded)."""
    qweight = ((bits, out_features, packed_words(in_features)), torch.int32)
    if fmt == "lut":
        return {"qweight": qweight, "codebook": ((out_features, 1 << bits), torch.float16)}
    if fmt == "bcq":
        g = (out_features, bcq_ref.n_groups(in_features, group_size))
        return {"qweight": qweight, "scales": (g, torch.float16), "offsets": (g, torch.float16)}
    raise ValueError(f"unknown quantization format {fmt!r}; expected one of {FORMATS}")


class GQLinear(nn.Module):
    """Quantized replacement for ``nn.Linear`` (same in/out features, same bias semantics)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        fmt: str,
        bits: int,
        group_size: int = -1,
        bias: bool = False,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.format, self.bits, self.group_size = fmt, bits, group_size
        for name, (shape, dt) in expected_buffers(fmt, bits, out_features, in_features, group_size).items():
            self.register_buffer(name, torch.zeros(shape, dtype=dt, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None
        self._dense: torch.Tensor | None = None  # cached W_hat in the last activation dtype/device

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, format={self.format}, "
            f"bits={self.bits}, group_size={self.group_size}, bias={self.bias is not None}"
        )

    def dequantize(self) -> torch.Tensor:
        """W_hat, float32 [out, in], bit for bit the quantizer's ``LutQuant/UniformQuant.dequantize()``."""
        if self.format == "lut":
            return lut_ref.dequantize_packed(self.qweight, self.codebook, self.in_features)
        return bcq_ref.dequantize_packed(self.qweight, self.scales, self.offsets, self.group_size, self.in_features)

    def reset_cache(self) -> None:
        """Drop the cached dense weight (call after changing the packed buffers in place)."""
        self._dense = None

    def _dense_weight(self, like: torch.Tensor) -> torch.Tensor:
        w = self._dense
        if w is None or w.dtype != like.dtype or w.device != like.device:
            w = self.dequantize().to(device=like.device, dtype=like.dtype)
            self._dense = w
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] -> [..., out] in x's dtype."""
        kernel = _KERNELS.get((self.format, x.device.type))
        if kernel is not None:
            return kernel(self, x)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self._dense_weight(x), bias)

    # Moving or reloading the module invalidates the cache; both go through these hooks.
    def _apply(self, fn, recurse=True):  # noqa: D401 - torch internal hook
        self._dense = None
        packed = dict(self.named_buffers(recurse=False))
        out = super()._apply(fn, recurse)
        for name, before in packed.items():
            after = getattr(self, name)
            # model.to(bfloat16) / .float() must not recast the format's fp16 codebook/scales:
            # W_hat would stop being bit-exact. Keep the original values, follow the device only.
            if after.dtype != before.dtype:
                setattr(self, name, before.to(after.device))
        return out

    def _load_from_state_dict(self, *args, **kwargs):
        self._dense = None
        return super()._load_from_state_dict(*args, **kwargs)


def _lut_cuda(module: GQLinear, x: torch.Tensor) -> torch.Tensor:
    y = ops.lut_matmul(x, module.qweight, module.codebook, module.in_features)
    return y if module.bias is None else y + module.bias.to(y.dtype)


def _bcq_cuda(module: GQLinear, x: torch.Tensor) -> torch.Tensor:
    y = ops.bcq_matmul(x, module.qweight, module.scales, module.offsets, module.group_size, module.in_features)
    return y if module.bias is None else y + module.bias.to(y.dtype)


register_kernel("lut", "cuda", _lut_cuda)
register_kernel("bcq", "cuda", _bcq_cuda)
