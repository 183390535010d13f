"""The kernel interface: how one quantized linear computes ``x @ W_hat.T``, chosen once per layer.

In the manner of vLLM's ``MPLinearKernel``: a kernel class says whether it can serve a layer
(``can_implement(layer, device, dtype, rows) -> (ok, reason)``), turns the loaded checkpoint
tensors into what it reads (``prepare``: repack, dequantize, or nothing) and computes the product
(``apply``). ``GQLinear`` (embedded engine, transformers) and the vLLM linear method both go through
:func:`gq_kernels.registry.choose_kernel`, so the two engines run the same code for the same layer.

Two kernels serve every format through its reference: ``dense`` (dequantize once, then a dense
matmul: fast wherever no packed kernel exists, at the cost of a dense copy) and ``reference``
(dequantize on every call from the packed tensors: slow, only on request; it exercises the packed
tensor handling of a loader on any device).
"""
from __future__ import annotations

from collections.abc import Callable

import functools
from abc import ABC, abstractmethod
from typing import ClassVar

import torch
import torch.nn.functional as F

from gq_kernels.format import LinearSpec

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@functools.cache
def triton_available() -> bool:
    """True when Triton imports (it ships with CUDA builds of torch; CPU builds usually lack it)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def kernels_serve(device: torch.device) -> bool:
    """True when the Triton kernels run on ``device`` (CUDA with Triton installed)."""
    return device.type == "cuda" and triton_available()


def rows_2d(x: torch.Tensor) -> torch.Tensor:
    """x [..., K] -> [M, K] with contiguous rows (a view when possible)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def n_rows(x: torch.Tensor) -> int:
    """Activation rows of x [..., K]: the product of its leading dims."""
    return x.numel() // x.shape[-1] if x.shape[-1] else 0


class LinearKernel(ABC):
    """One implementation of a quantized linear. Subclasses live with their format (or here, when
    they serve every format) and are listed in :mod:`gq_kernels.registry`.

    ``formats``: the formats served (None: all); ``auto``: chosen without being asked for by name.
    An instance serves one layer on one device in one activation dtype.
    """

    name: ClassVar[str]
    formats: ClassVar[tuple[str, ...] | None] = None
    auto: ClassVar[bool] = True

    def __init__(self, layer: LinearSpec, device: torch.device, dtype: torch.dtype) -> None:
        self.layer, self.device, self.dtype = layer, torch.device(device), dtype

    @classmethod
    def can_implement(cls, layer: LinearSpec, device: torch.device, dtype: torch.dtype,
                      rows: int | None = None) -> tuple[bool, str | None]:
        """(True, None) when this kernel serves ``layer`` on ``device`` for ``dtype`` activations and
        calls of up to ``rows`` activation rows (None: any number); else (False, why)."""
        if cls.formats is not None and layer.format not in cls.formats:
            return False, f"serves formats {list(cls.formats)}, not {layer.format!r}"
        if dtype not in FLOAT_DTYPES:
            return False, f"activations must be one of {[str(d) for d in FLOAT_DTYPES]}, got {dtype}"
        return True, None

    def prepare(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The tensors ``apply`` reads, made once after loading from the checkpoint tensors."""
        return tensors

    @abstractmethod
    def apply(self, tensors: dict[str, torch.Tensor], x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``x @ W_hat.T (+ bias)`` for x [..., in] in ``self.dtype``; returns [..., out] in x's dtype."""

    @classmethod
    def shared(cls, members: list[tuple[LinearKernel, dict[str, torch.Tensor]]]
               ) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """One call for several layers fed the same input (q/k/v, gate/up; or one layer, called
        without the module around it): a function x [..., in] -> their outputs side by side
        [..., out_0 + out_1 + ...], made once and valid while the members' kernels are; or None
        where this kernel has no such call (the caller applies each member). ``members``:
        (kernel, prepared tensors) pairs of layers without bias, ``cls`` the first one's class."""
        return None

    def path(self, x: torch.Tensor) -> str:
        """What serves a call on ``x`` (for benchmarks and logs): the kernel's name, plus the
        per-call path for kernels that pick one by the number of rows."""
        return self.name

    def __repr__(self) -> str:
        return f"{self.name}({self.layer.params!r}, {self.layer.out_features}x{self.layer.in_features}, {self.device}, {self.dtype})"


class TritonKernel(LinearKernel):
    """Base of the packed-weight Triton kernels: they run on a CUDA device with Triton installed."""

    @classmethod
    def can_implement(cls, layer, device, dtype, rows=None):
        ok, why = super().can_implement(layer, device, dtype, rows)
        if not ok:
            return ok, why
        if torch.device(device).type != "cuda":
            return False, f"needs a CUDA device, got {torch.device(device).type}"
        if not triton_available():
            return False, "Triton is not installed"
        return True, None


def _format(layer: LinearSpec):
    from gq_kernels.registry import get_format

    return get_format(layer.format)


class DenseKernel(LinearKernel):
    """Dequantize once with the format's reference, keep W_hat in the activation dtype, dense matmul.

    Numerically the reference (``x @ W_hat.to(x.dtype).T``) with the dense weight cached; memory:
    a dense copy of the weight.
    """

    name = "dense"

    @classmethod
    def can_implement(cls, layer, device, dtype, rows=None):
        ok, why = super().can_implement(layer, device, dtype, rows)
        if ok and not _format(layer).weight_only:
            return False, f"format {layer.format!r} quantizes activations too; a dense weight would skip that"
        return ok, why

    def prepare(self, tensors):
        layer = self.layer
        w = _format(layer).dequantize(tensors, layer.params, layer.in_features)
        return {"weight": w.to(device=self.device, dtype=self.dtype)}

    def apply(self, tensors, x, bias=None):
        return F.linear(x, tensors["weight"], None if bias is None else bias.to(x.dtype))


class ReferenceKernel(LinearKernel):
    """The format's reference matmul on the packed tensors, dequantizing on every call.

    Slow; chosen only by name. It runs a loader's packed-tensor handling (fused layers, tensor-
    parallel column splits) on any device, where the fast packed kernels need a GPU.
    """

    name = "reference"
    auto = False

    def apply(self, tensors, x, bias=None):
        layer = self.layer
        return _format(layer).matmul(x, tensors, layer.params, layer.in_features, bias)
