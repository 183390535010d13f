// Bit-plane codes times int8 activations (csrc/bitplane.h: Q8Problem), AVX-512 with VBMI and VNNI
// (compiled with -mavx512vbmi -mavx512vnni; ops.cpp calls it only where the CPU has both).
//
// Per 64 columns: the bits planes' 64-bit words are byte masks that build each column's code
// (one masked byte add per plane), one byte permute turns codes into the row's uint8 values, and
// one VNNI dot product multiplies them with 64 int8 activations into 16 int32 lanes: a quarter of
// the multiply instructions of the fp32 kernel (bitplane_isa.cpp, one FMA per 16 weights) and half
// its permutes. The block's int32 sums are exact; each block adds them, scaled by its activation
// scale, to fp32 lanes.
#include <immintrin.h>

#include <cstring>

#include "bitplane.h"

namespace {

using gq_cpu::Q8Problem;

template <bool HALF>
inline __mmask64 mask_at(const int32_t* p) {
  // The 64 columns' bits of one plane: two consecutive words, or (HALF) the row's last word alone.
  if constexpr (HALF) {
    return static_cast<__mmask64>(static_cast<uint32_t>(*p));
  } else {
    uint64_t v;
    std::memcpy(&v, p, 8);
    return static_cast<__mmask64>(v);
  }
}

// The uint8 values of the 64 columns whose codes start at q (plane 0; plane b at q + b * plane).
template <int BITS, bool HALF>
inline __m512i values(const int32_t* q, int64_t plane, __m512i table) {
  __m512i idx = _mm512_maskz_mov_epi8(mask_at<HALF>(q), _mm512_set1_epi8(1));
  if constexpr (BITS > 1) idx = _mm512_mask_add_epi8(idx, mask_at<HALF>(q + plane), idx, _mm512_set1_epi8(2));
  if constexpr (BITS > 2) idx = _mm512_mask_add_epi8(idx, mask_at<HALF>(q + 2 * plane), idx, _mm512_set1_epi8(4));
  if constexpr (BITS > 3) idx = _mm512_mask_add_epi8(idx, mask_at<HALF>(q + 3 * plane), idx, _mm512_set1_epi8(8));
  return _mm512_permutexvar_epi8(idx, table);
}

template <int M>
struct Rows {
  const int8_t* x[M];
  const float* s[M];
  Rows(const Q8Problem& p) {
    for (int r = 0; r < M; ++r) x[r] = p.xq + r * p.xq_stride, s[r] = p.xscale + r * p.blocks;
  }
  // acc[r] += xscale[r, b] * (w . xq[r, block b]) for every row r.
  inline void add(__m512 (&acc)[M], __m512i w, int64_t b) const {
    for (int r = 0; r < M; ++r) {
      const __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w, _mm512_loadu_si512(x[r] + b * gq_cpu::kQ8Block));
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_set1_ps(s[r][b]), acc[r]);
    }
  }
};

constexpr int64_t kAhead = 16;  // rows

template <int BITS, int M>
void gemv_rows(const Q8Problem& p, int64_t n0, int64_t n1) {
  const int64_t plane = p.n * p.words;
  const int64_t full = p.words / 2;  // blocks of two words; an odd last word is a half block
  const Rows<M> rows(p);
  const int64_t row_bytes = p.words * 4;
  for (int64_t i = n0; i < n1; ++i) {
    const int32_t* q = p.qweight + i * p.words;
    // 16 bytes per row; vpermb reads only bytes 0..15 for codes < 16, the rest of the register is unused.
    const __m512i table = _mm512_castsi128_si512(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p.table + i * 16)));
    if (i + kAhead < n1) {
      // The planes are BITS streams a row's few cache lines long each: ask for row i + kAhead's
      // lines now (the hardware prefetcher needs several lines of a stream before it starts, and
      // each matrix of a decode step is only tens of KB).
      const char* next = reinterpret_cast<const char*>(q + kAhead * p.words);
      for (int b = 0; b < BITS; ++b)
        for (int64_t off = 0; off < row_bytes; off += 64) _mm_prefetch(next + b * plane * 4 + off, _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(p.table + (i + kAhead) * 16), _MM_HINT_T0);
    }
    // Two sets of accumulators, even and odd blocks: independent FMA chains when rows are few.
    __m512 even[M], odd[M];
    for (int r = 0; r < M; ++r) even[r] = odd[r] = _mm512_setzero_ps();
    int64_t b = 0;
    for (; b + 2 <= full; b += 2) {
      rows.add(even, values<BITS, false>(q + 2 * b, plane, table), b);
      rows.add(odd, values<BITS, false>(q + 2 * b + 2, plane, table), b + 1);
    }
    if (b < full) rows.add(even, values<BITS, false>(q + 2 * b, plane, table), b), ++b;
    if (p.words % 2) rows.add(odd, values<BITS, true>(q + 2 * b, plane, table), b);
    for (int r = 0; r < M; ++r)
      p.y[r * p.y_stride + i] = p.tscale[i] * _mm512_reduce_add_ps(_mm512_add_ps(even[r], odd[r])) + p.tmin[i] * p.xsum[r];
  }
}

// Dense uint8 rows: the same sums with each block's 64 values loaded as they are.
template <int M>
void gemv_dense(const Q8Problem& p, int64_t n0, int64_t n1) {
  const Rows<M> rows(p);
  const int64_t width = p.blocks * gq_cpu::kQ8Block;
  for (int64_t i = n0; i < n1; ++i) {
    const uint8_t* u = p.dense + i * width;
    __m512 even[M], odd[M];
    for (int r = 0; r < M; ++r) even[r] = odd[r] = _mm512_setzero_ps();
    int64_t b = 0;
    for (; b + 2 <= p.blocks; b += 2) {
      rows.add(even, _mm512_loadu_si512(u + b * gq_cpu::kQ8Block), b);
      rows.add(odd, _mm512_loadu_si512(u + (b + 1) * gq_cpu::kQ8Block), b + 1);
    }
    if (b < p.blocks) rows.add(even, _mm512_loadu_si512(u + b * gq_cpu::kQ8Block), b);
    for (int r = 0; r < M; ++r)
      p.y[r * p.y_stride + i] = p.tscale[i] * _mm512_reduce_add_ps(_mm512_add_ps(even[r], odd[r])) + p.tmin[i] * p.xsum[r];
  }
}

template <int BITS>
void gemv_m(const Q8Problem& p, int64_t n0, int64_t n1) {
  switch (p.m) {
    case 1: return gemv_rows<BITS, 1>(p, n0, n1);
    case 2: return gemv_rows<BITS, 2>(p, n0, n1);
    case 3: return gemv_rows<BITS, 3>(p, n0, n1);
    case 4: return gemv_rows<BITS, 4>(p, n0, n1);
    case 5: return gemv_rows<BITS, 5>(p, n0, n1);
    case 6: return gemv_rows<BITS, 6>(p, n0, n1);
    case 7: return gemv_rows<BITS, 7>(p, n0, n1);
    case 8: return gemv_rows<BITS, 8>(p, n0, n1);
    default: return;  // ops.cpp checks 1 <= m <= kMaxRows
  }
}

}  // namespace

extern "C" void gq_cpu_avx512vnni_q8_gemv(const gq_cpu::Q8Problem* p, int64_t n0, int64_t n1) {
  if (p->dense != nullptr) {
    switch (p->m) {
      case 1: return gemv_dense<1>(*p, n0, n1);
      case 2: return gemv_dense<2>(*p, n0, n1);
      case 3: return gemv_dense<3>(*p, n0, n1);
      case 4: return gemv_dense<4>(*p, n0, n1);
      case 5: return gemv_dense<5>(*p, n0, n1);
      case 6: return gemv_dense<6>(*p, n0, n1);
      case 7: return gemv_dense<7>(*p, n0, n1);
      case 8: return gemv_dense<8>(*p, n0, n1);
      default: return;
    }
  }
  switch (p->bits) {
    case 1: return gemv_m<1>(*p, n0, n1);
    case 2: return gemv_m<2>(*p, n0, n1);
    case 3: return gemv_m<3>(*p, n0, n1);
    case 4: return gemv_m<4>(*p, n0, n1);
    default: return;
  }
}
