"""What this CPU can run: its instruction-set flags, read once from ``/proc/cpuinfo``.

The CPU kernels come in variants (``avx512``, ``avx2``, ``portable``); a variant is chosen at run
time by these flags (never by an environment variable), and a variant the CPU cannot run says
which flags it misses.
"""
from __future__ import annotations

import functools
import platform
from pathlib import Path

# Flags each variant's code needs (Linux /proc/cpuinfo names); ``portable`` needs none.
ISA_FLAGS: dict[str, tuple[str, ...]] = {
    "avx512": ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx2", "fma", "f16c"),
    "avx2": ("avx2", "fma", "f16c"),
    "portable": (),
    # The int8-activation kernel (gq_kernels.cpu.q8): byte permutes (VBMI) and int8 dot products (VNNI).
    "avx512vnni": ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512vbmi", "avx512_vnni", "avx2", "fma"),
}
# Variants compiled only for x86-64.
X86_ISAS = ("avx512", "avx2", "avx512vnni")
# Flags worth recording beside a CPU benchmark number.
REPORTED_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512vbmi",
                  "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8", "avx_vnni",
                  "asimd", "sve")


def machine() -> str:
    """The CPU architecture as Python reports it, lower case (``x86_64``, ``aarch64``, ...)."""
    return platform.machine().lower()


def is_x86_64() -> bool:
    return machine() in ("x86_64", "amd64")


@functools.cache
def _cpuinfo() -> tuple[frozenset[str], str]:
    path = Path("/proc/cpuinfo")
    flags: set[str] = set()
    model = ""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return frozenset(), ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("flags", "features") and not flags:
            flags.update(value.split())
        elif key == "model name" and not model:
            model = value.strip()
    return frozenset(flags), model


def cpu_flags() -> frozenset[str]:
    """The first processor's flags (x86 ``flags`` / ARM ``Features``); empty without /proc/cpuinfo."""
    return _cpuinfo()[0]


def isa_support(isa: str) -> tuple[bool, str | None]:
    """(True, None) when this CPU runs the ``isa`` variant, else (False, why)."""
    if isa not in ISA_FLAGS:
        raise ValueError(f"unknown CPU variant {isa!r}; known: {sorted(ISA_FLAGS)}")
    if isa in X86_ISAS and not is_x86_64():
        return False, f"the {isa} variant is x86-64 code; this CPU is {machine()}"
    flags = cpu_flags()
    if ISA_FLAGS[isa] and not flags:
        return False, f"the {isa} variant needs CPU flags {list(ISA_FLAGS[isa])}; /proc/cpuinfo is unreadable"
    missing = [f for f in ISA_FLAGS[isa] if f not in flags]
    if missing:
        return False, f"this CPU lacks {', '.join(missing)} (from /proc/cpuinfo), which the {isa} variant needs"
    return True, None


def describe() -> dict:
    """For benchmark rows: CPU model, architecture, the reported flags present, variants runnable."""
    flags = cpu_flags()
    return {"cpu_model": _cpuinfo()[1] or platform.processor() or machine(), "arch": machine(),
            "cpu_flags": [f for f in REPORTED_FLAGS if f in flags],
            "cpu_variants": [isa for isa in ISA_FLAGS if isa_support(isa)[0]]}
