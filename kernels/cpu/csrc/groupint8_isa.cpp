// The grouped integer GEMM of groupint8.h for one instruction set, chosen at compile time:
// AVX-512 VNNI (the avx512vnni unit: one vpdpbusd per 4 columns x 16 channels), -DGQ_ISA_AVX512
// (AVX-512 BW: vpmaddubsw + vpmaddwd), -DGQ_ISA_AVX2 (the same on two 256-bit halves), or neither
// (portable C++).
//
// vpmaddubsw adds two u8 x s8 products into an int16 with saturation: activation codes below 256
// and weight codes in [-8, 7] keep every pair within 2 * 255 * 8 = 4080, so no variant saturates
// and all of them compute the same exact int32 sums. The epilogue is the header's sequence of
// fp32 multiplies and adds, one rounding each (-ffp-contract=off: no fused multiply-add).
#include "groupint8.h"

#if defined(__AVX512VNNI__) || defined(GQ_ISA_AVX512) || defined(GQ_ISA_AVX2)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstring>

namespace {

using gq_cpu::GroupInt8Problem;
using gq_cpu::kGroupBlockN;

inline uint32_t load4(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

#if defined(__AVX512VNNI__) || defined(GQ_ISA_AVX512)
#if defined(__AVX512VNNI__)
#define GQ_ISA avx512vnni
#else
#define GQ_ISA avx512
#endif
using IV = __m512i;
using FV = __m512;
inline IV iv_zero() { return _mm512_setzero_si512(); }
// acc[i] += sum_{j<4} xbytes[j] * w[4 i + j] for the 16 channels i of a block.
inline IV iv_dot(IV acc, uint32_t xbytes, const int8_t* w) {
  const __m512i x = _mm512_set1_epi32(static_cast<int32_t>(xbytes));
  const __m512i wv = _mm512_loadu_si512(w);
#if defined(__AVX512VNNI__)
  return _mm512_dpbusd_epi32(acc, x, wv);
#else
  const __m512i pairs = _mm512_maddubs_epi16(x, wv);
  return _mm512_add_epi32(acc, _mm512_madd_epi16(pairs, _mm512_set1_epi16(1)));
#endif
}
inline FV fv_zero() { return _mm512_setzero_ps(); }
inline FV fv_from(IV v) { return _mm512_cvtepi32_ps(v); }
inline FV fv_load(const float* p) { return _mm512_loadu_ps(p); }
inline FV fv_set1(float v) { return _mm512_set1_ps(v); }
inline FV fv_mul(FV a, FV b) { return _mm512_mul_ps(a, b); }
inline FV fv_sub(FV a, FV b) { return _mm512_sub_ps(a, b); }
inline FV fv_add(FV a, FV b) { return _mm512_add_ps(a, b); }
inline FV fv_min(FV a, FV b) { return _mm512_min_ps(a, b); }
inline FV fv_max(FV a, FV b) { return _mm512_max_ps(a, b); }
inline float fv_hmin(FV v) { return _mm512_reduce_min_ps(v); }
inline float fv_hmax(FV v) { return _mm512_reduce_max_ps(v); }
inline void fv_store(float* p, FV v, int nv) {
  if (nv == kGroupBlockN)
    _mm512_storeu_ps(p, v);
  else
    _mm512_mask_storeu_ps(p, static_cast<__mmask16>((1u << nv) - 1), v);
}
#elif defined(GQ_ISA_AVX2)
#define GQ_ISA avx2
struct IV {
  __m256i lo, hi;  // channels 0..7 and 8..15
};
struct FV {
  __m256 lo, hi;
};
inline IV iv_zero() { return {_mm256_setzero_si256(), _mm256_setzero_si256()}; }
inline IV iv_dot(IV acc, uint32_t xbytes, const int8_t* w) {
  const __m256i x = _mm256_set1_epi32(static_cast<int32_t>(xbytes));
  const __m256i ones = _mm256_set1_epi16(1);
  const __m256i wl = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
  const __m256i wh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 32));
  return {_mm256_add_epi32(acc.lo, _mm256_madd_epi16(_mm256_maddubs_epi16(x, wl), ones)),
          _mm256_add_epi32(acc.hi, _mm256_madd_epi16(_mm256_maddubs_epi16(x, wh), ones))};
}
inline FV fv_zero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
inline FV fv_from(IV v) { return {_mm256_cvtepi32_ps(v.lo), _mm256_cvtepi32_ps(v.hi)}; }
inline FV fv_load(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
inline FV fv_set1(float v) { return {_mm256_set1_ps(v), _mm256_set1_ps(v)}; }
inline FV fv_mul(FV a, FV b) { return {_mm256_mul_ps(a.lo, b.lo), _mm256_mul_ps(a.hi, b.hi)}; }
inline FV fv_sub(FV a, FV b) { return {_mm256_sub_ps(a.lo, b.lo), _mm256_sub_ps(a.hi, b.hi)}; }
inline FV fv_add(FV a, FV b) { return {_mm256_add_ps(a.lo, b.lo), _mm256_add_ps(a.hi, b.hi)}; }
inline FV fv_min(FV a, FV b) { return {_mm256_min_ps(a.lo, b.lo), _mm256_min_ps(a.hi, b.hi)}; }
inline FV fv_max(FV a, FV b) { return {_mm256_max_ps(a.lo, b.lo), _mm256_max_ps(a.hi, b.hi)}; }
inline float fv_hmin(FV v) {
  alignas(32) float t[8];
  _mm256_store_ps(t, _mm256_min_ps(v.lo, v.hi));
  return std::min({t[0], t[1], t[2], t[3], t[4], t[5], t[6], t[7]});
}
inline float fv_hmax(FV v) {
  alignas(32) float t[8];
  _mm256_store_ps(t, _mm256_max_ps(v.lo, v.hi));
  return std::max({t[0], t[1], t[2], t[3], t[4], t[5], t[6], t[7]});
}
inline void fv_store(float* p, FV v, int nv) {
  if (nv == kGroupBlockN) {
    _mm256_storeu_ps(p, v.lo);
    _mm256_storeu_ps(p + 8, v.hi);
    return;
  }
  alignas(32) float t[kGroupBlockN];
  _mm256_store_ps(t, v.lo);
  _mm256_store_ps(t + 8, v.hi);
  std::memcpy(p, t, sizeof(float) * nv);
}
#else
#define GQ_ISA portable
struct IV {
  int32_t v[kGroupBlockN];
};
struct FV {
  float v[kGroupBlockN];
};
inline IV iv_zero() { return IV{}; }
inline IV iv_dot(IV acc, uint32_t xbytes, const int8_t* w) {
  uint8_t x[4];
  std::memcpy(x, &xbytes, 4);
  for (int i = 0; i < kGroupBlockN; ++i)
    for (int j = 0; j < 4; ++j) acc.v[i] += static_cast<int32_t>(x[j]) * w[4 * i + j];
  return acc;
}
inline FV fv_zero() { return FV{}; }
inline FV fv_from(IV v) {
  FV r;
  for (int i = 0; i < kGroupBlockN; ++i) r.v[i] = static_cast<float>(v.v[i]);
  return r;
}
inline FV fv_load(const float* p) {
  FV r;
  std::memcpy(r.v, p, sizeof(r.v));
  return r;
}
inline FV fv_set1(float s) {
  FV r;
  for (float& e : r.v) e = s;
  return r;
}
inline FV fv_mul(FV a, FV b) {
  for (int i = 0; i < kGroupBlockN; ++i) a.v[i] = a.v[i] * b.v[i];
  return a;
}
inline FV fv_sub(FV a, FV b) {
  for (int i = 0; i < kGroupBlockN; ++i) a.v[i] = a.v[i] - b.v[i];
  return a;
}
inline FV fv_add(FV a, FV b) {
  for (int i = 0; i < kGroupBlockN; ++i) a.v[i] = a.v[i] + b.v[i];
  return a;
}
inline FV fv_min(FV a, FV b) {
  for (int i = 0; i < kGroupBlockN; ++i) a.v[i] = std::min(a.v[i], b.v[i]);
  return a;
}
inline FV fv_max(FV a, FV b) {
  for (int i = 0; i < kGroupBlockN; ++i) a.v[i] = std::max(a.v[i], b.v[i]);
  return a;
}
inline float fv_hmin(FV v) { return *std::min_element(v.v, v.v + kGroupBlockN); }
inline float fv_hmax(FV v) { return *std::max_element(v.v, v.v + kGroupBlockN); }
inline void fv_store(float* p, FV v, int nv) { std::memcpy(p, v.v, sizeof(float) * nv); }
#endif

// Rows [m0, m0 + M) times the 16 channels of block b.
template <int M>
inline void tile(const GroupInt8Problem& p, int64_t m0, int64_t b) {
  const int64_t k4 = p.k / 4, g4 = p.group / 4, groups = p.k / p.group;
  const int64_t act_cols = p.k / p.act_groups, w_cols = p.k / p.w_groups;
  const int8_t* wb = p.w + b * k4 * 64;
  const int64_t col = b * kGroupBlockN;
  FV y[M];
  for (int j = 0; j < M; ++j) y[j] = fv_zero();
  for (int64_t g = 0; g < groups; ++g) {
    IV acc[M];
    for (int j = 0; j < M; ++j) acc[j] = iv_zero();
    for (int64_t q = g * g4; q < (g + 1) * g4; ++q) {
      const int8_t* w = wb + q * 64;
      for (int j = 0; j < M; ++j) acc[j] = iv_dot(acc[j], load4(p.a + (m0 + j) * p.a_stride + 4 * q), w);
    }
    const FV r = fv_load(p.rs + g * p.n_pad + col);
    const int64_t ga = g * p.group / act_cols;
    const FV ws = p.w_groups > 1 ? fv_load(p.ws + (g * p.group / w_cols) * p.n_pad + col) : fv_zero();
    for (int j = 0; j < M; ++j) {
      const int64_t at = (m0 + j) * p.act_groups + ga;
      const FV zr = fv_mul(fv_set1(p.zx[at]), r);
      FV part = fv_mul(fv_set1(p.sx[at]), fv_sub(fv_from(acc[j]), zr));
      if (p.w_groups > 1) part = fv_mul(part, ws);
      y[j] = fv_add(y[j], part);
    }
  }
  const int nv = static_cast<int>(std::min<int64_t>(kGroupBlockN, p.n - col));
  for (int j = 0; j < M; ++j) {
    if (p.w_groups == 1) y[j] = fv_mul(y[j], fv_load(p.ws + col));
    fv_store(p.y + (m0 + j) * p.y_stride + col, y[j], nv);
  }
}

// Round to the nearest integer, ties to even (torch.round), for |v| < 2^22: adding and subtracting
// 1.5 * 2^23 leaves no fraction bits in the default rounding mode, and the loop vectorizes.
inline float round_half_even(float v) {
  constexpr float kMagic = 12582912.f;
  return (v + kMagic) - kMagic;
}

// Rows per chunk: a chunk's activation codes stay in L2 while each weight block (16 x k bytes, in
// L1) serves all of its rows. Rows per tile: independent dot-product chains, enough to cover the
// latency of vpdpbusd (5 cycles) with 32 registers; AVX2's 16 hold half as many.
constexpr int64_t kChunkRows = 64;
#if defined(__AVX512VNNI__) || defined(GQ_ISA_AVX512)
constexpr int kTileRows = 8;
#else
constexpr int kTileRows = 4;
#endif

}  // namespace

#define GQ_CAT2(a, b, c) a##b##c
#define GQ_CAT(a, b, c) GQ_CAT2(a, b, c)

extern "C" void GQ_CAT(gq_cpu_, GQ_ISA, _group_int8)(const gq_cpu::GroupInt8Problem* p, int64_t b0, int64_t b1) {
  for (int64_t c0 = 0; c0 < p->m; c0 += kChunkRows) {
    const int64_t c1 = std::min(p->m, c0 + kChunkRows);
    for (int64_t b = b0; b < b1; ++b) {
      int64_t m = c0;
      for (; m + kTileRows <= c1; m += kTileRows) tile<kTileRows>(*p, m, b);
      if (c1 - m >= 4) {
        tile<4>(*p, m, b);
        m += 4;
      }
      switch (c1 - m) {
        case 3: tile<3>(*p, m, b); break;
        case 2: tile<2>(*p, m, b); break;
        case 1: tile<1>(*p, m, b); break;
        default: break;
      }
    }
  }
}

extern "C" void GQ_CAT(gq_cpu_, GQ_ISA, _act_codes)(const float* x, int64_t gs, int64_t i0, int64_t i1, int bits,
                                                    float clip, uint8_t* q, float* scale, float* zero) {
  const float maxq = static_cast<float>((1 << bits) - 1);
  for (int64_t i = i0; i < i1; ++i) {
    const float* v = x + i * gs;
    FV vlo = fv_zero(), vhi = fv_zero();  // the range always holds 0
    int64_t j = 0;
    for (; j + kGroupBlockN <= gs; j += kGroupBlockN) {
      const FV e = fv_load(v + j);
      vlo = fv_min(vlo, e);
      vhi = fv_max(vhi, e);
    }
    float lo = fv_hmin(vlo), hi = fv_hmax(vhi);
    for (; j < gs; ++j) {
      lo = std::min(lo, v[j]);
      hi = std::max(hi, v[j]);
    }
    lo *= clip;
    hi *= clip;
    float s = (hi - lo) / maxq;
    if (!(s > 0.f)) s = 1.f;
    const float z = round_half_even(-lo / s);
    uint8_t* out = q + i * gs;
    for (j = 0; j < gs; ++j) {
      // clamped before rounding (the same codes: the bounds are whole numbers) so the trick holds
      const float r = round_half_even(std::clamp(v[j] / s, -2.f * maxq, 2.f * maxq)) + z;
      out[j] = static_cast<uint8_t>(std::clamp(r, 0.f, maxq));
    }
    scale[i] = s;
    zero[i] = z;
  }
}
