"""Tail-biting Viterbi search under the bitshift trellis (L = 16), as used by QTIP's quantizer.

A tile is N steps of V values; state s_t is a 16-bit integer, s_{t+1} = ((s_t << kV) mod 2^16) | b
with b < 2^kV, so the predecessors of s are (s >> kV) + j 2^(16-kV), j < 2^kV. :func:`viterbi`
minimises ``sum_t |c(s_t) - x_t|^2`` over state sequences, optionally with the top 16-kV bits of s_0
fixed (``init_top``) and the low 16-kV bits of s_{N-1} fixed (``end_low``).
:func:`quantize_tiles` is the two-pass tail-biting approximation of the spec: a first pass on the
sequence rotated by N/2 steps picks the overlap o of the state at the original step 0, a second pass
is forced to start with top bits o and to end with low bits o, so that the chain is one circular
bitstream of N kV bits (``gq_kernels.trellis.reference.is_tail_biting``).

Three implementations with the same contract:
* ``torch``: batched over tiles on any device (CPU or CUDA tensors), backpointers uint8;
* ``cpp``: C++ with OpenMP over tiles, compiled with the system's g++ on first use and cached under
  ``$GQ_CACHE/ext`` (key: source, flags, compiler and CPU), loaded with ctypes; backpointers uint8,
  O(N 2^(16-kV)) bytes per thread;
* ``auto`` (default): ``cpp`` for CPU tensors when it builds, else ``torch`` (a failed build is
  reported once as a warning naming the reason).
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

L = 16
N_STATES = 1 << L
_INF = 1e30

log = logging.getLogger(__name__)


# ============================================================================ PyTorch
def _viterbi_torch(x: torch.Tensor, table: torch.Tensor, kV: int, init_top: torch.Tensor | None,
                   end_low: torch.Tensor | None) -> torch.Tensor:
    B, N, V = x.shape
    U, J = N_STATES >> kV, 1 << kV
    dev = x.device
    tab = table.to(dev, torch.float32)  # [S, V]
    s_idx = torch.arange(N_STATES, device=dev)

    def dist(t: int) -> torch.Tensor:  # [B, S]
        return ((tab[None] - x[:, t, None, :]) ** 2).sum(-1)

    cost = dist(0)
    if init_top is not None:
        cost = torch.where((s_idx[None] >> kV) == init_top.to(dev)[:, None], cost, torch.full_like(cost, _INF))
    bp = torch.empty(N, B, U, dtype=torch.uint8, device=dev)
    for t in range(1, N):
        best, arg = cost.view(B, J, U).min(dim=1)  # predecessor u + j U of every s with s >> kV == u
        bp[t] = arg.to(torch.uint8)
        cost = dist(t) + best[:, :, None].expand(B, U, J).reshape(B, N_STATES)
    if end_low is not None:
        cost = torch.where((s_idx[None] & (U - 1)) == end_low.to(dev)[:, None], cost, torch.full_like(cost, _INF))
    s = cost.argmin(dim=1)
    out = torch.empty(B, N, dtype=torch.int64, device=dev)
    out[:, N - 1] = s
    rows = torch.arange(B, device=dev)
    for t in range(N - 1, 0, -1):
        u = s >> kV
        s = u + bp[t, rows, u].long() * U
        out[:, t - 1] = s
    return out


# ============================================================================ C++
_CPP_SOURCE = r"""
#include <cstdint>
#include <cstring>
#include <vector>

static const float BIG = 1e30f;

// One step, fused so that each cost is read once and written once: for every block of u, the best
// of its J predecessors u + j U, then the J successors u J + q of each u, which are consecutive states.
// nxt[s] = min_j cur[(s >> KV) + j U] + |c(s) - x|^2, bp[u] = the first j reaching the minimum.
#ifdef __AVX512F__
#include <immintrin.h>
// Four blocks of 16 u at once: four independent min chains hide the latency of vminps.
template <int KV, int V>
static void step(const float* __restrict cur, float* __restrict nxt, uint8_t* __restrict bp,
                 const float* __restrict c0, const float* __restrict c1, float x0, float x1) {
  constexpr int S = 1 << 16, U = S >> KV, J = 1 << KV, UB = 64;
  static_assert(U % UB == 0, "U is at least 256");
  const __m512 vx0 = _mm512_set1_ps(x0), vx1 = _mm512_set1_ps(x1);
  alignas(64) float bb[UB];
  for (int u0 = 0; u0 < U; u0 += UB) {
    __m512 b[4];
    __m512i a[4];
    for (int r = 0; r < 4; r++) { b[r] = _mm512_loadu_ps(cur + u0 + 16 * r); a[r] = _mm512_setzero_si512(); }
    for (int j = 1; j < J; j++) {
      const float* cj = cur + j * U + u0;
      const __m512i vj = _mm512_set1_epi32(j);
      for (int r = 0; r < 4; r++) {
        const __m512 v = _mm512_loadu_ps(cj + 16 * r);
        const __mmask16 lt = _mm512_cmp_ps_mask(v, b[r], _CMP_LT_OQ);
        b[r] = _mm512_mask_mov_ps(b[r], lt, v);
        a[r] = _mm512_mask_mov_epi32(a[r], lt, vj);
      }
    }
    for (int r = 0; r < 4; r++) {
      _mm_storeu_si128((__m128i*)(bp + u0 + 16 * r), _mm512_cvtepi32_epi8(a[r]));
      _mm512_store_ps(bb + 16 * r, b[r]);
    }
    const int s0 = u0 * J;
    auto emit = [&](int s, __m512 bu) {
      const __m512 d = _mm512_sub_ps(_mm512_loadu_ps(c0 + s), vx0);
      __m512 c = _mm512_fmadd_ps(d, d, bu);
      if constexpr (V > 1) {
        const __m512 e = _mm512_sub_ps(_mm512_loadu_ps(c1 + s), vx1);
        c = _mm512_fmadd_ps(e, e, c);
      }
      _mm512_storeu_ps(nxt + s, c);
    };
    if constexpr (J >= 16) {
      for (int i = 0; i < UB; i++) {
        const __m512 bu = _mm512_set1_ps(bb[i]);
        for (int q = 0; q < J; q += 16) emit(s0 + i * J + q, bu);
      }
    } else {  // a vector of 16 states spans 16 / J values of u
      for (int r = 0; r < 4; r++) {
        const __m512 br = _mm512_load_ps(bb + 16 * r);
        for (int c = 0; c < J; c++) {
          const __m512i idx = _mm512_srli_epi32(
              _mm512_add_epi32(_mm512_set1_epi32(16 * c), _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0)),
              KV);
          emit(s0 + (16 * r + c * 16 / J) * J, _mm512_permutexvar_ps(idx, br));
        }
      }
    }
  }
}
#else
template <int KV, int V>
static void step(const float* __restrict cur, float* __restrict nxt, uint8_t* __restrict bp,
                 const float* __restrict c0, const float* __restrict c1, float x0, float x1) {
  constexpr int S = 1 << 16, U = S >> KV, J = 1 << KV, UB = 16;
  for (int u0 = 0; u0 < U; u0 += UB) {
    float b[UB];
    int a[UB];
    for (int i = 0; i < UB; i++) { b[i] = cur[u0 + i]; a[i] = 0; }
    for (int j = 1; j < J; j++) {
      const float* cj = cur + j * U + u0;
      for (int i = 0; i < UB; i++) {
        const bool lt = cj[i] < b[i];
        b[i] = lt ? cj[i] : b[i];
        a[i] = lt ? j : a[i];
      }
    }
    for (int i = 0; i < UB; i++) bp[u0 + i] = (uint8_t)a[i];
    const int s0 = u0 * J;
    for (int k = 0; k < UB * J; k++) {
      const float d = c0[s0 + k] - x0;
      float c = b[k >> KV] + d * d;
      if constexpr (V > 1) { const float e = c1[s0 + k] - x1; c += e * e; }
      nxt[s0 + k] = c;
    }
  }
}
#endif

template <int KV, int V>
static void search(const float* xb, int N, const float* c0, const float* c1, int init_top, int end_low,
                   float* cost, float* spare, uint8_t* bp, int* ob) {
  constexpr int S = 1 << 16, U = S >> KV;
  for (int s = 0; s < S; s++) {
    const float d = c0[s] - xb[0];
    float c = d * d;
    if (V > 1) { const float e = c1[s] - xb[1]; c += e * e; }
    cost[s] = (init_top >= 0 && (s >> KV) != init_top) ? BIG : c;
  }
  for (int t = 1; t < N; t++) {
    step<KV, V>(cost, spare, bp + (size_t)t * U, c0, c1, xb[t * V], V > 1 ? xb[t * V + 1] : 0.f);
    std::swap(cost, spare);
  }
  int s = -1;
  float m = 0.f;
  for (int q = 0; q < S; q++) {
    if (end_low >= 0 && (q & (U - 1)) != end_low) continue;
    if (s < 0 || cost[q] < m) { m = cost[q]; s = q; }
  }
  ob[N - 1] = s;
  for (int t = N - 1; t > 0; t--) {
    const int u = s >> KV;
    s = u + (int)bp[(size_t)t * U + u] * U;
    ob[t - 1] = s;
  }
}

typedef void (*search_fn)(const float*, int, const float*, const float*, int, int, float*, float*, uint8_t*, int*);

template <int V>
static search_fn pick(int kV) {
  switch (kV) {
    case 1: return search<1, V>;
    case 2: return search<2, V>;
    case 3: return search<3, V>;
    case 4: return search<4, V>;
    case 5: return search<5, V>;
    case 6: return search<6, V>;
    case 7: return search<7, V>;
    case 8: return search<8, V>;
  }
  return nullptr;
}

// x [B][N][V]; table [V][65536]; init_top / end_low [B] or null; out [B][N] (int32 states).
extern "C" int gq_viterbi(const float* x, long long B, int N, int V, int kV, const float* table,
                          const int* init_top, const int* end_low, int* out, int nthreads) {
  const int S = 1 << 16, U = S >> kV;
  if (V < 1 || V > 2 || kV < 1 || kV > 8 || N < 2) return 1;
  const search_fn fn = V == 1 ? pick<1>(kV) : pick<2>(kV);
  const float* c0 = table;
  const float* c1 = table + (V > 1 ? S : 0);
  #pragma omp parallel num_threads(nthreads)
  {
    std::vector<float> cost(S), spare(S);
    std::vector<uint8_t> bp((size_t)N * U);
    #pragma omp for schedule(dynamic, 1)
    for (long long b = 0; b < B; b++)
      fn(x + (size_t)b * N * V, N, c0, c1, init_top ? init_top[b] : -1, end_low ? end_low[b] : -1,
         cost.data(), spare.data(), bp.data(), out + (size_t)b * N);
  }
  return 0;
}
"""

_CXX_FLAGS = ["-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-std=c++17"]


def _cache_dir() -> Path:
    try:
        from gq_serve.util import cache_root

        return cache_root() / "ext"
    except Exception:  # noqa: BLE001 - gq_serve absent: a private temp location still caches per boot
        return Path(tempfile.gettempdir()) / "gq-ext"


def _cpu_id() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


class ViterbiBuildError(RuntimeError):
    pass


@functools.cache
def _load_cpp():
    """Compile (once per source/compiler/CPU, atomically) and load the C++ Viterbi."""
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not cxx:
        raise ViterbiBuildError("no C++ compiler (g++) on PATH; install g++ or use impl='torch'")
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise ViterbiBuildError(f"{cxx} --version failed: {e}") from None
    key = hashlib.sha256("\0".join([_CPP_SOURCE, " ".join(_CXX_FLAGS), version, _cpu_id(),
                                    platform.machine()]).encode()).hexdigest()[:16]
    d = _cache_dir()
    so = d / f"gq_viterbi-{key}.so"
    if not so.exists():
        d.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=d, prefix=".build-") as tmp:
            src = Path(tmp) / "viterbi.cpp"
            src.write_text(_CPP_SOURCE)
            out = Path(tmp) / "viterbi.so"
            r = subprocess.run([cxx, *_CXX_FLAGS, str(src), "-o", str(out)], capture_output=True, text=True,
                               timeout=600)
            if r.returncode != 0:
                raise ViterbiBuildError(f"compiling the C++ Viterbi with {cxx} failed:\n{r.stderr[-2000:]}")
            os.replace(out, so)  # atomic: concurrent builders each publish a complete file
    lib = ctypes.CDLL(str(so))
    fn = lib.gq_viterbi
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p, ctypes.c_longlong, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p,
                   ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
    return fn


def cpp_available() -> tuple[bool, str | None]:
    """(True, None) when the C++ Viterbi builds and loads here, else (False, why)."""
    try:
        _load_cpp()
    except (ViterbiBuildError, OSError) as e:
        return False, str(e)
    return True, None


def _ptr(t: torch.Tensor | None):
    return None if t is None else ctypes.c_void_p(t.data_ptr())


def _viterbi_cpp(x: torch.Tensor, table: torch.Tensor, kV: int, init_top, end_low,
                 threads: int | None = None) -> torch.Tensor:
    fn = _load_cpp()
    B, N, V = x.shape
    xc = x.detach().to("cpu", torch.float32).contiguous()
    tab = table.to("cpu", torch.float32).t().contiguous()  # [V, S]
    it = None if init_top is None else init_top.to("cpu", torch.int32).contiguous()
    el = None if end_low is None else end_low.to("cpu", torch.int32).contiguous()
    out = torch.empty(B, N, dtype=torch.int32)
    rc = fn(_ptr(xc), B, N, V, kV, _ptr(tab), _ptr(it), _ptr(el), _ptr(out), int(threads or torch.get_num_threads()))
    if rc != 0:
        raise ValueError(f"C++ Viterbi refused V={V}, kV={kV}, N={N}")
    return out.long().to(x.device)


_warned = False


def _pick(impl: str, x: torch.Tensor) -> str:
    global _warned
    if impl not in ("auto", "torch", "cpp"):
        raise ValueError(f"Viterbi impl must be 'auto', 'torch' or 'cpp', got {impl!r}")
    if impl != "auto":
        return impl
    if x.device.type != "cpu":
        return "torch"
    ok, why = cpp_available()
    if not ok and not _warned:
        warnings.warn(f"C++ Viterbi unavailable, using the (much slower) PyTorch one: {why}", stacklevel=3)
        _warned = True
    return "cpp" if ok else "torch"


def viterbi(x: torch.Tensor, table: torch.Tensor, kV: int, init_top: torch.Tensor | None = None,
            end_low: torch.Tensor | None = None, impl: str = "auto", batch: int | None = None) -> torch.Tensor:
    """Minimum squared-error state sequences.

    Args:
        x: float [B, N, V]: B sequences of N steps of V values.
        table: float [2^16, V]: the value(s) of every state.
        kV: new bits per step (1..8).
        init_top / end_low: int [B] or None (see the module docstring).
        impl: 'auto', 'torch' or 'cpp'.
        batch: tiles per PyTorch call (memory: batch * N * 2^(16-kV) bytes of backpointers plus
            ~batch * 2^16 * (V + 3) floats of temporaries); default 256 on CUDA, 64 elsewhere.
    Returns:
        int64 [B, N] states on x's device.
    """
    if x.dim() != 3 or table.shape != (N_STATES, x.shape[2]):
        raise ValueError(f"x must be [B, N, V] and table [65536, V]; got {tuple(x.shape)} and {tuple(table.shape)}")
    if not 1 <= kV <= 8:
        raise ValueError(f"kV must be in 1..8 (uint8 backpointers), got {kV}")
    if x.shape[0] == 0:
        return torch.empty(0, x.shape[1], dtype=torch.int64, device=x.device)
    if _pick(impl, x) == "cpp":
        return _viterbi_cpp(x, table, kV, init_top, end_low)
    batch = batch or (256 if x.device.type == "cuda" else 64)
    outs = []
    for b0 in range(0, x.shape[0], batch):
        sl = slice(b0, b0 + batch)
        outs.append(_viterbi_torch(x[sl].float(), table, kV, None if init_top is None else init_top[sl],
                                   None if end_low is None else end_low[sl]))
    return torch.cat(outs)


def quantize_tiles(x: torch.Tensor, table: torch.Tensor, kV: int, impl: str = "auto") -> torch.Tensor:
    """Tail-biting states of B sequences x [B, N, V] (two passes; see the module docstring)."""
    B, N, V = x.shape
    half = N // 2
    rolled = torch.roll(x, shifts=half, dims=1)  # rolled[half] = x[0]
    first = viterbi(rolled, table, kV, impl=impl)
    o = first[:, half] >> kV
    return viterbi(x, table, kV, init_top=o, end_low=o, impl=impl)
