// Int8 weights with one fp32 scale per output row (W[i, c] = scale[i] * q[i, c]), the problem
// shared by the ISA variants (rowint8_isa.cpp, compiled once per instruction set) and the torch
// operators (ops.cpp). Used for the lm_head, the largest matrix a decode step reads
// (gq_kernels.cpu.rowint8). No torch dependency.
#pragma once

#include <cstdint>

namespace gq_cpu {

// Activation rows one GEMV pass serves; more rows take the tiled at::mm path in ops.cpp.
constexpr int kInt8MaxRows = 8;

struct Int8Problem {
  const float* x;  // m rows of k fp32 values, row r at x + r * x_stride
  int64_t x_stride;
  int64_t m;
  int64_t k;  // input columns
  int64_t n;  // output rows
  const int8_t* q;     // [n, k] contiguous
  const float* scale;  // [n]
  float* y;  // m rows of n fp32 values, row r at y + r * y_stride
  int64_t y_stride;
};

}  // namespace gq_cpu

// y[r, i] = scale[i] * sum_c x[r, c] * q[i, c] for output rows i in [n0, n1), every row r < m <= 8.
#define GQ_CPU_DECLARE_INT8(isa) \
  extern "C" void gq_cpu_##isa##_int8_gemv(const gq_cpu::Int8Problem* p, int64_t n0, int64_t n1);
