// Bit-plane weights on the CPU: the problem description shared by the ISA variants
// (bitplane_isa.cpp, compiled once per instruction set) and the torch operators (ops.cpp).
//
// Weights are codes in bit planes (gq_kernels/packing.py): qweight int32 [bits, n, words], plane b
// holding bit b of the codes of 32 consecutive input columns per word, column c in word c / 32 at
// bit c % 32. A code becomes a weight value through a decoder:
//   * kTable:  one table of 2^bits fp32 values per output row (table [n, 2^bits]);
//   * kAffine: per output row and group of group_size input columns an fp16 scale s and offset o,
//              value = round(fl(fl(s * code) + o)) (fp32 multiply, then fp32 add, no FMA).
// Values are rounded to the activation dtype (kBf16, kFp16) because the reference multiplies
// x by W_hat.to(x.dtype); a kTable table comes already rounded.
// This header has no torch dependency: the ISA objects compile without torch's headers.
#pragma once

#include <cstdint>

namespace gq_cpu {

enum Decoder : int32_t { kTable = 0, kAffine = 1 };
enum Rounding : int32_t { kNone = 0, kBf16 = 1, kFp16 = 2 };
// How a variant's GEMV reads x: kNatural (row r at x + r * x_stride, k columns) or kSplit32 (per
// 32 columns the 16 even ones, then the 16 odd ones; rows of words * 32 values, zero past k).
enum XLayout : int32_t { kNatural = 0, kSplit32 = 1 };

// The widest table a variant keeps in registers: 16 fp32 values (4-bit codes).
constexpr int kMaxBits = 4;
// Activation rows one pass of the GEMV serves (one accumulator per row and lane group).
constexpr int kMaxRows = 8;

struct Problem {
  // Activations: m rows of k fp32 values, row r at x + r * x_stride.
  const float* x;
  int64_t x_stride;
  int64_t m;
  int64_t k;  // input columns
  int64_t n;  // output rows
  // Codes: int32 [bits, n, words], words = ceil(k / 32), contiguous.
  const int32_t* qweight;
  int32_t bits;
  int64_t words;
  int32_t decoder;   // Decoder
  int32_t rounding;  // Rounding (kAffine only)
  const float* table;                                   // kTable: [n, 1 << bits]
  const uint16_t* scales;                               // kAffine: fp16 bits [n, groups]
  const uint16_t* offsets;                              // kAffine: fp16 bits [n, groups]
  int64_t groups;
  int64_t group_size;  // columns per group; k when the format stores one pair per row
  // Output (GEMV): m rows of n fp32 values, row r at y + r * y_stride.
  float* y;
  int64_t y_stride;
};

}  // namespace gq_cpu

// One set of entry points per variant; gq_cpu_<isa>_... with isa in {portable, avx2, avx512}.
//   gemv:    y[r, i] = sum_c x[r, c] * W[i, c] for output rows i in [n0, n1), every row r < m <= 8.
//   dequant: out[(i - n0) * out_stride + c] = W[i, c] for i in [n0, n1), c < k.
//   x_layout: the XLayout the variant's gemv reads x in.
#define GQ_CPU_DECLARE(isa)                                                                  \
  extern "C" void gq_cpu_##isa##_gemv(const gq_cpu::Problem* p, int64_t n0, int64_t n1);     \
  extern "C" void gq_cpu_##isa##_dequant(const gq_cpu::Problem* p, int64_t n0, int64_t n1, \
                                          float* out, int64_t out_stride);                    \
  extern "C" int32_t gq_cpu_##isa##_x_layout();

// ------------------------------------------------------------------ int8 activations (q8)
// The same codes, multiplied with int8 activations (bitplane_q8_isa.cpp, AVX-512 VBMI + VNNI):
// per output row a table of 2^bits uint8 values u with W = tmin + tscale * u (the row's values
// rounded to 256 levels between its smallest and largest), x rounded per block of kQ8Block columns
// to int8 with one fp32 scale (x ~= xscale[b] * xq). Then
//   y[r, i] = tscale[i] * sum_b xscale[r, b] * sum_{c in b} u[i, c] xq[r, c] + tmin[i] * xsum[r]
// with xsum[r] = sum_b xscale[r, b] * sum_{c in b} xq[r, c]: integer products within a block.
namespace gq_cpu {

constexpr int kQ8Block = 64;  // columns per activation scale: one 512-bit register of int8

struct Q8Problem {
  // Activations: m rows of kp = blocks * kQ8Block int8 values (zero past k), row r at xq + r * xq_stride;
  // xscale [m, blocks] (row stride blocks), xsum [m].
  const int8_t* xq;
  int64_t xq_stride;
  const float* xscale;
  const float* xsum;
  int64_t blocks;
  int64_t m;
  int64_t k;
  int64_t n;
  const int32_t* qweight;  // int32 [bits, n, words], as Problem; null for dense rows
  int32_t bits;
  int64_t words;
  const uint8_t* table;  // [n, 16]: entry e of row i at table[i * 16 + e], e < 2^bits
  // Dense rows instead of codes (the int8 lm_head): u[i, c] at dense[i * blocks * kQ8Block + c], zero past k.
  const uint8_t* dense;
  const float* tscale;   // [n]
  const float* tmin;     // [n]
  float* y;
  int64_t y_stride;
};

}  // namespace gq_cpu

// y rows [n0, n1) of every activation row r < m <= kMaxRows.
extern "C" void gq_cpu_avx512vnni_q8_gemv(const gq_cpu::Q8Problem* p, int64_t n0, int64_t n1);
