// Unsigned activation codes times signed weight codes with an integer dot product per group of
// columns, then a float epilogue per group (the w4a4 format's integer GEMM, gq_kernels.w4a4.cpu):
//
//   y[m, n] = sum_g  sx[m, ga(g)] * (acc_g[m, n] - zx[m, ga(g)] * rs[g, n])  [* ws[gw(g), n]]
//             [* ws[0, n] once at the end, when the weights have one scale per row]
//   acc_g[m, n] = sum_{k in group g} a[m, k] * w[n, k]   (int32, exact)
//
// in exactly that order of fp32 operations, so the result equals gq_kernels.w4a4.ops.quantized_matmul
// bit for bit. Shared by the ISA variants (groupint8_isa.cpp) and the torch operator (ops.cpp).
// No torch dependency.
#pragma once

#include <cstdint>

namespace gq_cpu {

// Output channels per block of the packed weights: one 512-bit register of int32 accumulators.
constexpr int kGroupBlockN = 16;

struct GroupInt8Problem {
  const uint8_t* a;  // m rows of k activation codes (< 256), row r at a + r * a_stride
  int64_t a_stride;
  int64_t m;
  int64_t k;      // input columns, a multiple of 4
  int64_t n;      // output channels (the last block may be partial)
  int64_t n_pad;  // n rounded up to kGroupBlockN
  // Weight codes in [-64, 64] (w4a4: [-8, 7]; beyond, the AVX2 / AVX-512 BW variants' int16 pair sums
  // of vpmaddubsw saturate) packed for 4-byte dot products:
  // [n_pad / 16][k / 4][16][4], element (n, c) at ((n / 16) * (k / 4) + c / 4) * 64 + (n % 16) * 4 + c % 4.
  const int8_t* w;
  int64_t group;        // columns per GEMM group (divides k and the activation / weight groups; % 4 == 0)
  const float* sx;      // [m, act_groups] activation scales
  const float* zx;      // [m, act_groups] activation zero points (integer-valued)
  int64_t act_groups;   // activation groups per row (k / act_groups columns each)
  const float* rs;      // [k / group, n_pad] the weight codes' sum over each GEMM group
  const float* ws;      // [w_groups, n_pad] weight scales
  int64_t w_groups;     // 1: one scale per row, applied after the sum; else one per group, inside it
  float* y;             // m rows of n fp32 values, row r at y + r * y_stride
  int64_t y_stride;
};

}  // namespace gq_cpu

// Rows [0, m) times output blocks [b0, b1) (16 channels each); and the activation codes of groups
// [i0, i1) of gs consecutive fp32 values of x, exactly gq_kernels.w4a4.reference.quantize_act:
// lo = min(min x, 0) * clip, hi = max(max x, 0) * clip, s = (hi - lo) / (2^bits - 1) (1 where that
// is 0), z = round(-lo / s), q = clamp(round(x / s) + z, 0, 2^bits - 1), ties to even.
#define GQ_CPU_DECLARE_GROUP_INT8(isa)                                                                        \
  extern "C" void gq_cpu_##isa##_group_int8(const gq_cpu::GroupInt8Problem* p, int64_t b0, int64_t b1);    \
  extern "C" void gq_cpu_##isa##_act_codes(const float* x, int64_t gs, int64_t i0, int64_t i1, int bits,  \
                                           float clip, uint8_t* q, float* scale, float* zero);
