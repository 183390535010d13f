"""``GQLinear``: a linear layer holding one quantized weight in its checkpoint format.

Its buffers are the format's checkpoint tensors (names equal the checkpoint's suffixes, so
``state_dict`` keys match the file); the bias stays a dense parameter. ``forward`` runs the kernel
:func:`gq_kernels.registry.choose_kernel` picks for the activation's device and dtype (once, then
cached): on a GPU the packed-weight Triton kernels, on the CPU the packed-weight CPU kernels
(``gq_kernels.cpu``: they read these buffers in place, and above 8 rows dequantize one bounded tile
at a time), and ``dense`` (dequantize once, dense matmul) where neither serves. The same kernels
serve the vLLM plugin.
"""
from __future__ import annotations

import torch
from torch import nn

from gq_kernels.format import FormatParams, LinearSpec
from gq_kernels.kernel import LinearKernel
from gq_kernels.registry import choose_kernel, get_format


class GQLinear(nn.Module):
    """Quantized replacement for ``nn.Linear`` (same in/out features, same bias semantics).

    Args:
        params: the format's parameters (``get_format(name).params(bits=..., ...)``).
        kernel: a kernel name to use instead of choosing one (see ``gq_kernels.registry.kernel_names``).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        params: FormatParams,
        bias: bool = False,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        kernel: str | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.params = params
        self.kernel_preference = kernel
        for name, spec in self.spec.tensors().items():
            self.register_buffer(name, torch.zeros(spec.shape, dtype=spec.dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None
        self.kernel: LinearKernel | None = None  # chosen for (device, dtype) of the last activations
        self._runtime: dict[str, torch.Tensor] | None = None  # what the kernel reads

    @property
    def spec(self) -> LinearSpec:
        return LinearSpec(self.params, self.out_features, self.in_features)

    @property
    def format(self) -> str:
        return self.params.format

    def extra_repr(self) -> str:
        params = ", ".join(f"{k}={v}" for k, v in self.params.model_dump().items())
        kernel = f", kernel={self.kernel.name}" if self.kernel is not None else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, format={self.format}, "
                f"{params}, bias={self.bias is not None}{kernel}")

    def packed_tensors(self) -> dict[str, torch.Tensor]:
        """The checkpoint tensors of this layer, by suffix."""
        return {name: getattr(self, name) for name in self.spec.tensors()}

    def dequantize(self) -> torch.Tensor:
        """W_hat, float32 [out, in]: bit for bit the quantizer's ``result.dequantize()``."""
        return get_format(self.format).dequantize(self.packed_tensors(), self.params, self.in_features)

    def select_kernel(self, device: torch.device | str, dtype: torch.dtype) -> LinearKernel:
        """Choose (or reuse) the kernel for activations on ``device`` in ``dtype`` and prepare it."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:  # as activations report it
            device = torch.device("cuda", torch.cuda.current_device())
        k = self.kernel
        if k is None or k.device != device or k.dtype != dtype:
            k = choose_kernel(self.spec, device, dtype, prefer=self.kernel_preference)
            self._runtime = k.prepare(self.packed_tensors())
            self.kernel = k
        return k

    def reset_cache(self) -> None:
        """Forget the kernel and what it prepared (after changing the packed buffers in place)."""
        self.kernel, self._runtime = None, None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] -> [..., out] in x's dtype."""
        k = self.kernel
        if k is None or k.device != x.device or k.dtype != x.dtype:
            k = self.select_kernel(x.device, x.dtype)
        return k.apply(self._runtime, x, self.bias)

    # Moving or reloading the module invalidates the prepared kernel; both go through these hooks.
    def _apply(self, fn, recurse=True):  # noqa: D401 - torch internal hook
        self.reset_cache()
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
        self.reset_cache()
        return super()._load_from_state_dict(*args, **kwargs)


def select_kernels(model: nn.Module, device: torch.device | str, dtype: torch.dtype) -> dict[str, int]:
    """Choose every GQLinear's kernel now (errors surface at load, not at the first request);
    returns kernel name -> number of layers."""
    counts: dict[str, int] = {}
    for m in model.modules():
        if isinstance(m, GQLinear):
            name = m.select_kernel(device, dtype).name
            counts[name] = counts.get(name, 0) + 1
    return counts


def install_kv_cache(model: nn.Module, params: FormatParams) -> int | None:
    """Make every forward of ``model`` use the KV cache its format requires (if any): a forward
    pre-hook passes a fresh one when the caller passes none (``use_cache=False``: one that keeps
    nothing, for full-sequence scoring) or an empty ``DynamicCache`` (``generate``, the decode
    loop: they read the cache back from the outputs). Any other cache is refused, since it would
    hold keys and values the checkpoint was not calibrated for. Returns the KV bits, or None.
    """
    from transformers import DynamicCache

    fmt = get_format(params.format)
    config = model.config
    if fmt.kv_cache(params, config) is None:
        return None

    def pre_hook(module, args, kwargs):
        cache = kwargs.get("past_key_values")
        if getattr(cache, "gq_format", None) == params.format:
            return args, kwargs
        if cache is None:
            kwargs["past_key_values"] = fmt.kv_cache(params, config, store=kwargs.get("use_cache") is not False)
        elif type(cache) is DynamicCache and cache.get_seq_length() == 0:
            kwargs["past_key_values"] = fmt.kv_cache(params, config, store=True)
        else:
            raise ValueError(f"this {params.format} checkpoint keeps its own quantized KV cache; got a "
                             f"{type(cache).__name__} (use the dynamic decoder: --decode dynamic)")
        return args, kwargs

    model.register_forward_pre_hook(pre_hook, with_kwargs=True)
    model.gq_kv_bits = params.kv_bits
    return params.kv_bits
