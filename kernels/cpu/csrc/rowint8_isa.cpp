// Int8 GEMV (rowint8.h) for one instruction set, chosen at compile time like bitplane_isa.cpp:
// -DGQ_ISA_AVX512, -DGQ_ISA_AVX2, or neither (portable C++).
//
// Per output element: the columns in chunks of VW lanes, an fp32 accumulator per lane, an FMA of
// the widened int8 weight with x per chunk, a horizontal sum, then one multiply by the row's
// scale. The reference (x @ (scale * q).T in fp32) rounds scale * q first: the two differ by a
// few ulps of the sum. Several output rows share each load of x (R rows at a time) so that the
// accumulator chains are independent enough to keep the FMA units busy at one activation row.
#include "rowint8.h"

#if defined(GQ_ISA_AVX512) || defined(GQ_ISA_AVX2)
#include <immintrin.h>
#endif

namespace {

using gq_cpu::Int8Problem;

#if defined(GQ_ISA_AVX512)
#define GQ_ISA avx512
constexpr int VW = 16;
using V = __m512;
inline V vzero() { return _mm512_setzero_ps(); }
inline V vfma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
inline V load_x(const float* p, int nv) {
  return nv == VW ? _mm512_loadu_ps(p) : _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << nv) - 1), p);
}
inline V load_w(const int8_t* p, int nv) {
  const __m128i b = nv == VW ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(p))
                             : _mm_maskz_loadu_epi8(static_cast<__mmask16>((1u << nv) - 1), p);
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b));
}
inline float vsum(V v) { return _mm512_reduce_add_ps(v); }
#elif defined(GQ_ISA_AVX2)
#define GQ_ISA avx2
constexpr int VW = 8;
using V = __m256;
inline V vzero() { return _mm256_setzero_ps(); }
inline V vfma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
inline V load_x(const float* p, int nv) {
  if (nv == VW) return _mm256_loadu_ps(p);
  alignas(32) float t[VW] = {};
  for (int i = 0; i < nv; ++i) t[i] = p[i];
  return _mm256_load_ps(t);
}
inline V load_w(const int8_t* p, int nv) {
  __m128i b;
  if (nv == VW) {
    b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  } else {
    alignas(16) int8_t t[16] = {};
    for (int i = 0; i < nv; ++i) t[i] = p[i];
    b = _mm_load_si128(reinterpret_cast<const __m128i*>(t));
  }
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
}
inline float vsum(V v) {
  alignas(32) float t[VW];
  _mm256_store_ps(t, v);
  return ((t[0] + t[1]) + (t[2] + t[3])) + ((t[4] + t[5]) + (t[6] + t[7]));
}
#else
#define GQ_ISA portable
constexpr int VW = 8;
struct V {
  float v[VW];
};
inline V vzero() { return V{}; }
inline V vfma(V a, V b, V c) {
  for (int i = 0; i < VW; ++i) c.v[i] += a.v[i] * b.v[i];
  return c;
}
inline V load_x(const float* p, int nv) {
  V r{};
  for (int i = 0; i < nv; ++i) r.v[i] = p[i];
  return r;
}
inline V load_w(const int8_t* p, int nv) {
  V r{};
  for (int i = 0; i < nv; ++i) r.v[i] = static_cast<float>(p[i]);
  return r;
}
inline float vsum(V v) {
  float s = 0.f;
  for (int i = 0; i < VW; ++i) s += v.v[i];
  return s;
}
#endif

// Output rows [i, i + R) for M activation rows.
template <int M, int R>
inline void block(const Int8Problem& p, int64_t i) {
  V acc[R][M];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < M; ++j) acc[r][j] = vzero();
  auto chunk = [&](int64_t c, int nv) __attribute__((always_inline)) {
    V xv[M];
    for (int j = 0; j < M; ++j) xv[j] = load_x(p.x + j * p.x_stride + c, nv);
    for (int r = 0; r < R; ++r) {
      const V w = load_w(p.q + (i + r) * p.k + c, nv);
      for (int j = 0; j < M; ++j) acc[r][j] = vfma(w, xv[j], acc[r][j]);
    }
  };
  int64_t c = 0;
  for (; c + VW <= p.k; c += VW) chunk(c, VW);  // nv a constant: the full loads, no branches
  if (c < p.k) chunk(c, static_cast<int>(p.k - c));
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < M; ++j) p.y[j * p.y_stride + i + r] = p.scale[i + r] * vsum(acc[r][j]);
}

template <int M>
void gemv_m(const Int8Problem& p, int64_t n0, int64_t n1) {
  constexpr int R = M <= 2 ? 4 : (M <= 4 ? 2 : 1);  // R * M accumulators: at most 8
  int64_t i = n0;
  for (; i + R <= n1; i += R) block<M, R>(p, i);
  for (; i < n1; ++i) block<M, 1>(p, i);
}

}  // namespace

#define GQ_CAT2(a, b, c) a##b##c
#define GQ_CAT(a, b, c) GQ_CAT2(a, b, c)

extern "C" void GQ_CAT(gq_cpu_, GQ_ISA, _int8_gemv)(const gq_cpu::Int8Problem* p, int64_t n0, int64_t n1) {
  switch (p->m) {
    case 1: return gemv_m<1>(*p, n0, n1);
    case 2: return gemv_m<2>(*p, n0, n1);
    case 3: return gemv_m<3>(*p, n0, n1);
    case 4: return gemv_m<4>(*p, n0, n1);
    case 5: return gemv_m<5>(*p, n0, n1);
    case 6: return gemv_m<6>(*p, n0, n1);
    case 7: return gemv_m<7>(*p, n0, n1);
    case 8: return gemv_m<8>(*p, n0, n1);
    default: return;
  }
}
