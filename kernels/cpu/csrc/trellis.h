// Bitshift-trellis tiles on the CPU (the `trellis` format; its layout and specification are
// gq_kernels/trellis/reference.py): the problem shared by the ISA variants (trellis_isa.cpp, compiled
// once per instruction set) and the torch operators (ops.cpp). The variants multiply by W_code, the
// decoded values in the rotated basis; the Hadamard transforms, signs and scale are the caller's.
// No torch dependency.
#pragma once

#include <cstdint>

namespace gq_cpu {

constexpr int kTrellisTile = 16;      // a tile is 16 x 16 weights, row-major
constexpr int kTrellisMaxRows = 8;    // activation rows one GEMV pass serves

// How a state becomes values (gq_kernels/trellis/codes.py); every code can also be read from `table`.
enum TrellisCode : int32_t { kCodeTable = 0, kCodeHyb = 1, kCode1mad = 2, kCode3inst = 3 };

struct TrellisProblem {
  const float* x;  // m rows of k fp32 values (already in the rotated basis), row r at x + r * x_stride
  int64_t x_stride;
  int64_t m;
  int64_t k;  // input columns, a multiple of 16
  int64_t n;  // output rows, a multiple of 16
  // Tile (i, j) (output rows 16i.., input columns 16j..): words_per_tile uint16 words at
  // words + (i * k / 16 + j) * words_per_tile, one circular MSB-first stream; state t is the
  // 16-bit window at bit t * kV and holds values V t .. V t + V - 1 of the tile.
  const uint16_t* words;
  int32_t words_per_tile;
  int32_t kV;
  int32_t V;             // 1 or 2
  int32_t code;          // TrellisCode
  const float* table;    // [65536, V]: the values of every state (any code)
  const uint32_t* tlut;  // kCodeHyb only, else null: [512] fp16 pairs, value 0 in the low half
  float* y;  // m rows of n fp32 values, row r at y + r * y_stride
  int64_t y_stride;
};

}  // namespace gq_cpu

// gemv:    y[r, i] = sum_c x[r, c] W_code[i, c] for the output rows of tile rows [t0, t1), every r < m <= 8.
// dequant: out[(i - 16 t0) * out_stride + c] = W_code[i, c] for the same rows, c < k.
#define GQ_CPU_DECLARE_TRELLIS(isa)                                                                          \
  extern "C" void gq_cpu_##isa##_trellis_gemv(const gq_cpu::TrellisProblem* p, int64_t t0, int64_t t1);     \
  extern "C" void gq_cpu_##isa##_trellis_dequant(const gq_cpu::TrellisProblem* p, int64_t t0, int64_t t1, \
                                                  float* out, int64_t out_stride);
