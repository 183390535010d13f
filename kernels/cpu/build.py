"""The CPU kernels' C++ extension: compiled on first use, cached, loaded once per process.

One shared library holds every variant: ``csrc/bitplane_isa.cpp``, ``csrc/rowint8_isa.cpp``,
``csrc/trellis_isa.cpp`` and ``csrc/groupint8_isa.cpp`` compiled once per instruction set
(``portable``; on x86-64 also ``avx2`` and ``avx512``, each with its own ``-m`` flags), on x86-64
the int8-activation kernel ``csrc/bitplane_q8_isa.cpp`` and the grouped int8 GEMM again (AVX-512
VBMI + VNNI), and the torch operators ``csrc/ops.cpp`` and ``csrc/decode_ops.cpp`` (built against
the running torch's headers). The operators
call a variant only when asked for it, and the kernels ask only for variants the CPU runs
(:mod:`.features`), so the AVX-512 code sits unused on an AVX2 machine.

The library lives in ``$GQ_CACHE/ext/gq_cpu-<key>/`` (default ``~/.cache/gq-serve``), ``key`` a hash
of the sources, the compiler and its version, every flag, the torch version and the platform; a
change of any of them builds a new one. A build happens under an exclusive lock file (processes
starting together build once), in a temporary directory renamed into place when complete (a killed
build leaves nothing half-written behind). It needs a C++ compiler (``g++`` or ``c++`` on PATH) and
torch's headers (part of every torch wheel); ninja and pybind11 are not used. When it cannot be
built, :func:`status` says why, the CPU kernels' ``can_implement`` repeats it, and the generic
kernels serve.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from gq_kernels.cpu import features

log = logging.getLogger(__name__)

CSRC = Path(__file__).resolve().parent / "csrc"
ISA_SOURCES = ("bitplane_isa.cpp", "rowint8_isa.cpp", "trellis_isa.cpp", "groupint8_isa.cpp")  # once per variant
# Units with sources of their own (not the variants' ISA_SOURCES): the int8-activation kernel needs
# VBMI and VNNI, which the avx512 variant must not assume (AVX-512 CPUs without them exist).
UNIT_SOURCES = {"avx512vnni": ("bitplane_q8_isa.cpp", "groupint8_isa.cpp")}
OPS_SOURCES = ("ops.cpp", "decode_ops.cpp")  # the torch operators, built against torch's headers
SOURCES = ("bitplane.h", "groupint8.h", "rowint8.h", "trellis.h", *ISA_SOURCES, *(s for v in UNIT_SOURCES.values() for s in v), *OPS_SOURCES)
LIBRARY = "libgq_cpu.so"
FORMAT_VERSION = 2  # bump to force a rebuild when this file's build logic changes

# Flags of the variant objects (no torch headers; C++17). -ffp-contract=off: no FMA contraction
# of a weight's s * q + o, which the reference computes with two roundings.
ISA_COMMON = ("-O3", "-std=c++17", "-fPIC", "-ffp-contract=off", "-fno-math-errno", "-fvisibility=hidden")
ISA_UNITS: dict[str, tuple[str, ...]] = {
    "portable": (),
    "avx2": ("-DGQ_ISA_AVX2", "-mavx2", "-mfma", "-mf16c"),
    "avx512": ("-DGQ_ISA_AVX512", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma",
               "-mf16c"),
    "avx512vnni": ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vbmi", "-mavx512vnni",
                   "-mavx2", "-mfma"),
}
OPS_FLAGS = ("-O3", "-std=c++20", "-fPIC", "-fopenmp")  # -O3: decode_ops.cpp's loops vectorize


class ExtensionUnavailable(RuntimeError):
    """The extension could not be built or loaded; the message says why."""


def ext_root() -> Path:
    """``$GQ_CACHE/ext`` (default ``~/.cache/gq-serve/ext``)."""
    env = os.environ.get("GQ_CACHE")
    return (Path(env).expanduser() if env else Path.home() / ".cache" / "gq-serve") / "ext"


def find_compiler() -> str | None:
    for name in ("g++", "c++"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _torch_dirs() -> tuple[list[str], str]:
    root = Path(torch.__file__).resolve().parent
    include = root / "include"
    return [str(include), str(include / "torch" / "csrc" / "api" / "include")], str(root / "lib")


def isa_units() -> list[str]:
    """The variants compiled on this machine: every one on x86-64, else ``portable`` only."""
    return [isa for isa in ISA_UNITS if isa not in features.X86_ISAS or features.is_x86_64()]


def build_plan(cxx: str) -> dict:
    """Everything that determines the library: the hash of it is the cache key."""
    includes, libdir = _torch_dirs()
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    ops = [*OPS_FLAGS, f"-D_GLIBCXX_USE_CXX11_ABI={abi}", *(f"-I{p}" for p in includes)]
    if features.is_x86_64():
        ops.append("-DGQ_WITH_X86")
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60).stdout.splitlines()
    return {
        "format_version": FORMAT_VERSION,
        "compiler": cxx,
        "compiler_version": version[0] if version else "",
        "units": {**{isa: [*ISA_COMMON, *ISA_UNITS[isa]] for isa in isa_units()}, "ops": ops},
        "link": ["-shared", "-fopenmp", f"-L{libdir}", "-lc10", "-ltorch_cpu", f"-Wl,-rpath,{libdir}"],
        "torch": torch.__version__,
        "platform": f"{sys.platform}-{features.machine()}",
        "sources": {name: hashlib.sha256((CSRC / name).read_bytes()).hexdigest() for name in SOURCES},
    }


def _key(plan: dict) -> str:
    return hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()[:16]


def _run(cmd: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _compile(plan: dict, out_dir: Path) -> None:
    """Compile every unit (in parallel, up to the CPU count) and link the library into out_dir."""
    cxx = plan["compiler"]
    jobs = []
    for unit, flags in plan["units"].items():
        for src in OPS_SOURCES if unit == "ops" else UNIT_SOURCES.get(unit, ISA_SOURCES):
            obj = f"{unit}-{Path(src).stem}.o"
            jobs.append((obj, [cxx, *flags, "-c", str(CSRC / src), "-o", str(out_dir / obj)]))
    width = max(1, min(len(jobs), os.cpu_count() or 1))
    logs = []
    for i in range(0, len(jobs), width):
        running = [(unit, cmd, _run(cmd, out_dir)) for unit, cmd in jobs[i:i + width]]
        for unit, cmd, proc in running:
            output, _ = proc.communicate()
            logs.append(f"$ {' '.join(cmd)}\n{output}")
            if proc.returncode:
                (out_dir / "build.log").write_text("\n".join(logs))
                raise ExtensionUnavailable(f"compiling the CPU kernels ({unit}) failed with {cxx}:\n"
                                           f"{output[-3000:]}")
    objs = [str(out_dir / obj) for obj, _ in jobs]
    cmd = [cxx, *objs, "-o", str(out_dir / LIBRARY), *plan["link"]]
    proc = _run(cmd, out_dir)
    output, _ = proc.communicate()
    logs.append(f"$ {' '.join(cmd)}\n{output}")
    (out_dir / "build.log").write_text("\n".join(logs))
    if proc.returncode:
        raise ExtensionUnavailable(f"linking the CPU kernels failed with {cxx}:\n{output[-3000:]}")
    for obj in objs:
        Path(obj).unlink()


def library_path() -> Path:
    """The built library, building it first if this machine has none for this key."""
    if sys.platform != "linux":
        raise ExtensionUnavailable(f"the CPU kernels' extension builds on Linux only (this is {sys.platform})")
    cxx = find_compiler()
    if cxx is None:
        raise ExtensionUnavailable(
            "no C++ compiler on PATH (looked for g++ and c++): the CPU kernels compile their extension "
            f"once with it (cached under {ext_root()}); install g++ to use them")
    plan = build_plan(cxx)
    key = _key(plan)
    root = ext_root()
    final = root / f"gq_cpu-{key}"
    lib = final / LIBRARY
    if lib.is_file():
        return lib
    try:
        root.mkdir(parents=True, exist_ok=True)
        lock = open(root / f"gq_cpu-{key}.lock", "w")
    except OSError as e:
        raise ExtensionUnavailable(f"cannot write the CPU kernels' build cache {root}: {e}") from None
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building this key: wait for it
        if lib.is_file():
            return lib
        log.warning("gq_kernels: compiling the CPU kernels once for this machine (%s, torch %s) into %s; "
                    "this takes about a minute", plan["compiler_version"], plan["torch"], final)
        t0 = time.perf_counter()
        tmp = Path(tempfile.mkdtemp(prefix=f".gq_cpu-{key}-", dir=root))
        try:
            _compile(plan, tmp)
            (tmp / "build.json").write_text(json.dumps({**plan, "seconds": round(time.perf_counter() - t0, 1),
                                                        "host": platform.node()}, indent=1))
            os.rename(tmp, final)  # atomic: the directory appears complete or not at all
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log.warning("gq_kernels: CPU kernels built in %.0f s", time.perf_counter() - t0)
    return lib


_lock = threading.Lock()
_state: dict = {}


def load() -> None:
    """Build (if needed) and load the library into this process, once; ExtensionUnavailable if not."""
    with _lock:
        if "error" in _state:
            raise ExtensionUnavailable(_state["error"])
        if "path" in _state:
            return
        try:
            path = library_path()
            torch.ops.load_library(str(path))
            from gq_kernels.cpu import ops  # noqa: F401  (fake implementations for torch.compile)
        except ExtensionUnavailable as e:
            _state["error"] = str(e)
            raise
        except (OSError, RuntimeError, subprocess.SubprocessError) as e:
            _state["error"] = f"the CPU kernels' extension could not be built or loaded: {e}"
            raise ExtensionUnavailable(_state["error"]) from e
        _state["path"] = path


def status() -> tuple[bool, str | None]:
    """(True, None) once the extension is loaded (building it on first call), else (False, why)."""
    try:
        load()
    except ExtensionUnavailable as e:
        return False, str(e)
    return True, None


def loaded_path() -> Path | None:
    """The loaded library's path (None before :func:`load`)."""
    return _state.get("path")
