// The trellis GEMV and dequantization (trellis.h), compiled once per instruction set:
//   -DGQ_ISA_AVX512: 16 states at a time. The words a state spans are picked with one vpermi2w from
//     the tile's stream held in two registers (at most 64 words), a variable shift cuts the window;
//     hyb states are hashed and their LUT pair gathered (one gather per 32 weights, both values of a
//     state in one 32-bit lane, already in row order); 1mad and 3inst states are computed in
//     registers (no memory access: the gather is most of hyb's time on the CPUs we measured).
//   -DGQ_ISA_AVX2: 8 states at a time; each lane's two words come from one 32-bit gather, the codes are
//     computed as in the AVX-512 path (hyb: one LUT gather per 16 weights).
//   otherwise (portable): one state at a time from the state table; the compiler vectorizes the dot
//     products.
// A tile is decoded once per call and multiplied with every activation row.
#include "trellis.h"

#if defined(GQ_ISA_AVX512)
#include <immintrin.h>
#define GQ_ISA avx512
#elif defined(GQ_ISA_AVX2)
#include <immintrin.h>
#define GQ_ISA avx2
#else
#define GQ_ISA portable
#endif

namespace {

using gq_cpu::TrellisProblem;
constexpr int kT = gq_cpu::kTrellisTile;

#if defined(GQ_ISA_AVX512)
// Per group of 16 states (2 rows of the tile at V = 2, 1 row at V = 1): which words each state spans and the shift.
struct Windows {
  int groups;
  __m512i perm[16];
  __m512i shift[16];
};

Windows windows(int kV, int V, int W) {
  Windows g{};
  g.groups = kT * kT / V / 16;
  for (int b = 0; b < g.groups; b++) {
    alignas(64) uint16_t idx[32];
    alignas(64) uint32_t sh[16];
    for (int l = 0; l < 16; l++) {
      const int bit = (16 * b + l) * kV, w0 = bit >> 4;
      idx[2 * l] = uint16_t((w0 + 1) % W);  // low half of the lane: the next word
      idx[2 * l + 1] = uint16_t(w0);
      sh[l] = uint32_t(16 - (bit & 15));
    }
    g.perm[b] = _mm512_load_si512(idx);
    g.shift[b] = _mm512_load_si512(sh);
  }
  return g;
}

constexpr int kPrefetchTiles = 8;

inline __mmask32 first_words(int n) { return n >= 32 ? ~__mmask32(0) : (__mmask32(1) << n) - 1; }

// The tile's 16 rows into rows[16] (V = 2 needs the LUT: ops.cpp checks it is given).
inline void decode_tile(const TrellisProblem& p, const Windows& g, const uint16_t* w, __m512* rows) {
  const int W = p.words_per_tile;
  const __m512i lo = _mm512_maskz_loadu_epi16(first_words(W), w);
  const __m512i hi = W > 32 ? _mm512_maskz_loadu_epi16(first_words(W - 32), w + 32) : _mm512_setzero_si512();
  const __m512i low16 = _mm512_set1_epi32(0xFFFF);
  for (int b = 0; b < g.groups; b++) {
    const __m512i pair = _mm512_permutex2var_epi16(lo, g.perm[b], hi);
    const __m512i s = _mm512_and_si512(_mm512_srlv_epi32(pair, g.shift[b]), low16);
    if (p.code == gq_cpu::kCodeHyb) {  // h = s (s + 1); LUT entry (h >> 6) & 511, value 0 negated by bit 15 of h
      const __m512i h = _mm512_mullo_epi32(s, _mm512_add_epi32(s, _mm512_set1_epi32(1)));
      const __m512i i = _mm512_and_si512(_mm512_srli_epi32(h, 6), _mm512_set1_epi32(511));
      __m512i v = _mm512_i32gather_epi32(i, p.tlut, 4);
      v = _mm512_xor_si512(v, _mm512_and_si512(h, _mm512_set1_epi32(0x8000)));
      rows[2 * b] = _mm512_cvtph_ps(_mm512_castsi512_si256(v));
      rows[2 * b + 1] = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(v, 1));
    } else if (p.code == gq_cpu::kCode1mad) {  // (sum of the bytes of 34038481 s + 76625530 - 510) / 147.8...
      const __m512i x = _mm512_add_epi32(_mm512_mullo_epi32(s, _mm512_set1_epi32(34038481)),
                                         _mm512_set1_epi32(76625530));
      const __m512i m = _mm512_set1_epi32(0x00FF00FF);
      const __m512i t = _mm512_add_epi32(_mm512_and_si512(x, m), _mm512_and_si512(_mm512_srli_epi32(x, 8), m));
      const __m512i sum = _mm512_add_epi32(_mm512_and_si512(t, low16), _mm512_srli_epi32(t, 16));
      rows[b] = _mm512_div_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(sum, _mm512_set1_epi32(510))),
                              _mm512_set1_ps(147.800537109375f));
    } else if (p.code == gq_cpu::kCode3inst) {  // the two fp16 halves of y added in fp16
      const __m512i x = _mm512_add_epi32(_mm512_mullo_epi32(s, _mm512_set1_epi32(89226354)),
                                         _mm512_set1_epi32(64248484));
      const __m512i y = _mm512_xor_si512(_mm512_and_si512(x, _mm512_set1_epi32(int(0x8FFF8FFFu))),
                                         _mm512_set1_epi32(0x3B603B60));
      const __m512 sum = _mm512_add_ps(_mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(y, 16))),
                                       _mm512_cvtph_ps(_mm512_cvtepi32_epi16(y)));
      rows[b] = _mm512_cvtph_ps(_mm512_cvtps_ph(sum, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    } else if (p.V == 1) {
      rows[b] = _mm512_i32gather_ps(s, p.table, 4);
    } else {  // two table values per state, interleaved back into row order
      const __m512i s2 = _mm512_add_epi32(s, s);
      const __m512 v0 = _mm512_i32gather_ps(s2, p.table, 4);
      const __m512 v1 = _mm512_i32gather_ps(_mm512_add_epi32(s2, _mm512_set1_epi32(1)), p.table, 4);
      const __m512i first = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
      rows[2 * b] = _mm512_permutex2var_ps(v0, first, v1);
      rows[2 * b + 1] = _mm512_permutex2var_ps(v0, _mm512_add_epi32(first, _mm512_set1_epi32(8)), v1);
    }
  }
}

template <int R>
void gemv_rows(const TrellisProblem& p, int64_t t0, int64_t t1) {
  const Windows g = windows(p.kV, p.V, p.words_per_tile);
  const int64_t kt = p.k / kT;
  for (int64_t ti = t0; ti < t1; ti++) {
    __m512 acc[R][kT];
    for (int r = 0; r < R; r++)
      for (int i = 0; i < kT; i++) acc[r][i] = _mm512_setzero_ps();
    for (int64_t tj = 0; tj < kt; tj++) {
      const uint16_t* w = p.words + (ti * kt + tj) * p.words_per_tile;
      // The stream is read once, in order, a few cache lines per 200-cycle tile: too slowly for the
      // hardware prefetcher to run ahead (measured: 4-bit tiles took twice the 2-bit time, cold).
      const char* ahead = reinterpret_cast<const char*>(w + kPrefetchTiles * p.words_per_tile);
      for (int b = 0; b < p.words_per_tile * 2; b += 64) _mm_prefetch(ahead + b, _MM_HINT_T0);
      __m512 rows[kT];
      decode_tile(p, g, w, rows);
      for (int r = 0; r < R; r++) {
        const __m512 xs = _mm512_loadu_ps(p.x + r * p.x_stride + kT * tj);
        for (int i = 0; i < kT; i++) acc[r][i] = _mm512_fmadd_ps(rows[i], xs, acc[r][i]);
      }
    }
    for (int r = 0; r < R; r++)
      for (int i = 0; i < kT; i++) p.y[r * p.y_stride + kT * ti + i] = _mm512_reduce_add_ps(acc[r][i]);
  }
}

void dequant_rows(const TrellisProblem& p, int64_t t0, int64_t t1, float* out, int64_t stride) {
  const Windows g = windows(p.kV, p.V, p.words_per_tile);
  const int64_t kt = p.k / kT;
  for (int64_t ti = t0; ti < t1; ti++) {
    for (int64_t tj = 0; tj < kt; tj++) {
      const uint16_t* w = p.words + (ti * kt + tj) * p.words_per_tile;
      float* o = out + (ti - t0) * kT * stride + kT * tj;
      __m512 rows[kT];
      decode_tile(p, g, w, rows);
      for (int i = 0; i < kT; i++) _mm512_storeu_ps(o + i * stride, rows[i]);
    }
  }
}
#elif defined(GQ_ISA_AVX2)
// Per group of 8 states (one row of the tile at V = 2, half a row at V = 1): the word each state
// starts in and the right shift that cuts its window from that word and the next.
struct Windows {
  int groups;
  __m256i word[32];
  __m256i shift[32];
};

Windows windows(int kV, int V) {
  Windows g{};
  g.groups = kT * kT / V / 8;
  for (int b = 0; b < g.groups; b++) {
    alignas(32) int32_t w0[8], sh[8];
    for (int l = 0; l < 8; l++) {
      const int bit = (8 * b + l) * kV;
      w0[l] = bit >> 4;
      sh[l] = 16 - (bit & 15);
    }
    g.word[b] = _mm256_load_si256(reinterpret_cast<const __m256i*>(w0));
    g.shift[b] = _mm256_load_si256(reinterpret_cast<const __m256i*>(sh));
  }
  return g;
}

constexpr int kPrefetchTiles = 8;

// The 8 fp16 values in the high (low) halves of the 32-bit lanes of v, as floats.
inline __m256 high_halves(__m256i v) {
  const __m256i h = _mm256_srli_epi32(v, 16);
  return _mm256_cvtph_ps(_mm_packus_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1)));
}
inline __m256 low_halves(__m256i v) {
  const __m256i l = _mm256_and_si256(v, _mm256_set1_epi32(0xFFFF));
  return _mm256_cvtph_ps(_mm_packus_epi32(_mm256_castsi256_si128(l), _mm256_extracti128_si256(l, 1)));
}

// The tile's 16 rows into rows[16][2] (columns 0-7, 8-15). The stream is copied behind its first word
// (it is circular) so that one 32-bit gather at word w0 reads the words w0 and w0 + 1 of every lane.
inline void decode_tile(const TrellisProblem& p, const Windows& g, const uint16_t* w, __m256 (*rows)[2]) {
  const int W = p.words_per_tile;
  alignas(32) uint16_t buf[kT * 4 + 2];  // words_per_tile <= 16 * 16 * 4 bits / 16 = 64
  for (int i = 0; i < W; i++) buf[i] = w[i];
  buf[W] = w[0];
  const int* base = reinterpret_cast<const int*>(buf);
  const __m256i low16 = _mm256_set1_epi32(0xFFFF);
  for (int b = 0; b < g.groups; b++) {
    const __m256i v = _mm256_i32gather_epi32(base, g.word[b], 2);  // buf[w0] | buf[w0 + 1] << 16
    const __m256i pair = _mm256_or_si256(_mm256_slli_epi32(v, 16), _mm256_srli_epi32(v, 16));
    const __m256i s = _mm256_and_si256(_mm256_srlv_epi32(pair, g.shift[b]), low16);
    __m256* out = &rows[b / 2][b % 2];  // V = 1: 8 states are half a row
    if (p.code == gq_cpu::kCodeHyb) {  // as the AVX-512 path: both values of a state in one lane, row order
      const __m256i h = _mm256_mullo_epi32(s, _mm256_add_epi32(s, _mm256_set1_epi32(1)));
      const __m256i i = _mm256_and_si256(_mm256_srli_epi32(h, 6), _mm256_set1_epi32(511));
      __m256i t = _mm256_i32gather_epi32(reinterpret_cast<const int*>(p.tlut), i, 4);
      t = _mm256_xor_si256(t, _mm256_and_si256(h, _mm256_set1_epi32(0x8000)));
      rows[b][0] = _mm256_cvtph_ps(_mm256_castsi256_si128(t));
      rows[b][1] = _mm256_cvtph_ps(_mm256_extracti128_si256(t, 1));
    } else if (p.code == gq_cpu::kCode1mad) {
      const __m256i x = _mm256_add_epi32(_mm256_mullo_epi32(s, _mm256_set1_epi32(34038481)),
                                         _mm256_set1_epi32(76625530));
      const __m256i m = _mm256_set1_epi32(0x00FF00FF);
      const __m256i t = _mm256_add_epi32(_mm256_and_si256(x, m), _mm256_and_si256(_mm256_srli_epi32(x, 8), m));
      const __m256i sum = _mm256_add_epi32(_mm256_and_si256(t, low16), _mm256_srli_epi32(t, 16));
      *out = _mm256_div_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(sum, _mm256_set1_epi32(510))),
                           _mm256_set1_ps(147.800537109375f));
    } else if (p.code == gq_cpu::kCode3inst) {
      const __m256i x = _mm256_add_epi32(_mm256_mullo_epi32(s, _mm256_set1_epi32(89226354)),
                                         _mm256_set1_epi32(64248484));
      const __m256i y = _mm256_xor_si256(_mm256_and_si256(x, _mm256_set1_epi32(int(0x8FFF8FFFu))),
                                         _mm256_set1_epi32(0x3B603B60));
      const __m256 sum = _mm256_add_ps(high_halves(y), low_halves(y));
      *out = _mm256_cvtph_ps(_mm256_cvtps_ph(sum, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    } else if (p.V == 1) {
      *out = _mm256_i32gather_ps(p.table, s, 4);
    } else {  // two table values per state, interleaved back into row order
      const __m256i s2 = _mm256_add_epi32(s, s);
      const __m256 v0 = _mm256_i32gather_ps(p.table, s2, 4);
      const __m256 v1 = _mm256_i32gather_ps(p.table, _mm256_add_epi32(s2, _mm256_set1_epi32(1)), 4);
      const __m256 lo = _mm256_unpacklo_ps(v0, v1), hi = _mm256_unpackhi_ps(v0, v1);
      rows[b][0] = _mm256_permute2f128_ps(lo, hi, 0x20);
      rows[b][1] = _mm256_permute2f128_ps(lo, hi, 0x31);
    }
  }
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

template <int R>
void gemv_rows(const TrellisProblem& p, int64_t t0, int64_t t1) {
  const Windows g = windows(p.kV, p.V);
  const int64_t kt = p.k / kT;
  for (int64_t ti = t0; ti < t1; ti++) {
    __m256 acc[R][kT];
    for (int r = 0; r < R; r++)
      for (int i = 0; i < kT; i++) acc[r][i] = _mm256_setzero_ps();
    for (int64_t tj = 0; tj < kt; tj++) {
      const uint16_t* w = p.words + (ti * kt + tj) * p.words_per_tile;
      const char* ahead = reinterpret_cast<const char*>(w + kPrefetchTiles * p.words_per_tile);
      for (int b = 0; b < p.words_per_tile * 2; b += 64) _mm_prefetch(ahead + b, _MM_HINT_T0);
      __m256 rows[kT][2];
      decode_tile(p, g, w, rows);
      for (int r = 0; r < R; r++) {
        const float* x = p.x + r * p.x_stride + kT * tj;
        const __m256 x0 = _mm256_loadu_ps(x), x1 = _mm256_loadu_ps(x + 8);
        for (int i = 0; i < kT; i++) acc[r][i] = _mm256_fmadd_ps(rows[i][1], x1, _mm256_fmadd_ps(rows[i][0], x0, acc[r][i]));
      }
    }
    for (int r = 0; r < R; r++)
      for (int i = 0; i < kT; i++) p.y[r * p.y_stride + kT * ti + i] = hsum(acc[r][i]);
  }
}

void dequant_rows(const TrellisProblem& p, int64_t t0, int64_t t1, float* out, int64_t stride) {
  const Windows g = windows(p.kV, p.V);
  const int64_t kt = p.k / kT;
  for (int64_t ti = t0; ti < t1; ti++) {
    for (int64_t tj = 0; tj < kt; tj++) {
      float* o = out + (ti - t0) * kT * stride + kT * tj;
      __m256 rows[kT][2];
      decode_tile(p, g, p.words + (ti * kt + tj) * p.words_per_tile, rows);
      for (int i = 0; i < kT; i++) {
        _mm256_storeu_ps(o + i * stride, rows[i][0]);
        _mm256_storeu_ps(o + i * stride + 8, rows[i][1]);
      }
    }
  }
}
#else
inline uint32_t state_at(const uint16_t* w, int W, int bit) {
  const int w0 = bit >> 4;
  const uint32_t pair = (uint32_t(w[w0]) << 16) | w[(w0 + 1) % W];
  return (pair >> (16 - (bit & 15))) & 0xFFFF;
}

// A tile's 256 values, row-major, through the state table.
void decode_tile_table(const TrellisProblem& p, const uint16_t* w, float* out) {
  const int N = kT * kT / p.V;
  for (int t = 0; t < N; t++) {
    const uint32_t s = state_at(w, p.words_per_tile, t * p.kV);
    for (int v = 0; v < p.V; v++) out[t * p.V + v] = p.table[s * p.V + v];
  }
}

template <int R>
void gemv_rows(const TrellisProblem& p, int64_t t0, int64_t t1) {
  const int64_t kt = p.k / kT;
  float buf[kT * kT];
  for (int64_t ti = t0; ti < t1; ti++) {
    float acc[R][kT] = {};
    for (int64_t tj = 0; tj < kt; tj++) {
      decode_tile_table(p, p.words + (ti * kt + tj) * p.words_per_tile, buf);
      for (int r = 0; r < R; r++) {
        const float* xs = p.x + r * p.x_stride + kT * tj;
        for (int i = 0; i < kT; i++) {
          float s = 0.f;
          for (int c = 0; c < kT; c++) s += buf[kT * i + c] * xs[c];
          acc[r][i] += s;
        }
      }
    }
    for (int r = 0; r < R; r++)
      for (int i = 0; i < kT; i++) p.y[r * p.y_stride + kT * ti + i] = acc[r][i];
  }
}

void dequant_rows(const TrellisProblem& p, int64_t t0, int64_t t1, float* out, int64_t stride) {
  const int64_t kt = p.k / kT;
  float buf[kT * kT];
  for (int64_t ti = t0; ti < t1; ti++)
    for (int64_t tj = 0; tj < kt; tj++) {
      decode_tile_table(p, p.words + (ti * kt + tj) * p.words_per_tile, buf);
      float* o = out + (ti - t0) * kT * stride + kT * tj;
      for (int i = 0; i < kT; i++)
        for (int c = 0; c < kT; c++) o[i * stride + c] = buf[kT * i + c];
    }
}
#endif

}  // namespace

#define GQ_CAT2(a, b, c) a##b##c
#define GQ_CAT(a, b, c) GQ_CAT2(a, b, c)

extern "C" void GQ_CAT(gq_cpu_, GQ_ISA, _trellis_gemv)(const gq_cpu::TrellisProblem* p, int64_t t0, int64_t t1) {
  switch (p->m) {
    case 1: return gemv_rows<1>(*p, t0, t1);
    case 2: return gemv_rows<2>(*p, t0, t1);
    case 3: return gemv_rows<3>(*p, t0, t1);
    case 4: return gemv_rows<4>(*p, t0, t1);
    case 5: return gemv_rows<5>(*p, t0, t1);
    case 6: return gemv_rows<6>(*p, t0, t1);
    case 7: return gemv_rows<7>(*p, t0, t1);
    case 8: return gemv_rows<8>(*p, t0, t1);
    default: return;
  }
}

extern "C" void GQ_CAT(gq_cpu_, GQ_ISA, _trellis_dequant)(const gq_cpu::TrellisProblem* p, int64_t t0, int64_t t1,
                                                           float* out, int64_t out_stride) {
  dequant_rows(*p, t0, t1, out, out_stride);
}
