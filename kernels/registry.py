"""The one place where formats and kernels are registered.

Built-in formats and kernels are listed below and imported on first use; a third party (or a test)
adds its own with :func:`register_format` / :func:`register_kernel`. Everything that needs a format
or a kernel asks here: nothing else names one.
"""
from __future__ import annotations

import importlib
import threading

import torch

from gq_kernels.format import Format, LinearSpec
from gq_kernels.kernel import LinearKernel

# name -> "module:class" of each built-in format.
_BUILTIN_FORMATS = {
    "lut": "gq_kernels.lut.format:LutFormat",
    "bcq": "gq_kernels.bcq.format:BcqFormat",
    "trellis": "gq_kernels.trellis.format:TrellisFormat",
    "w4a4": "gq_kernels.w4a4.format:W4A4Format",
}
# Built-in kernels in order of preference; the generic ones (every format) come last.
_BUILTIN_KERNELS = (
    "gq_kernels.lut.ops:LutTritonKernel",
    "gq_kernels.bcq.ops:BcqTritonKernel",
    "gq_kernels.trellis.ops:TrellisTritonKernel",
    "gq_kernels.w4a4.ops:W4A4TritonKernel",  # CUDA; elsewhere (and at 16-bit activations) w4a4-int
    "gq_kernels.w4a4.cpu:W4A4CpuAvx512VnniKernel",
    "gq_kernels.w4a4.cpu:W4A4CpuAvx512Kernel",
    "gq_kernels.w4a4.cpu:W4A4CpuAvx2Kernel",
    "gq_kernels.w4a4.ops:W4A4IntKernel",
    "gq_kernels.w4a4.cpu:W4A4CpuPortableKernel",  # behind w4a4-int (torch._int_mm): by name only
    # CPU: each format's variants, best first; a variant the CPU cannot run says which flags it lacks.
    "gq_kernels.lut.cpu:LutCpuAvx512Kernel",
    "gq_kernels.lut.cpu:LutCpuAvx2Kernel",
    "gq_kernels.lut.cpu:LutCpuPortableKernel",
    "gq_kernels.lut.cpu:LutCpuQ8Kernel",  # int8 activations: by name only (not auto)
    "gq_kernels.bcq.cpu:BcqCpuAvx512Kernel",
    "gq_kernels.bcq.cpu:BcqCpuAvx2Kernel",
    "gq_kernels.bcq.cpu:BcqCpuPortableKernel",
    "gq_kernels.trellis.cpu:TrellisCpuAvx512Kernel",
    "gq_kernels.trellis.cpu:TrellisCpuAvx2Kernel",
    "gq_kernels.trellis.cpu:TrellisCpuPortableKernel",
)
_GENERIC_KERNELS = (
    "gq_kernels.kernel:DenseKernel",
    "gq_kernels.kernel:ReferenceKernel",
)

_lock = threading.Lock()
_formats: dict[str, Format] = {}
_kernels: list[type[LinearKernel]] = []  # specific kernels, in order of preference
_generic: list[type[LinearKernel]] = []
_loaded = False


def _load(path: str):
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


def _ensure_builtins() -> None:
    global _loaded
    if _loaded:
        return
    with _lock:
        if _loaded:
            return
        for name, path in _BUILTIN_FORMATS.items():
            fmt = _load(path)()
            if fmt.name != name:
                raise RuntimeError(f"{path} declares format {fmt.name!r}, registered as {name!r}")
            _formats.setdefault(name, fmt)
        _kernels[:0] = [k for k in map(_load, _BUILTIN_KERNELS) if k not in _kernels]
        _generic.extend(_load(p) for p in _GENERIC_KERNELS)
        _loaded = True


def register_format(fmt: Format) -> Format:
    """Add a format (an instance of a :class:`Format` subclass); a second registration of the same
    class is a no-op, another class under a taken name is refused."""
    _ensure_builtins()
    old = _formats.get(fmt.name)
    if old is not None and type(old) is not type(fmt):
        raise ValueError(f"format {fmt.name!r} is already registered by {type(old).__module__}.{type(old).__name__}")
    _formats.setdefault(fmt.name, fmt)
    return _formats[fmt.name]


def register_kernel(cls: type[LinearKernel]) -> type[LinearKernel]:
    """Add a kernel class, preferred after the kernels already registered and before the generic
    ones (``dense``, ``reference``). Usable as a decorator; idempotent."""
    _ensure_builtins()
    names = {k.name for k in _kernels + _generic}
    if cls in _kernels:
        return cls
    if cls.name in names:
        raise ValueError(f"a kernel named {cls.name!r} is already registered")
    _kernels.append(cls)
    return cls


def format_names() -> list[str]:
    _ensure_builtins()
    return sorted(_formats)


def get_format(name: str) -> Format:
    """The registered format ``name``; a ValueError lists the registered ones."""
    _ensure_builtins()
    try:
        return _formats[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown quantization format {name!r}; registered formats: {format_names()}") from None


def kernels() -> list[type[LinearKernel]]:
    """Every registered kernel class, in order of preference."""
    _ensure_builtins()
    return [*_kernels, *_generic]


def kernel_names() -> list[str]:
    return [k.name for k in kernels()]


def choose_kernel(layer: LinearSpec, device: torch.device | str, dtype: torch.dtype, rows: int | None = None,
                  prefer: str | None = None) -> LinearKernel:
    """The first kernel (in order of preference, ``auto`` ones only) that can serve ``layer`` on
    ``device`` for ``dtype`` activations, or the kernel named ``prefer`` ("auto" or None: choose).

    Raises ValueError listing every candidate's reason when none fits.
    """
    device = torch.device(device)
    if prefer in (None, "auto"):
        candidates = [k for k in kernels() if k.auto]
    else:
        candidates = [k for k in kernels() if k.name == prefer]
        if not candidates:
            raise ValueError(f"unknown kernel {prefer!r}; registered kernels: {['auto', *kernel_names()]}")
    reasons = []
    for cls in candidates:
        ok, why = cls.can_implement(layer, device, dtype, rows)
        if ok:
            return cls(layer, device, dtype)
        reasons.append(f"{cls.name}: {why}")
    raise ValueError(
        f"no kernel serves format {layer.format} ({', '.join(f'{k}={v}' for k, v in layer.params.model_dump().items())}) "
        f"{layer.out_features}x{layer.in_features} on {device} for {dtype} activations:\n  " + "\n  ".join(reasons))
