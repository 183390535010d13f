// Bit-plane GEMV and row dequantization for one instruction set, chosen at compile time:
//   -DGQ_ISA_AVX512 (with -mavx512f -mavx512bw -mavx512vl -mavx512dq -mfma -mf16c),
//   -DGQ_ISA_AVX2   (with -mavx2 -mfma -mf16c),
//   neither: portable C++ (the target's baseline; auto-vectorized where the compiler can).
// The build (gq_kernels/cpu/build.py) compiles this file once per variant into one library; the
// torch operators (ops.cpp) call a variant only after the CPU was seen to support it.
//
// Every variant computes the same thing in the same order per output element: the input columns
// in chunks of VW lanes, one fp32 accumulator lane per (activation row, lane), FMA per chunk, a
// fixed-order horizontal sum at the end. It differs from the reference (x @ W_hat.T with fp32
// accumulation) only in summation order. Compile with -ffp-contract=off: weight values are
// fl(fl(s * q) + o) exactly as the reference computes them; the only FMAs are the explicit ones.
#include "bitplane.h"

#include <cstring>
#include <type_traits>
#include <utility>

#if defined(GQ_ISA_AVX512) || defined(GQ_ISA_AVX2)
#include <immintrin.h>
#endif

namespace {

using gq_cpu::Problem;

// ------------------------------------------------------------------ scalar helpers (every ISA)
inline uint32_t f2u(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float u2f(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// IEEE half (bits) -> float, exact for every value (subnormals, inf, nan).
inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t e = (h >> 10) & 0x1Fu, m = h & 0x3FFu;
  if (e == 0) {
    const float v = static_cast<float>(m) * u2f(0x33800000u);  // m * 2^-24, exact
    return u2f(f2u(v) | sign);
  }
  if (e == 31) return u2f(sign | 0x7F800000u | (m << 13));
  return u2f(sign | ((e + 112) << 23) | (m << 13));
}

// float -> nearest half (ties to even), as a float again.
inline float round_fp16(float f) {
  const uint32_t x = f2u(f);
  const uint32_t sign = (x >> 16) & 0x8000u;
  uint32_t ax = x & 0x7FFFFFFFu;
  uint16_t h;
  if (ax >= 0x7F800000u) {
    h = static_cast<uint16_t>(sign | 0x7C00u | (ax > 0x7F800000u ? 0x200u : 0u));
  } else if (ax >= 0x477FF000u) {  // >= 65520: rounds to infinity
    h = static_cast<uint16_t>(sign | 0x7C00u);
  } else if (ax < 0x38800000u) {  // below 2^-14: a subnormal half (or zero)
    // Adding 0.5 (ulp 2^-24) rounds to a multiple of 2^-24, ties to even, in the FPU.
    const float r = u2f(ax) + 0.5f;
    h = static_cast<uint16_t>(sign | (f2u(r) - 0x3F000000u));
  } else {
    const uint32_t odd = (ax >> 13) & 1u;
    ax += 0xC8000FFFu + odd;  // exponent rebias (-112 << 23) and rounding at bit 13
    h = static_cast<uint16_t>(sign | (ax >> 13));
  }
  return half_to_float(h);
}

// float -> nearest bfloat16 (ties to even), as a float again.
inline float round_bf16(float f) {
  const uint32_t x = f2u(f);
  if ((x & 0x7FFFFFFFu) > 0x7F800000u) return u2f((x | 0x00400000u) & 0xFFFF0000u);  // quiet nan
  return u2f((x + 0x7FFFu + ((x >> 16) & 1u)) & 0xFFFF0000u);
}

inline float round_to(float v, int32_t rounding) {
  if (rounding == gq_cpu::kBf16) return round_bf16(v);
  if (rounding == gq_cpu::kFp16) return round_fp16(v);
  return v;
}

// Weight value of an affine code, bit for bit what the reference computes (then rounded).
inline float affine_value(float s, float o, int code, int32_t rounding) {
  const float sq = s * static_cast<float>(code);
  return round_to(sq + o, rounding);
}

// ------------------------------------------------------------------ the ISA layer
// Each variant defines: VW (lanes per chunk), V (VW floats), Table (a row's table in registers),
// and the operations below. `shift` is the bit offset of the chunk's first column in its word.

#if defined(GQ_ISA_AVX512)
#define GQ_ISA avx512
constexpr int VW = 16;
using V = __m512;
struct Table {
  __m512 t;
};

inline V vzero() { return _mm512_setzero_ps(); }
inline V vload(const float* p) { return _mm512_loadu_ps(p); }
inline __mmask16 tail_mask(int nv) { return static_cast<__mmask16>((1u << nv) - 1u); }
inline V vload_part(const float* p, int nv) { return _mm512_maskz_loadu_ps(tail_mask(nv), p); }
inline V vkeep(V w, int nv) { return _mm512_maskz_mov_ps(tail_mask(nv), w); }
inline V vfma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
inline V vadd(V a, V b) { return _mm512_add_ps(a, b); }
inline void vstore(float* p, V v) { _mm512_storeu_ps(p, v); }
inline void vstore_part(float* p, V v, int nv) { _mm512_mask_storeu_ps(p, tail_mask(nv), v); }
inline float vsum(V v) {
  // Fixed order: halves, then quarters, ... (the same for every call).
  const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
  const __m128 q = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
  const __m128 e = _mm_add_ps(q, _mm_movehl_ps(q, q));
  return _mm_cvtss_f32(_mm_add_ss(e, _mm_movehdup_ps(e)));
}
inline Table table_load(const float* t, int bits) {
  return {_mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << (1 << bits)) - 1u), t)};
}
inline V round_vec(V v, int32_t rounding) {
  if (rounding == gq_cpu::kBf16) {
    const __m512i x = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(x, 16), _mm512_set1_epi32(1));
    const __m512i r = _mm512_add_epi32(_mm512_add_epi32(x, _mm512_set1_epi32(0x7FFF)), lsb);
    return _mm512_castsi512_ps(_mm512_and_si512(r, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
  }
  if (rounding == gq_cpu::kFp16)
    return _mm512_cvtph_ps(_mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  return v;
}
inline Table table_affine(float s, float o, int32_t rounding) {
  const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512 sq = _mm512_mul_ps(_mm512_set1_ps(s), iota);
  return {round_vec(_mm512_add_ps(sq, _mm512_set1_ps(o)), rounding)};
}
template <int BITS>
inline V lookup(const uint32_t* pb, int shift, const Table& tab) {
  // Each plane's 16 bits are a lane mask: code = sum_b 2^b [bit b set], then a 16-entry permute.
  __m512i idx = _mm512_maskz_mov_epi32(static_cast<__mmask16>(pb[0] >> shift), _mm512_set1_epi32(1));
  if constexpr (BITS > 1)
    idx = _mm512_mask_add_epi32(idx, static_cast<__mmask16>(pb[1] >> shift), idx, _mm512_set1_epi32(2));
  if constexpr (BITS > 2)
    idx = _mm512_mask_add_epi32(idx, static_cast<__mmask16>(pb[2] >> shift), idx, _mm512_set1_epi32(4));
  if constexpr (BITS > 3)
    idx = _mm512_mask_add_epi32(idx, static_cast<__mmask16>(pb[3] >> shift), idx, _mm512_set1_epi32(8));
  return _mm512_permutexvar_ps(idx, tab.t);
}
// The GEMV reads x in the split layout (csrc/bitplane.h: kSplit32) and decodes a whole word at once:
// the 32 bits of each plane are a 32-lane mask, so 16-bit codes of all 32 columns take one op per
// plane (no mask shifts); a 32-bit lane then holds the codes of columns 2i (low half) and 2i + 1
// (high half), and two permutes give the even and the odd columns' values.
constexpr int32_t kXLayout = gq_cpu::kSplit32;
template <int BITS>
inline void lookup_word(const uint32_t* pb, const Table& tab, V& even, V& odd) {
  __m512i idx = _mm512_maskz_mov_epi16(static_cast<__mmask32>(pb[0]), _mm512_set1_epi16(1));
  if constexpr (BITS > 1) idx = _mm512_mask_add_epi16(idx, static_cast<__mmask32>(pb[1]), idx, _mm512_set1_epi16(2));
  if constexpr (BITS > 2) idx = _mm512_mask_add_epi16(idx, static_cast<__mmask32>(pb[2]), idx, _mm512_set1_epi16(4));
  if constexpr (BITS > 3) idx = _mm512_mask_add_epi16(idx, static_cast<__mmask32>(pb[3]), idx, _mm512_set1_epi16(8));
  even = _mm512_permutexvar_ps(idx, tab.t);  // uses bits 0..3 of each 32-bit lane: column 2i
  odd = _mm512_permutexvar_ps(_mm512_srli_epi32(idx, 16), tab.t);
}
inline V vkeep_mask(V w, uint32_t mask) { return _mm512_maskz_mov_ps(static_cast<__mmask16>(mask), w); }

#elif defined(GQ_ISA_AVX2)
#define GQ_ISA avx2
constexpr int32_t kXLayout = gq_cpu::kNatural;
constexpr int VW = 8;
using V = __m256;
struct Table {
  __m256 lo, hi;  // entries 0..7, 8..15
};

inline V vzero() { return _mm256_setzero_ps(); }
inline V vload(const float* p) { return _mm256_loadu_ps(p); }
inline __m256i tail_mask(int nv) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(nv), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
inline V vload_part(const float* p, int nv) { return _mm256_maskload_ps(p, tail_mask(nv)); }
inline V vkeep(V w, int nv) { return _mm256_and_ps(w, _mm256_castsi256_ps(tail_mask(nv))); }
inline V vfma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
inline V vadd(V a, V b) { return _mm256_add_ps(a, b); }
inline void vstore(float* p, V v) { _mm256_storeu_ps(p, v); }
inline void vstore_part(float* p, V v, int nv) { _mm256_maskstore_ps(p, tail_mask(nv), v); }
inline float vsum(V v) {
  const __m128 q = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 e = _mm_add_ps(q, _mm_movehl_ps(q, q));
  return _mm_cvtss_f32(_mm_add_ss(e, _mm_movehdup_ps(e)));
}
inline Table table_load(const float* t, int bits) {
  const int n = 1 << bits;
  alignas(32) float buf[16] = {};
  for (int i = 0; i < n; ++i) buf[i] = t[i];
  return {_mm256_load_ps(buf), _mm256_load_ps(buf + 8)};
}
inline V round_vec(V v, int32_t rounding) {
  if (rounding == gq_cpu::kBf16) {
    const __m256i x = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(x, 16), _mm256_set1_epi32(1));
    const __m256i r = _mm256_add_epi32(_mm256_add_epi32(x, _mm256_set1_epi32(0x7FFF)), lsb);
    return _mm256_castsi256_ps(_mm256_and_si256(r, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
  }
  if (rounding == gq_cpu::kFp16)
    return _mm256_cvtph_ps(_mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  return v;
}
inline Table table_affine(float s, float o, int32_t rounding) {
  const __m256 sv = _mm256_set1_ps(s), ov = _mm256_set1_ps(o);
  const __m256 lo = _mm256_mul_ps(sv, _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7));
  const __m256 hi = _mm256_mul_ps(sv, _mm256_setr_ps(8, 9, 10, 11, 12, 13, 14, 15));
  return {round_vec(_mm256_add_ps(lo, ov), rounding), round_vec(_mm256_add_ps(hi, ov), rounding)};
}
template <int BITS>
inline V lookup(const uint32_t* pb, int shift, const Table& tab) {
  // The chunk's byte of each plane into one word (plane b in byte b), broadcast; lane l keeps
  // bit l of every byte (bits 0, 8, 16, 24), and one multiply gathers them into bits 21..24:
  // a + b 2^8 + c 2^16 + d 2^24 times (1 + 2^7 + 2^14 + 2^21) puts a, b, c, d at 21, 22, 23, 24
  // and every other partial product at a distinct position (no carries).
  uint32_t u = (pb[0] >> shift) & 0xFFu;
  if constexpr (BITS > 1) u |= ((pb[1] >> shift) & 0xFFu) << 8;
  if constexpr (BITS > 2) u |= ((pb[2] >> shift) & 0xFFu) << 16;
  if constexpr (BITS > 3) u |= ((pb[3] >> shift) & 0xFFu) << 24;
  __m256i v = _mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(u)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  v = _mm256_and_si256(v, _mm256_set1_epi32(0x01010101));
  v = _mm256_srli_epi32(_mm256_mullo_epi32(v, _mm256_set1_epi32(0x00204081)), 21);  // code in bits 0..3
  const __m256 lo = _mm256_permutevar8x32_ps(tab.lo, v);  // uses bits 0..2
  if constexpr (BITS < 4) {
    return lo;
  } else {
    const __m256 hi = _mm256_permutevar8x32_ps(tab.hi, v);
    return _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(v, 28)));  // bit 3 -> sign
  }
}

#else
#define GQ_ISA portable
constexpr int32_t kXLayout = gq_cpu::kNatural;
constexpr int VW = 8;
struct V {
  float v[8];
};
struct Table {
  float t[16];
};

// Byte value -> 8 bytes holding its bits 0..7 (byte i = bit i).
struct Spread {
  uint64_t s[256];
  constexpr Spread() : s() {
    for (int b = 0; b < 256; ++b) {
      uint64_t r = 0;
      for (int i = 0; i < 8; ++i) r |= static_cast<uint64_t>((b >> i) & 1) << (8 * i);
      s[b] = r;
    }
  }
};
constexpr Spread kSpread{};

inline V vzero() { return V{}; }
inline V vload(const float* p) {
  V r;
  for (int i = 0; i < 8; ++i) r.v[i] = p[i];
  return r;
}
inline V vload_part(const float* p, int nv) {
  V r{};
  for (int i = 0; i < nv; ++i) r.v[i] = p[i];
  return r;
}
inline V vkeep(V w, int nv) {
  for (int i = nv; i < 8; ++i) w.v[i] = 0.0f;
  return w;
}
inline V vfma(V a, V b, V c) {
  for (int i = 0; i < 8; ++i) c.v[i] += a.v[i] * b.v[i];
  return c;
}
inline V vadd(V a, V b) {
  for (int i = 0; i < 8; ++i) a.v[i] += b.v[i];
  return a;
}
inline void vstore(float* p, V v) {
  for (int i = 0; i < 8; ++i) p[i] = v.v[i];
}
inline void vstore_part(float* p, V v, int nv) {
  for (int i = 0; i < nv; ++i) p[i] = v.v[i];
}
inline float vsum(V v) {
  const float a = (v.v[0] + v.v[4]) + (v.v[2] + v.v[6]);
  const float b = (v.v[1] + v.v[5]) + (v.v[3] + v.v[7]);
  return a + b;
}
inline Table table_load(const float* t, int bits) {
  Table r{};
  for (int i = 0; i < (1 << bits); ++i) r.t[i] = t[i];
  return r;
}
inline Table table_affine(float s, float o, int32_t rounding) {
  Table r;
  for (int i = 0; i < 16; ++i) r.t[i] = affine_value(s, o, i, rounding);
  return r;
}
template <int BITS>
inline V lookup(const uint32_t* pb, int shift, const Table& tab) {
  uint64_t codes = 0;  // byte i = code of lane i
  for (int b = 0; b < BITS; ++b) codes |= kSpread.s[(pb[b] >> shift) & 0xFFu] << b;
  V r;
  for (int i = 0; i < 8; ++i) r.v[i] = tab.t[(codes >> (8 * i)) & 0xFFu];
  return r;
}
#endif

// ------------------------------------------------------------------ generic kernels
constexpr int kPerWord = 32 / VW;
// A block is 4 chunks (AVX-512: 2 words = 64 columns; AVX2 / portable: 1 word = 32 columns). Each
// chunk of a block has its own accumulator slot, so with few activation rows the FMA chains of
// consecutive chunks are independent (a single chain waits for the FMA latency at every chunk).
constexpr int kChunks = 4;
constexpr int kBlockCols = kChunks * VW;
constexpr int kBlockWords = kBlockCols / 32;

template <typename F, int... J>
inline void unroll_impl(F& f, std::integer_sequence<int, J...>) {
  (f(std::integral_constant<int, J>{}), ...);
}
// f(integral_constant<int, 0>), ..., f(integral_constant<int, N - 1>): a loop unrolled at compile time.
template <int N, typename F>
inline void unroll(F&& f) {
  unroll_impl(f, std::make_integer_sequence<int, N>{});
}

// Where a row's values come from: its table (kTable) or the affine table of the current group.
// ``covers(c)`` makes the table valid for column c and says whether the chunk [c, c + VW) lies in
// one group; a chunk across a group boundary is decoded lane by lane (group sizes that are not a
// multiple of VW only). ``block(c)`` says the same for a whole block.
template <int DEC>
struct RowValues {
  const Problem& p;
  int64_t row;
  Table tab{};
  int64_t g = -1, g_end = 0, gs = 1;

  RowValues(const Problem& prob, int64_t n, int bits) : p(prob), row(n) {
    if constexpr (DEC == gq_cpu::kTable) {
      tab = table_load(p.table + n * (int64_t{1} << bits), bits);
    } else {
      gs = p.group_size;
    }
  }
  bool covers(int64_t c) {
    if constexpr (DEC == gq_cpu::kTable) {
      return true;
    } else {
      if (c >= g_end) {
        g = c / gs;
        g_end = (g + 1) * gs;
        tab = table_affine(half_to_float(p.scales[row * p.groups + g]), half_to_float(p.offsets[row * p.groups + g]),
                           p.rounding);
      }
      const int64_t last = (c + VW < p.k ? c + VW : p.k) - 1;
      return last < g_end;
    }
  }
  // Makes the table valid for column c and says whether [c, min(c + width, k)) lies in one group.
  bool span(int64_t c, int64_t width) {
    if constexpr (DEC == gq_cpu::kTable) {
      return true;
    } else {
      covers(c);
      return (c + width < p.k ? c + width : p.k) - 1 < g_end;
    }
  }
  bool block(int64_t c) {
    if constexpr (DEC == gq_cpu::kTable) {
      return true;
    } else {
      covers(c);
      return c + kBlockCols <= g_end;
    }
  }
  // Lane-by-lane values of the chunk at column c (across a group boundary).
  template <int BITS>
  V slow(const uint32_t* pb, int shift, int64_t c) const {
    alignas(64) float buf[VW] = {};
    for (int l = 0; l < VW && c + l < p.k; ++l) {
      int code = 0;
      for (int b = 0; b < BITS; ++b) code |= static_cast<int>((pb[b] >> (shift + l)) & 1u) << b;
      const int64_t gl = (c + l) / gs;
      buf[l] = affine_value(half_to_float(p.scales[row * p.groups + gl]),
                            half_to_float(p.offsets[row * p.groups + gl]), code, p.rounding);
    }
    return vload(buf);
  }
};

// Calls f(slot, values, column, valid_lanes) for every VW-column chunk of output row n, in column
// order; slot (an integral_constant) is the chunk's index in its block, 0 past the last block.
template <int DEC, int BITS, typename F>
inline void walk_row(const Problem& p, int64_t n, int64_t c_begin, int64_t c_end, F&& f) {
  // columns [c_begin, c_end): c_begin a multiple of kBlockCols, c_end one too or k
  const int64_t plane = p.n * p.words;
  const int32_t* q = p.qweight + n * p.words;
  RowValues<DEC> vals(p, n, BITS);
  const int64_t blocks = (c_end - c_begin) / kBlockCols;
  uint32_t pb[kBlockWords][BITS];
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const int64_t c0 = c_begin + blk * kBlockCols, w0 = c0 / 32;
    for (int i = 0; i < kBlockWords; ++i)
      for (int b = 0; b < BITS; ++b) pb[i][b] = static_cast<uint32_t>(q[b * plane + w0 + i]);
    if (vals.block(c0)) {
      unroll<kChunks>([&](auto J) {
        constexpr int j = decltype(J)::value;
        f(J, lookup<BITS>(pb[j / kPerWord], (j % kPerWord) * VW, vals.tab), c0 + j * VW, VW);
      });
    } else {
      unroll<kChunks>([&](auto J) {
        constexpr int j = decltype(J)::value;
        const int64_t c = c0 + j * VW;
        const uint32_t* pw = pb[j / kPerWord];
        constexpr int shift = (j % kPerWord) * VW;
        f(J, vals.covers(c) ? lookup<BITS>(pw, shift, vals.tab) : vals.template slow<BITS>(pw, shift, c), c, VW);
      });
    }
  }
  uint32_t pw[BITS];
  for (int64_t c = c_begin + blocks * kBlockCols; c < c_end; c += VW) {  // the rest: < kBlockCols columns
    const int64_t w = c / 32;
    const int shift = static_cast<int>(c % 32);
    for (int b = 0; b < BITS; ++b) pw[b] = static_cast<uint32_t>(q[b * plane + w]);
    const int nv = static_cast<int>(p.k - c < VW ? p.k - c : VW);
    const V wv = vals.covers(c) ? lookup<BITS>(pw, shift, vals.tab) : vals.template slow<BITS>(pw, shift, c);
    f(std::integral_constant<int, 0>{}, nv == VW ? wv : vkeep(wv, nv), c, nv);
  }
}

template <int DEC, int BITS, int M>
void gemv_rows(const Problem& p, int64_t n0, int64_t n1) {
  constexpr int A = M >= 4 ? 1 : (M >= 2 ? 2 : 4);  // accumulators per activation row
  const float* x[M];
  for (int r = 0; r < M; ++r) x[r] = p.x + r * p.x_stride;
  for (int64_t n = n0; n < n1; ++n) {
    V acc[M][A];
    for (int r = 0; r < M; ++r)
      for (int a = 0; a < A; ++a) acc[r][a] = vzero();
    walk_row<DEC, BITS>(p, n, 0, p.k, [&](auto J, const V& wv, int64_t c, int nv) {
      constexpr int a = decltype(J)::value % A;
      if (nv == VW) {
        for (int r = 0; r < M; ++r) acc[r][a] = vfma(wv, vload(x[r] + c), acc[r][a]);
      } else {
        for (int r = 0; r < M; ++r) acc[r][a] = vfma(wv, vload_part(x[r] + c, nv), acc[r][a]);
      }
    });
    for (int r = 0; r < M; ++r) {
      V sum = acc[r][0];
      for (int a = 1; a < A; ++a) sum = vadd(sum, acc[r][a]);
      p.y[r * p.y_stride + n] = vsum(sum);
    }
  }
}

#if defined(GQ_ISA_AVX512)
// The GEMV over x in the split layout: word by word (32 columns), values of the even and the odd
// columns from lookup_word; a word across a group boundary is decoded lane by lane. With one or two
// activation rows, consecutive words use different accumulators (independent FMA chains).
template <int DEC, int BITS, int M>
void gemv_rows_split(const Problem& p, int64_t n0, int64_t n1) {
  constexpr int S = M <= 2 ? 4 : 2;  // accumulators per row: (even, odd) x (word parity when S == 4)
  const float* x[M];
  for (int r = 0; r < M; ++r) x[r] = p.x + r * p.x_stride;
  const int64_t plane = p.n * p.words;
  const int64_t full = p.k / 32;
  for (int64_t n = n0; n < n1; ++n) {
    const int32_t* q = p.qweight + n * p.words;
    RowValues<DEC> vals(p, n, BITS);
    V acc[M][S];
    for (int r = 0; r < M; ++r)
      for (int a = 0; a < S; ++a) acc[r][a] = vzero();
    auto word = [&](int64_t w, auto slot) {
      constexpr int s0 = decltype(slot)::value;
      const int64_t c = 32 * w;
      uint32_t pb[BITS];
      for (int b = 0; b < BITS; ++b) pb[b] = static_cast<uint32_t>(q[b * plane + w]);
      V even, odd;
      if (vals.span(c, 32)) {
        lookup_word<BITS>(pb, vals.tab, even, odd);
        if (w >= full) {  // the partial last word: only its first k - c columns count
          const int nv = static_cast<int>(p.k - c);
          even = vkeep_mask(even, (1u << ((nv + 1) / 2)) - 1u);
          odd = vkeep_mask(odd, (1u << (nv / 2)) - 1u);
        }
      } else {
        alignas(64) float e[16], o[16];
        const V lo = vals.template slow<BITS>(pb, 0, c), hi = vals.template slow<BITS>(pb, 16, c + 16);
        alignas(64) float nat[32];
        vstore(nat, lo);
        vstore(nat + 16, hi);
        for (int i = 0; i < 16; ++i) e[i] = nat[2 * i], o[i] = nat[2 * i + 1];
        even = vload(e);
        odd = vload(o);
      }
      for (int r = 0; r < M; ++r) {
        acc[r][s0] = vfma(even, vload(x[r] + c), acc[r][s0]);
        acc[r][s0 + 1] = vfma(odd, vload(x[r] + c + 16), acc[r][s0 + 1]);
      }
    };
    int64_t w = 0;
    if constexpr (S == 4) {
      for (; w + 2 <= p.words; w += 2) {
        word(w, std::integral_constant<int, 0>{});
        word(w + 1, std::integral_constant<int, 2>{});
      }
    }
    for (; w < p.words; ++w) word(w, std::integral_constant<int, 0>{});
    for (int r = 0; r < M; ++r) {
      V sum = acc[r][0];
      for (int a = 1; a < S; ++a) sum = vadd(sum, acc[r][a]);
      p.y[r * p.y_stride + n] = vsum(sum);
    }
  }
}
#endif

template <int DEC, int BITS>
void dequant_rows(const Problem& p, int64_t n0, int64_t n1, float* out, int64_t out_stride) {
  for (int64_t n = n0; n < n1; ++n) {
    float* o = out + (n - n0) * out_stride;
    walk_row<DEC, BITS>(p, n, 0, p.k, [&](auto, const V& wv, int64_t c, int nv) {
      if (nv == VW) vstore(o + c, wv); else vstore_part(o + c, wv, nv);
    });
  }
}

template <int DEC, int BITS, int M>
inline void gemv_any(const Problem& p, int64_t n0, int64_t n1) {
#if defined(GQ_ISA_AVX512)
  gemv_rows_split<DEC, BITS, M>(p, n0, n1);
#else
  gemv_rows<DEC, BITS, M>(p, n0, n1);
#endif
}

template <int DEC, int BITS>
void gemv_m(const Problem& p, int64_t n0, int64_t n1) {
  switch (p.m) {
    case 1: return gemv_any<DEC, BITS, 1>(p, n0, n1);
    case 2: return gemv_any<DEC, BITS, 2>(p, n0, n1);
    case 3: return gemv_any<DEC, BITS, 3>(p, n0, n1);
    case 4: return gemv_any<DEC, BITS, 4>(p, n0, n1);
    case 5: return gemv_any<DEC, BITS, 5>(p, n0, n1);
    case 6: return gemv_any<DEC, BITS, 6>(p, n0, n1);
    case 7: return gemv_any<DEC, BITS, 7>(p, n0, n1);
    case 8: return gemv_any<DEC, BITS, 8>(p, n0, n1);
    default: return;  // ops.cpp never asks for more (it checks 1 <= m <= kMaxRows)
  }
}

template <int DEC>
void gemv_bits(const Problem& p, int64_t n0, int64_t n1) {
  switch (p.bits) {
    case 1: return gemv_m<DEC, 1>(p, n0, n1);
    case 2: return gemv_m<DEC, 2>(p, n0, n1);
    case 3: return gemv_m<DEC, 3>(p, n0, n1);
    case 4: return gemv_m<DEC, 4>(p, n0, n1);
    default: return;
  }
}

template <int DEC>
void dequant_bits(const Problem& p, int64_t n0, int64_t n1, float* out, int64_t stride) {
  switch (p.bits) {
    case 1: return dequant_rows<DEC, 1>(p, n0, n1, out, stride);
    case 2: return dequant_rows<DEC, 2>(p, n0, n1, out, stride);
    case 3: return dequant_rows<DEC, 3>(p, n0, n1, out, stride);
    case 4: return dequant_rows<DEC, 4>(p, n0, n1, out, stride);
    default: return;
  }
}

}  // namespace

#define GQ_CAT2(a, b, c) a##b##c
#define GQ_CAT(a, b, c) GQ_CAT2(a, b, c)

extern "C" void GQ_CAT(gq_cpu_, GQ_ISA, _gemv)(const gq_cpu::Problem* p, int64_t n0, int64_t n1) {
  if (p->decoder == gq_cpu::kTable) gemv_bits<gq_cpu::kTable>(*p, n0, n1);
  else gemv_bits<gq_cpu::kAffine>(*p, n0, n1);
}

extern "C" int32_t GQ_CAT(gq_cpu_, GQ_ISA, _x_layout)() { return kXLayout; }

extern "C" void GQ_CAT(gq_cpu_, GQ_ISA, _dequant)(const gq_cpu::Problem* p, int64_t n0, int64_t n1, float* out,
                                                   int64_t out_stride) {
  if (p->decoder == gq_cpu::kTable) dequant_bits<gq_cpu::kTable>(*p, n0, n1, out, out_stride);
  else dequant_bits<gq_cpu::kAffine>(*p, n0, n1, out, out_stride);
}
