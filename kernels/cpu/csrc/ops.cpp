// torch operators over the bit-plane kernels (bitplane_isa.cpp), one library for every variant:
//
//   gq_cpu::bitplane_matmul(x, qweight, table?, scales?, offsets?, group_size, in_features, isa)
//       x [..., K] (fp32 / bf16 / fp16) -> [..., N] in x's dtype: x @ W_hat.to(x.dtype).T
//   gq_cpu::bitplane_dequantize(qweight, table?, scales?, offsets?, group_size, in_features,
//                               rounding, isa) -> W fp32 [N, K]
//   gq_cpu::bitplane_matmul_multi(x, qweights[], tables?[], scales?[], offsets?[], group_sizes[], in_features, isa)
//       several weights sharing x: [..., K] -> [..., N_0 + N_1 + ...] in one call
//   gq_cpu::bitplane_matmul_out(..., out), gq_cpu::bitplane_dequantize_out(..., out): the same into
//       a given fp32 [rows, N] / [N, K] tensor (tests poison it)
//   gq_cpu::built_variants() -> the isa codes compiled in (0 portable, 1 avx2, 2 avx512)
//   gq_cpu::trellis_matmul(x, words, table, tlut?, kV, code, out_features, isa) -> fp32 [..., N]:
//       x (already in the rotated basis) @ W_code.T for a bitshift-trellis weight (trellis.h)
//   gq_cpu::bitplane_q8_matmul_multi(x, qweights[], tables[], tscales[], tmins[], in_features)
//       the same codes times int8 activations (bitplane.h: Q8Problem), 1..kMaxRows rows, AVX-512
//       VBMI + VNNI only: [..., K] -> [..., N_0 + N_1 + ...]
//   gq_cpu::dense_q8_matmul(x, weight, tscale, tmin, in_features): the same with dense uint8 rows
//       [N, K padded to 64] (the int8 lm_head, gq_kernels.cpu.q8)
//   gq_cpu::quantize_q8(x) -> (xq int8 [m, blocks * 64], xscale fp32 [m, blocks], xsum fp32 [m]):
//       the activations as that kernel reads them (tests compare them with the Python reference)
//   gq_cpu::group_int8_matmul(a, sx, zx, w, rs, ws, n, group, isa) -> fp32 [M, N]: uint8 activation
//       codes times packed int8 weight codes, an int32 sum per group of columns and a float epilogue
//       (groupint8.h; the w4a4 format's integer GEMM); isa 3 is the AVX-512 VNNI unit
//   gq_cpu::quantize_act_codes(x, bits, group, clip, isa) -> (codes uint8 [M, K], scale, zero fp32 [M, G]):
//       asymmetric activation codes per row (group), gq_kernels.w4a4.reference.quantize_act exactly
//   gq_cpu::int8_matmul(x, qweight, scale, isa), gq_cpu::int8_matmul_out(..., out): int8 weights
//       [N, K] with an fp32 scale per row [N] (rowint8.h): x @ (scale * q).T, the same row split
//
// A decoder is either `table` (fp32 [N, 2^bits], one table per output row, already rounded to
// x's dtype) or `scales` + `offsets` (fp16 [N, G], w = s * q + o per group of group_size columns,
// group_size -1 for one pair per row). Up to kMaxRows activation rows run the GEMV, which reads
// only the packed codes; more rows dequantize tile by tile (at most kTileBytes of fp32 weights at a
// time) into one buffer and multiply each tile with at::mm. Output rows are split over torch's
// intra-op threads (at::parallel_for: torch.set_num_threads / gq serve --threads).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

#include "bitplane.h"
#include "groupint8.h"
#include "rowint8.h"
#include "trellis.h"

GQ_CPU_DECLARE(portable)
GQ_CPU_DECLARE_INT8(portable)
GQ_CPU_DECLARE_TRELLIS(portable)
GQ_CPU_DECLARE_GROUP_INT8(portable)
#if defined(GQ_WITH_X86)
GQ_CPU_DECLARE_GROUP_INT8(avx2)
GQ_CPU_DECLARE_GROUP_INT8(avx512)
GQ_CPU_DECLARE_GROUP_INT8(avx512vnni)
GQ_CPU_DECLARE(avx2)
GQ_CPU_DECLARE(avx512)
GQ_CPU_DECLARE_INT8(avx2)
GQ_CPU_DECLARE_INT8(avx512)
GQ_CPU_DECLARE_TRELLIS(avx2)
GQ_CPU_DECLARE_TRELLIS(avx512)
#endif

namespace {

using GemvFn = void (*)(const gq_cpu::Problem*, int64_t, int64_t);
using DequantFn = void (*)(const gq_cpu::Problem*, int64_t, int64_t, float*, int64_t);
using Int8GemvFn = void (*)(const gq_cpu::Int8Problem*, int64_t, int64_t);
using TrellisGemvFn = void (*)(const gq_cpu::TrellisProblem*, int64_t, int64_t);
using TrellisDequantFn = void (*)(const gq_cpu::TrellisProblem*, int64_t, int64_t, float*, int64_t);

constexpr int64_t kTileBytes = int64_t{4} << 20;  // bound of the dequantized tile above kMaxRows
constexpr int64_t kGrainWeights = int64_t{1} << 15;  // weights per task at least (tiny layers: one thread)

struct Variant {
  GemvFn gemv;
  DequantFn dequant;
  int32_t (*x_layout)();
  Int8GemvFn int8_gemv;
  TrellisGemvFn trellis_gemv;
  TrellisDequantFn trellis_dequant;
};

Variant variant(int64_t isa) {
  if (isa == 0)
    return {gq_cpu_portable_gemv, gq_cpu_portable_dequant, gq_cpu_portable_x_layout, gq_cpu_portable_int8_gemv,
            gq_cpu_portable_trellis_gemv, gq_cpu_portable_trellis_dequant};
#if defined(GQ_WITH_X86)
  if (isa == 1) {
    TORCH_CHECK(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"),
                "gq_cpu: the avx2 variant needs AVX2 and FMA, which this CPU lacks");
    return {gq_cpu_avx2_gemv, gq_cpu_avx2_dequant, gq_cpu_avx2_x_layout, gq_cpu_avx2_int8_gemv,
            gq_cpu_avx2_trellis_gemv, gq_cpu_avx2_trellis_dequant};
  }
  if (isa == 2) {
    TORCH_CHECK(__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                    __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"),
                "gq_cpu: the avx512 variant needs AVX-512 F/BW/VL/DQ, which this CPU lacks");
    return {gq_cpu_avx512_gemv, gq_cpu_avx512_dequant, gq_cpu_avx512_x_layout, gq_cpu_avx512_int8_gemv,
            gq_cpu_avx512_trellis_gemv, gq_cpu_avx512_trellis_dequant};
  }
#endif
  TORCH_CHECK(false, "gq_cpu: variant ", isa, " is not built into this library");
}

std::vector<int64_t> built_variants() {
#if defined(GQ_WITH_X86)
  return {0, 1, 2};
#else
  return {0};
#endif
}

// The codes' part of a problem (k, n, qweight, bits, words), checked.
gq_cpu::Problem describe_codes(const at::Tensor& qweight, int64_t in_features) {
  TORCH_CHECK(qweight.device().is_cpu() && qweight.scalar_type() == at::kInt && qweight.dim() == 3 &&
                  qweight.is_contiguous(),
              "gq_cpu: qweight must be a contiguous CPU int32 [bits, N, words] tensor, got ", qweight.scalar_type(),
              " ", qweight.sizes());
  const int64_t bits = qweight.size(0), n = qweight.size(1), words = qweight.size(2);
  TORCH_CHECK(bits >= 1 && bits <= gq_cpu::kMaxBits, "gq_cpu: serves 1..", gq_cpu::kMaxBits, " bits, got ", bits);
  TORCH_CHECK(in_features >= 0 && words == (in_features + 31) / 32, "gq_cpu: qweight has ", words,
              " words per row, in_features=", in_features, " needs ", (in_features + 31) / 32);
  gq_cpu::Problem p{};
  p.k = in_features;
  p.n = n;
  p.qweight = qweight.data_ptr<int32_t>();
  p.bits = static_cast<int32_t>(bits);
  p.words = words;
  return p;
}

// The weights' description (everything but activations and output), checked.
gq_cpu::Problem describe(const at::Tensor& qweight, const std::optional<at::Tensor>& table,
                         const std::optional<at::Tensor>& scales, const std::optional<at::Tensor>& offsets,
                         int64_t group_size, int64_t in_features) {
  gq_cpu::Problem p = describe_codes(qweight, in_features);
  const int64_t bits = p.bits, n = p.n;
  if (table.has_value()) {
    TORCH_CHECK(!scales.has_value() && !offsets.has_value(), "gq_cpu: give a table or scales + offsets, not both");
    const at::Tensor& t = *table;
    TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous() && t.dim() == 2 &&
                    t.size(0) == n && t.size(1) == (int64_t{1} << bits),
                "gq_cpu: table must be contiguous fp32 [N=", n, ", 2^bits=", int64_t{1} << bits, "], got ",
                t.scalar_type(), " ", t.sizes());
    p.decoder = gq_cpu::kTable;
    p.table = t.data_ptr<float>();
  } else {
    TORCH_CHECK(scales.has_value() && offsets.has_value(), "gq_cpu: give a table or scales + offsets");
    const int64_t gs = group_size == -1 ? std::max<int64_t>(in_features, 1) : group_size;
    TORCH_CHECK(gs >= 1, "gq_cpu: group_size must be -1 or >= 1, got ", group_size);
    const int64_t groups = group_size == -1 ? 1 : (in_features + gs - 1) / gs;
    for (const at::Tensor* t : {&*scales, &*offsets}) {
      TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kHalf && t->is_contiguous() && t->dim() == 2 &&
                      t->size(0) == n && t->size(1) == groups,
                  "gq_cpu: scales and offsets must be contiguous fp16 [N=", n, ", groups=", groups, "], got ",
                  t->scalar_type(), " ", t->sizes());
    }
    p.decoder = gq_cpu::kAffine;
    p.scales = reinterpret_cast<const uint16_t*>(scales->data_ptr<at::Half>());
    p.offsets = reinterpret_cast<const uint16_t*>(offsets->data_ptr<at::Half>());
    p.groups = groups;
    p.group_size = gs;
  }
  return p;
}

int32_t rounding_for(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat: return gq_cpu::kNone;
    case at::kBFloat16: return gq_cpu::kBf16;
    case at::kHalf: return gq_cpu::kFp16;
    default: TORCH_CHECK(false, "gq_cpu: activations must be float32, bfloat16 or float16, got ", dtype);
  }
}

int64_t grain_rows(int64_t k) { return std::max<int64_t>(1, kGrainWeights / std::max<int64_t>(k, 1)); }

// x2 (fp32 [m, k] contiguous) in the layout the variant's GEMV reads: x2 itself (kNatural) or, for
// kSplit32, per 32 columns the 16 even then the 16 odd ones, zero past k.
at::Tensor gemv_input(const at::Tensor& x2, const gq_cpu::Problem& p, const Variant& v) {
  if (v.x_layout() != gq_cpu::kSplit32) return x2;
  const int64_t m = x2.size(0), k = p.k, width = p.words * 32;
  at::Tensor xs = at::zeros({m, width}, x2.options());
  const float* src = x2.data_ptr<float>();
  float* dst = xs.data_ptr<float>();
  for (int64_t r = 0; r < m; ++r)
    for (int64_t c = 0; c < k; ++c) dst[r * width + (c & ~int64_t{31}) + (c & 1) * 16 + ((c & 31) >> 1)] = src[r * k + c];
  return xs;
}

// x2: fp32 [m, k] contiguous; out: fp32 [m, n] with unit column stride (a column block of a wider
// contiguous output is fine). Writes every element of out. xg: x2 as gemv_input made it, when the
// caller already has it (several weights, one input).
void matmul_into(const at::Tensor& x2, gq_cpu::Problem p, const Variant& v, at::Tensor& out,
                 const at::Tensor* xg = nullptr) {
  const int64_t k = p.k, n = p.n, m = x2.size(0);
  if (m == 0 || n == 0) return;
  if (k == 0) {
    out.zero_();
  } else if (m <= gq_cpu::kMaxRows) {
    const at::Tensor xs = xg != nullptr ? *xg : gemv_input(x2, p, v);
    p.x = xs.data_ptr<float>();
    p.x_stride = xs.stride(0);
    p.m = m;
    p.y = out.data_ptr<float>();
    p.y_stride = out.stride(0);
    at::parallel_for(0, n, grain_rows(k), [&](int64_t n0, int64_t n1) { v.gemv(&p, n0, n1); });
  } else {
    // Tile by tile: at most kTileBytes of fp32 weights exist at a time, never the whole matrix.
    int64_t tile = std::max<int64_t>(16, kTileBytes / (4 * k));
    tile = std::min(tile, n);
    at::Tensor buf = at::empty({tile, k}, x2.options());
    float* b = buf.data_ptr<float>();
    for (int64_t t0 = 0; t0 < n; t0 += tile) {
      const int64_t t = std::min(tile, n - t0);
      at::parallel_for(t0, t0 + t, grain_rows(k),
                       [&](int64_t n0, int64_t n1) { v.dequant(&p, n0, n1, b + (n0 - t0) * k, k); });
      out.narrow(1, t0, t).copy_(at::mm(x2, buf.narrow(0, 0, t).t()));
    }
  }
}

// x [..., K] -> fp32 [rows, K] contiguous (a view when x already is one).
at::Tensor rows_fp32(const at::Tensor& x, int64_t in_features) {
  TORCH_CHECK(x.device().is_cpu(), "gq_cpu: x must be on the CPU, got ", x.device());
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == in_features, "gq_cpu: x must be [..., ", in_features, "], got ",
              x.sizes());
  return x.reshape({-1, in_features}).to(at::kFloat).contiguous();
}

at::Tensor bitplane_matmul(const at::Tensor& x, const at::Tensor& qweight, const std::optional<at::Tensor>& table,
                           const std::optional<at::Tensor>& scales, const std::optional<at::Tensor>& offsets,
                           int64_t group_size, int64_t in_features, int64_t isa) {
  const at::ScalarType dtype = x.scalar_type();
  gq_cpu::Problem p = describe(qweight, table, scales, offsets, group_size, in_features);
  p.rounding = rounding_for(dtype);
  const Variant v = variant(isa);
  const at::Tensor x2 = rows_fp32(x, in_features);
  at::Tensor out = at::empty({x2.size(0), p.n}, x2.options());
  matmul_into(x2, p, v, out);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = p.n;
  return (dtype == at::kFloat ? out : out.to(dtype)).view(shape);
}

// Several weights with the same input (q/k/v, gate/up) in one call: [..., K] -> [..., N_0 + N_1 + ...],
// the outputs side by side in the order given. One call instead of one per weight: a decode step
// of a small model pays the per-call cost 210 times otherwise (gq_serve.lean_decode).
at::Tensor bitplane_matmul_multi(const at::Tensor& x, at::TensorList qweights,
                                 const c10::List<std::optional<at::Tensor>>& tables,
                                 const c10::List<std::optional<at::Tensor>>& scales,
                                 const c10::List<std::optional<at::Tensor>>& offsets, at::IntArrayRef group_sizes,
                                 int64_t in_features, int64_t isa) {
  const size_t count = qweights.size();
  TORCH_CHECK(count >= 1 && tables.size() == count && scales.size() == count && offsets.size() == count &&
                  group_sizes.size() == count,
              "gq_cpu: bitplane_matmul_multi needs one qweight, table, scales, offsets and group_size per weight, "
              "got ", count, ", ", tables.size(), ", ", scales.size(), ", ", offsets.size(), ", ", group_sizes.size());
  const at::ScalarType dtype = x.scalar_type();
  const Variant v = variant(isa);
  std::vector<gq_cpu::Problem> problems;
  int64_t total = 0;
  for (size_t i = 0; i < count; ++i) {
    problems.push_back(describe(qweights[i], tables.get(i), scales.get(i), offsets.get(i), group_sizes[i],
                                in_features));
    problems.back().rounding = rounding_for(dtype);
    total += problems.back().n;
  }
  const at::Tensor x2 = rows_fp32(x, in_features);
  at::Tensor out = at::empty({x2.size(0), total}, x2.options());
  // The GEMV's input layout, made once: the same for every weight (same k).
  const at::Tensor xg = x2.size(0) <= gq_cpu::kMaxRows ? gemv_input(x2, problems[0], v) : x2;
  int64_t col = 0;
  for (const gq_cpu::Problem& p : problems) {
    at::Tensor block = out.narrow(1, col, p.n);
    matmul_into(x2, p, v, block, &xg);
    col += p.n;
  }
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = total;
  return (dtype == at::kFloat ? out : out.to(dtype)).view(shape);
}

// The same into a given fp32 [rows, N] output (tests poison it to see that every element is written).
void bitplane_matmul_out(const at::Tensor& x, const at::Tensor& qweight, const std::optional<at::Tensor>& table,
                         const std::optional<at::Tensor>& scales, const std::optional<at::Tensor>& offsets,
                         int64_t group_size, int64_t in_features, int64_t isa, at::Tensor& out) {
  gq_cpu::Problem p = describe(qweight, table, scales, offsets, group_size, in_features);
  p.rounding = rounding_for(x.scalar_type());
  const Variant v = variant(isa);
  const at::Tensor x2 = rows_fp32(x, in_features);
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.is_contiguous() && out.dim() == 2 && out.size(0) == x2.size(0) &&
                  out.size(1) == p.n,
              "gq_cpu: out must be contiguous fp32 [", x2.size(0), ", ", p.n, "], got ", out.scalar_type(), " ",
              out.sizes());
  matmul_into(x2, p, v, out);
}

void bitplane_dequantize_out(const at::Tensor& qweight, const std::optional<at::Tensor>& table,
                             const std::optional<at::Tensor>& scales, const std::optional<at::Tensor>& offsets,
                             int64_t group_size, int64_t in_features, int64_t rounding, int64_t isa, at::Tensor& out) {
  gq_cpu::Problem p = describe(qweight, table, scales, offsets, group_size, in_features);
  TORCH_CHECK(rounding >= gq_cpu::kNone && rounding <= gq_cpu::kFp16, "gq_cpu: rounding must be 0, 1 or 2");
  p.rounding = static_cast<int32_t>(rounding);
  const Variant v = variant(isa);
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.is_contiguous() && out.dim() == 2 && out.size(0) == p.n &&
                  out.size(1) == in_features,
              "gq_cpu: out must be contiguous fp32 [", p.n, ", ", in_features, "], got ", out.scalar_type(), " ",
              out.sizes());
  if (p.n > 0 && in_features > 0) {
    float* o = out.data_ptr<float>();
    at::parallel_for(0, p.n, grain_rows(in_features),
                     [&](int64_t n0, int64_t n1) { v.dequant(&p, n0, n1, o + n0 * in_features, in_features); });
  }
}

at::Tensor bitplane_dequantize(const at::Tensor& qweight, const std::optional<at::Tensor>& table,
                               const std::optional<at::Tensor>& scales, const std::optional<at::Tensor>& offsets,
                               int64_t group_size, int64_t in_features, int64_t rounding, int64_t isa) {
  at::Tensor out = at::empty({qweight.dim() == 3 ? qweight.size(1) : 0, in_features},
                             qweight.options().dtype(at::kFloat));
  bitplane_dequantize_out(qweight, table, scales, offsets, group_size, in_features, rounding, isa, out);
  return out;
}

// ------------------------------------------------------------------ int8 activations (bitplane.h: Q8Problem)
// Activations as the int8 kernel reads them, in buffers the calling thread reuses from call to call
// (a decode step makes 120 calls: no allocation per call).
struct Q8Input {
  std::vector<int8_t> xq;    // [m, blocks * kQ8Block]
  std::vector<float> xscale;  // [m, blocks]
  std::vector<float> xsum;    // [m]
  int64_t blocks = 0;
};

// x2 fp32 [m, k] contiguous -> per row and block of kQ8Block columns: s = amax / 127 (0 for a zero
// block), xq = round-to-even(x / s) in [-127, 127], zero past k; xsum = sum over blocks, in order,
// of s * (sum of the block's xq). Exactly gq_kernels.cpu.q8.quantize_activations.
const Q8Input& quantize_q8_rows(const at::Tensor& x2) {
  thread_local Q8Input in;
  const int64_t m = x2.size(0), k = x2.size(1), blocks = (k + gq_cpu::kQ8Block - 1) / gq_cpu::kQ8Block;
  const int64_t width = blocks * gq_cpu::kQ8Block;
  in.blocks = blocks;
  in.xq.assign(m * width, 0);
  in.xscale.resize(m * blocks);
  in.xsum.resize(m);
  const float* x = x2.data_ptr<float>();
  for (int64_t r = 0; r < m; ++r) {
    float total = 0.0f;
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t c0 = b * gq_cpu::kQ8Block, c1 = std::min(k, c0 + gq_cpu::kQ8Block);
      float amax = 0.0f;
      for (int64_t c = c0; c < c1; ++c) amax = std::max(amax, std::fabs(x[r * k + c]));
      const float s = amax / 127.0f;
      int32_t isum = 0;
      if (s > 0.0f) {
        for (int64_t c = c0; c < c1; ++c) {
          const float v = std::clamp(std::nearbyint(x[r * k + c] / s), -127.0f, 127.0f);
          in.xq[r * width + c] = static_cast<int8_t>(v);
          isum += static_cast<int32_t>(v);
        }
      }
      in.xscale[r * blocks + b] = s;
      total += s * static_cast<float>(isum);
    }
    in.xsum[r] = total;
  }
  return in;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_q8(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2, "gq_cpu: quantize_q8 takes x [m, k], got ", x.sizes());
  const at::Tensor x2 = rows_fp32(x, x.size(1));
  const Q8Input& in = quantize_q8_rows(x2);
  const int64_t m = x2.size(0);
  at::Tensor xq = at::empty({m, in.blocks * gq_cpu::kQ8Block}, x2.options().dtype(at::kChar));
  at::Tensor xscale = at::empty({m, in.blocks}, x2.options()), xsum = at::empty({m}, x2.options());
  std::copy(in.xq.begin(), in.xq.end(), xq.data_ptr<int8_t>());
  std::copy(in.xscale.begin(), in.xscale.end(), xscale.data_ptr<float>());
  std::copy(in.xsum.begin(), in.xsum.end(), xsum.data_ptr<float>());
  return {xq, xscale, xsum};
}

#if defined(GQ_WITH_X86)
void check_q8_cpu() {
  TORCH_CHECK(__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                  __builtin_cpu_supports("avx512vbmi") && __builtin_cpu_supports("avx512vnni"),
              "gq_cpu: the int8-activation kernel needs AVX-512 F/BW/VBMI/VNNI, which this CPU lacks");
}

void check_vector(const at::Tensor& v, int64_t n, const char* what) {
  TORCH_CHECK(v.device().is_cpu() && v.scalar_type() == at::kFloat && v.is_contiguous() && v.dim() == 1 &&
                  v.size(0) == n,
              "gq_cpu: ", what, " must be a contiguous fp32 [N=", n, "] tensor, got ", v.scalar_type(), " ", v.sizes());
}

// x [..., K] times the problems' weights side by side: [..., N_0 + N_1 + ...] in x's dtype.
at::Tensor run_q8(const at::Tensor& x, std::vector<gq_cpu::Q8Problem>& problems, int64_t in_features) {
  const at::Tensor x2 = rows_fp32(x, in_features);
  const int64_t m = x2.size(0);
  int64_t total = 0;
  for (const gq_cpu::Q8Problem& p : problems) total += p.n;
  at::Tensor out = at::empty({m, total}, x2.options());
  if (in_features == 0) {
    out.zero_();
  } else if (m > 0) {
    const Q8Input& in = quantize_q8_rows(x2);
    int64_t col = 0;
    for (gq_cpu::Q8Problem& p : problems) {
      p.k = in_features;
      p.blocks = in.blocks;
      p.xq_stride = in.blocks * gq_cpu::kQ8Block;
      p.y_stride = total;
      // kMaxRows activation rows per pass (decode calls have one pass; the callers send more only
      // to measure these numerics on whole prompts).
      for (int64_t r0 = 0; r0 < m; r0 += gq_cpu::kMaxRows) {
        p.m = std::min<int64_t>(gq_cpu::kMaxRows, m - r0);
        p.xq = in.xq.data() + r0 * p.xq_stride;
        p.xscale = in.xscale.data() + r0 * p.blocks;
        p.xsum = in.xsum.data() + r0;
        p.y = out.data_ptr<float>() + r0 * total + col;
        at::parallel_for(0, p.n, grain_rows(in_features),
                         [&](int64_t n0, int64_t n1) { gq_cpu_avx512vnni_q8_gemv(&p, n0, n1); });
      }
      col += p.n;
    }
  }
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = total;
  return (x.scalar_type() == at::kFloat ? out : out.to(x.scalar_type())).view(shape);
}
#endif

at::Tensor bitplane_q8_matmul_multi(const at::Tensor& x, at::TensorList qweights, at::TensorList tables,
                                    at::TensorList tscales, at::TensorList tmins, int64_t in_features) {
#if defined(GQ_WITH_X86)
  check_q8_cpu();
  const size_t count = qweights.size();
  TORCH_CHECK(count >= 1 && tables.size() == count && tscales.size() == count && tmins.size() == count,
              "gq_cpu: bitplane_q8_matmul_multi needs one qweight, table, tscale and tmin per weight");
  std::vector<gq_cpu::Q8Problem> problems;
  for (size_t i = 0; i < count; ++i) {
    const gq_cpu::Problem d = describe_codes(qweights[i], in_features);
    const at::Tensor& t = tables[i];
    TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kByte && t.is_contiguous() && t.dim() == 2 &&
                    t.size(0) == d.n && t.size(1) == 16,
                "gq_cpu: table must be contiguous uint8 [N=", d.n, ", 16], got ", t.scalar_type(), " ", t.sizes());
    check_vector(tscales[i], d.n, "tscale");
    check_vector(tmins[i], d.n, "tmin");
    gq_cpu::Q8Problem p{};
    p.n = d.n;
    p.qweight = d.qweight;
    p.bits = d.bits;
    p.words = d.words;
    p.table = t.data_ptr<uint8_t>();
    p.tscale = tscales[i].data_ptr<float>();
    p.tmin = tmins[i].data_ptr<float>();
    problems.push_back(p);
  }
  return run_q8(x, problems, in_features);
#else
  TORCH_CHECK(false, "gq_cpu: the int8-activation kernel is x86-64 code (AVX-512 VBMI + VNNI)");
#endif
}

// Dense uint8 rows [N, blocks * 64] (zero past K), W = tmin + tscale * u: the int8 lm_head.
at::Tensor dense_q8_matmul(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& tscale,
                           const at::Tensor& tmin, int64_t in_features) {
#if defined(GQ_WITH_X86)
  check_q8_cpu();
  const int64_t width = (in_features + gq_cpu::kQ8Block - 1) / gq_cpu::kQ8Block * gq_cpu::kQ8Block;
  TORCH_CHECK(weight.device().is_cpu() && weight.scalar_type() == at::kByte && weight.is_contiguous() &&
                  weight.dim() == 2 && weight.size(1) == width,
              "gq_cpu: weight must be a contiguous uint8 [N, ", width, "] tensor (in_features ", in_features,
              " padded to a multiple of ", gq_cpu::kQ8Block, "), got ", weight.scalar_type(), " ", weight.sizes());
  check_vector(tscale, weight.size(0), "tscale");
  check_vector(tmin, weight.size(0), "tmin");
  gq_cpu::Q8Problem p{};
  p.n = weight.size(0);
  p.dense = weight.data_ptr<uint8_t>();
  p.tscale = tscale.data_ptr<float>();
  p.tmin = tmin.data_ptr<float>();
  std::vector<gq_cpu::Q8Problem> problems{p};
  return run_q8(x, problems, in_features);
#else
  TORCH_CHECK(false, "gq_cpu: the int8-activation kernel is x86-64 code (AVX-512 VBMI + VNNI)");
#endif
}

// ------------------------------------------------------------------ int8 rows (rowint8.h)
void check_int8(const at::Tensor& qweight, const at::Tensor& scale) {
  TORCH_CHECK(qweight.device().is_cpu() && qweight.scalar_type() == at::kChar && qweight.dim() == 2 &&
                  qweight.is_contiguous(),
              "gq_cpu: qweight must be a contiguous CPU int8 [N, K] tensor, got ", qweight.scalar_type(), " ",
              qweight.sizes());
  TORCH_CHECK(scale.device().is_cpu() && scale.scalar_type() == at::kFloat && scale.is_contiguous() &&
                  scale.dim() == 1 && scale.size(0) == qweight.size(0),
              "gq_cpu: scale must be a contiguous CPU fp32 [N=", qweight.size(0), "] tensor, got ",
              scale.scalar_type(), " ", scale.sizes());
}

// x2: fp32 [m, k] contiguous; out: fp32 [m, n] contiguous. Writes every element of out.
void int8_matmul_into(const at::Tensor& x2, const at::Tensor& qweight, const at::Tensor& scale, const Variant& v,
                      at::Tensor& out) {
  const int64_t n = qweight.size(0), k = qweight.size(1), m = x2.size(0);
  if (m == 0 || n == 0) return;
  if (k == 0) {
    out.zero_();
  } else if (m <= gq_cpu::kInt8MaxRows) {
    gq_cpu::Int8Problem p{x2.data_ptr<float>(), k, m, k, n, qweight.data_ptr<int8_t>(), scale.data_ptr<float>(),
                          out.data_ptr<float>(), n};
    at::parallel_for(0, n, grain_rows(k), [&](int64_t n0, int64_t n1) { v.int8_gemv(&p, n0, n1); });
  } else {
    // Tile by tile, as matmul_into: never a dense fp32 copy of the whole matrix.
    const int64_t tile = std::min(n, std::max<int64_t>(16, kTileBytes / (4 * k)));
    for (int64_t t0 = 0; t0 < n; t0 += tile) {
      const int64_t t = std::min(tile, n - t0);
      const at::Tensor w = qweight.narrow(0, t0, t).to(at::kFloat).mul_(scale.narrow(0, t0, t).unsqueeze(1));
      out.narrow(1, t0, t).copy_(at::mm(x2, w.t()));
    }
  }
}

at::Tensor int8_matmul(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale, int64_t isa) {
  check_int8(qweight, scale);
  const Variant v = variant(isa);
  const at::Tensor x2 = rows_fp32(x, qweight.size(1));
  at::Tensor out = at::empty({x2.size(0), qweight.size(0)}, x2.options());
  int8_matmul_into(x2, qweight, scale, v, out);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = qweight.size(0);
  return (x.scalar_type() == at::kFloat ? out : out.to(x.scalar_type())).view(shape);
}

void int8_matmul_out(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale, int64_t isa,
                     at::Tensor& out) {
  check_int8(qweight, scale);
  const Variant v = variant(isa);
  const at::Tensor x2 = rows_fp32(x, qweight.size(1));
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.is_contiguous() && out.dim() == 2 && out.size(0) == x2.size(0) &&
                  out.size(1) == qweight.size(0),
              "gq_cpu: out must be contiguous fp32 [", x2.size(0), ", ", qweight.size(0), "], got ",
              out.scalar_type(), " ", out.sizes());
  int8_matmul_into(x2, qweight, scale, v, out);
}

}  // namespace

// ------------------------------------------------------------------ grouped int8 GEMM (groupint8.h)
using ActCodesFn = void (*)(const float*, int64_t, int64_t, int64_t, int, float, uint8_t*, float*, float*);
struct GroupInt8Variant {
  void (*gemm)(const gq_cpu::GroupInt8Problem*, int64_t, int64_t);
  ActCodesFn act_codes;
};

GroupInt8Variant group_int8_variant(int64_t isa) {
  if (isa == 0) return {gq_cpu_portable_group_int8, gq_cpu_portable_act_codes};
#if defined(GQ_WITH_X86)
  if (isa == 3) {
    TORCH_CHECK(__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                    __builtin_cpu_supports("avx512vnni"),
                "gq_cpu: the avx512vnni variant needs AVX-512 F/BW/VNNI, which this CPU lacks");
    return {gq_cpu_avx512vnni_group_int8, gq_cpu_avx512vnni_act_codes};
  }
  if (isa == 1) {
    variant(isa);  // checks the CPU
    return {gq_cpu_avx2_group_int8, gq_cpu_avx2_act_codes};
  }
  if (isa == 2) {
    variant(isa);
    return {gq_cpu_avx512_group_int8, gq_cpu_avx512_act_codes};
  }
#endif
  TORCH_CHECK(false, "gq_cpu: variant ", isa, " of the grouped int8 GEMM is not built into this library");
}

void check_fp32_2d(const at::Tensor& t, int64_t rows, int64_t cols, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous() && t.dim() == 2 &&
                  t.size(0) == rows && (cols < 0 || t.size(1) == cols),
              "gq_cpu: ", what, " must be a contiguous CPU fp32 [", rows, ", ", cols, "] tensor, got ",
              t.scalar_type(), " ", t.sizes());
}

// a uint8 [M, K]; sx, zx fp32 [M, Ga]; w int8 [N_pad / 16, K / 4, 64]; rs fp32 [K / group, N_pad];
// ws fp32 [Gw, N_pad] -> y fp32 [M, n].
at::Tensor group_int8_matmul(const at::Tensor& a, const at::Tensor& sx, const at::Tensor& zx, const at::Tensor& w,
                             const at::Tensor& rs, const at::Tensor& ws, int64_t n, int64_t group, int64_t isa) {
  const auto fn = group_int8_variant(isa).gemm;
  TORCH_CHECK(a.device().is_cpu() && a.scalar_type() == at::kByte && a.dim() == 2 && a.stride(1) == 1,
              "gq_cpu: activation codes must be a CPU uint8 [M, K] tensor with unit column stride, got ",
              a.scalar_type(), " ", a.sizes());
  const int64_t m = a.size(0), k = a.size(1);
  TORCH_CHECK(k > 0 && k % 4 == 0 && group > 0 && group % 4 == 0 && k % group == 0,
              "gq_cpu: K=", k, " and GEMM groups of ", group, " columns: both must be multiples of 4 and the "
              "groups must divide K");
  const int64_t n_pad = (n + gq_cpu::kGroupBlockN - 1) / gq_cpu::kGroupBlockN * gq_cpu::kGroupBlockN;
  TORCH_CHECK(n > 0 && w.device().is_cpu() && w.scalar_type() == at::kChar && w.is_contiguous() && w.dim() == 3 &&
                  w.size(0) == n_pad / gq_cpu::kGroupBlockN && w.size(1) == k / 4 && w.size(2) == 64,
              "gq_cpu: weight codes must be contiguous int8 [", n_pad / gq_cpu::kGroupBlockN, ", ", k / 4,
              ", 64] for ", n, " x ", k, ", got ", w.scalar_type(), " ", w.sizes());
  check_fp32_2d(sx, m, -1, "sx");
  const int64_t act_groups = sx.size(1);
  check_fp32_2d(zx, m, act_groups, "zx");
  TORCH_CHECK(act_groups > 0 && k % act_groups == 0 && (k / act_groups) % group == 0, "gq_cpu: ", act_groups,
              " activation groups of ", k, " columns are not whole GEMM groups of ", group);
  check_fp32_2d(rs, k / group, n_pad, "rs");
  TORCH_CHECK(ws.dim() == 2 && ws.size(0) > 0, "gq_cpu: ws must be fp32 [Gw, N_pad]");
  const int64_t w_groups = ws.size(0);
  check_fp32_2d(ws, w_groups, n_pad, "ws");
  TORCH_CHECK(k % w_groups == 0 && (k / w_groups) % group == 0, "gq_cpu: ", w_groups, " weight groups of ", k,
              " columns are not whole GEMM groups of ", group);
  at::Tensor out = at::empty({m, n}, sx.options());
  if (m == 0) return out;
  gq_cpu::GroupInt8Problem p{a.data_ptr<uint8_t>(), a.stride(0), m, k, n, n_pad, w.data_ptr<int8_t>(), group,
                             sx.data_ptr<float>(), zx.data_ptr<float>(), act_groups, rs.data_ptr<float>(),
                             ws.data_ptr<float>(), w_groups, out.data_ptr<float>(), n};
  const int64_t blocks = n_pad / gq_cpu::kGroupBlockN;
  const int64_t grain = std::max<int64_t>(1, kGrainWeights / (gq_cpu::kGroupBlockN * k * m));
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) { fn(&p, b0, b1); });
  return out;
}

// The activation codes group_int8_matmul reads (groupint8.h: act_codes), bit for bit
// gq_kernels.w4a4.reference.quantize_act.
std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_act_codes(const at::Tensor& x, int64_t bits, int64_t group,
                                                                   double clip, int64_t isa) {
  const auto fn = group_int8_variant(isa).act_codes;
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2 && x.is_contiguous(),
              "gq_cpu: x must be a contiguous CPU fp32 [M, K] tensor, got ", x.scalar_type(), " ", x.sizes());
  TORCH_CHECK(bits >= 1 && bits <= 8, "gq_cpu: activation codes of 1..8 bits, got ", bits);
  const int64_t m = x.size(0), k = x.size(1), gs = group > 0 ? group : k;
  TORCH_CHECK(k > 0 && k % gs == 0, "gq_cpu: groups of ", group, " columns do not divide K=", k);
  const int64_t groups = k / gs;
  at::Tensor codes = at::empty({m, k}, x.options().dtype(at::kByte));
  at::Tensor scale = at::empty({m, groups}, x.options());
  at::Tensor zero = at::empty({m, groups}, x.options());
  const float* xp = x.data_ptr<float>();
  uint8_t* qp = codes.data_ptr<uint8_t>();
  float* sp = scale.data_ptr<float>();
  float* zp = zero.data_ptr<float>();
  at::parallel_for(0, m * groups, std::max<int64_t>(1, kGrainWeights / gs), [&](int64_t i0, int64_t i1) {
    fn(xp, gs, i0, i1, static_cast<int>(bits), static_cast<float>(clip), qp, sp, zp);
  });
  return {codes, scale, zero};
}

// ------------------------------------------------------------------ trellis tiles (trellis.h)
// x (rotated, [..., K]) @ W_code.T -> fp32 [..., N]; W_code is decoded from the words, never stored.
at::Tensor trellis_matmul(const at::Tensor& x, const at::Tensor& words, const at::Tensor& table,
                          const std::optional<at::Tensor>& tlut, int64_t kV, int64_t code, int64_t out_features,
                          int64_t isa) {
  const Variant v = variant(isa);
  const int64_t k = x.size(-1), n = out_features;
  TORCH_CHECK(k % gq_cpu::kTrellisTile == 0 && n % gq_cpu::kTrellisTile == 0 && n > 0,
              "gq_cpu: trellis needs in and out features that are multiples of 16, got ", k, " and ", n);
  TORCH_CHECK(table.device().is_cpu() && table.scalar_type() == at::kFloat && table.is_contiguous() &&
                  table.dim() == 2 && table.size(0) == 65536 && (table.size(1) == 1 || table.size(1) == 2),
              "gq_cpu: table must be contiguous fp32 [65536, V], V 1 or 2, got ", table.scalar_type(), " ",
              table.sizes());
  const int64_t V = table.size(1);
  TORCH_CHECK(kV >= 1 && kV <= 16 && kV % V == 0, "gq_cpu: kV=", kV, " is not bits * V for V=", V);
  const int64_t wpt = gq_cpu::kTrellisTile * gq_cpu::kTrellisTile * (kV / V) / 16;
  const int64_t tiles = (n / gq_cpu::kTrellisTile) * (k / gq_cpu::kTrellisTile);
  TORCH_CHECK(words.device().is_cpu() && words.scalar_type() == at::kShort && words.is_contiguous() &&
                  words.dim() == 2 && words.size(0) == tiles && words.size(1) == wpt && wpt <= 64,
              "gq_cpu: trellis words must be contiguous int16 [", tiles, ", ", wpt, "] for ", n, "x", k,
              " at kV=", kV, ", got ", words.scalar_type(), " ", words.sizes());
  TORCH_CHECK(code >= gq_cpu::kCodeTable && code <= gq_cpu::kCode3inst && (code == gq_cpu::kCodeTable ||
                                                                          (code == gq_cpu::kCodeHyb) == (V == 2)),
              "gq_cpu: trellis code ", code, " does not fit a table of V=", V,
              " (0 table, 1 hyb with V=2, 2 1mad and 3 3inst with V=1)");
  const uint32_t* lut = nullptr;
  if (code == gq_cpu::kCodeHyb) {
    TORCH_CHECK(tlut.has_value() && tlut->device().is_cpu() && tlut->scalar_type() == at::kInt &&
                    tlut->is_contiguous() && tlut->numel() == 512,
                "gq_cpu: the hyb code needs its LUT as contiguous int32 [512] (fp16 pairs)");
    lut = reinterpret_cast<const uint32_t*>(tlut->data_ptr<int32_t>());
  }
  const at::Tensor x2 = rows_fp32(x, k);
  const int64_t m = x2.size(0);
  at::Tensor out = at::empty({m, n}, x2.options());
  gq_cpu::TrellisProblem p{x2.data_ptr<float>(), k, m, k, n,
                           reinterpret_cast<const uint16_t*>(words.data_ptr<int16_t>()), static_cast<int32_t>(wpt),
                           static_cast<int32_t>(kV), static_cast<int32_t>(V), static_cast<int32_t>(code),
                           table.data_ptr<float>(), lut,
                           out.data_ptr<float>(), n};
  const int64_t tile_rows = n / gq_cpu::kTrellisTile;
  if (m == 0) {
  } else if (m <= gq_cpu::kTrellisMaxRows) {
    const int64_t grain = std::max<int64_t>(1, grain_rows(k) / gq_cpu::kTrellisTile);
    at::parallel_for(0, tile_rows, grain, [&](int64_t t0, int64_t t1) { v.trellis_gemv(&p, t0, t1); });
  } else {
    // Tile rows at a time (at most kTileBytes of decoded fp32), each block multiplied with at::mm.
    const int64_t block = std::max<int64_t>(1, kTileBytes / (4 * k * gq_cpu::kTrellisTile));
    at::Tensor w = at::empty({std::min(block, tile_rows) * gq_cpu::kTrellisTile, k}, x2.options());
    for (int64_t b0 = 0; b0 < tile_rows; b0 += block) {
      const int64_t b1 = std::min(tile_rows, b0 + block), rows = (b1 - b0) * gq_cpu::kTrellisTile;
      float* wp = w.data_ptr<float>();
      at::parallel_for(b0, b1, 1, [&](int64_t t0, int64_t t1) {
        v.trellis_dequant(&p, t0, t1, wp + (t0 - b0) * gq_cpu::kTrellisTile * k, k);
      });
      out.narrow(1, b0 * gq_cpu::kTrellisTile, rows).copy_(at::mm(x2, w.narrow(0, 0, rows).t()));
    }
  }
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = n;
  return out.view(shape);
}

TORCH_LIBRARY(gq_cpu, m) {
  m.def(
      "bitplane_matmul(Tensor x, Tensor qweight, Tensor? table, Tensor? scales, Tensor? offsets, "
      "int group_size, int in_features, int isa) -> Tensor");
  m.def(
      "bitplane_dequantize(Tensor qweight, Tensor? table, Tensor? scales, Tensor? offsets, "
      "int group_size, int in_features, int rounding, int isa) -> Tensor");
  m.def(
      "bitplane_matmul_out(Tensor x, Tensor qweight, Tensor? table, Tensor? scales, Tensor? offsets, "
      "int group_size, int in_features, int isa, Tensor(a!) out) -> ()");
  m.def(
      "bitplane_dequantize_out(Tensor qweight, Tensor? table, Tensor? scales, Tensor? offsets, "
      "int group_size, int in_features, int rounding, int isa, Tensor(a!) out) -> ()");
  m.def(
      "bitplane_matmul_multi(Tensor x, Tensor[] qweights, Tensor?[] tables, Tensor?[] scales, Tensor?[] offsets, "
      "int[] group_sizes, int in_features, int isa) -> Tensor");
  m.def(
      "bitplane_q8_matmul_multi(Tensor x, Tensor[] qweights, Tensor[] tables, Tensor[] tscales, Tensor[] tmins, "
      "int in_features) -> Tensor");
  m.def("dense_q8_matmul(Tensor x, Tensor weight, Tensor tscale, Tensor tmin, int in_features) -> Tensor");
  m.def("quantize_q8(Tensor x) -> (Tensor, Tensor, Tensor)");
  m.def("int8_matmul(Tensor x, Tensor qweight, Tensor scale, int isa) -> Tensor");
  m.def("quantize_act_codes(Tensor x, int bits, int group, float clip, int isa) -> (Tensor, Tensor, Tensor)");
  m.def("group_int8_matmul(Tensor a, Tensor sx, Tensor zx, Tensor w, Tensor rs, Tensor ws, int n, int group, int isa) -> Tensor");
  m.def("int8_matmul_out(Tensor x, Tensor qweight, Tensor scale, int isa, Tensor(a!) out) -> ()");
  m.def("trellis_matmul(Tensor x, Tensor words, Tensor table, Tensor? tlut, int kV, int code, int out_features, int isa) -> Tensor");
  m.def("built_variants() -> int[]", &built_variants);
}

TORCH_LIBRARY_IMPL(gq_cpu, CPU, m) {
  m.impl("bitplane_matmul", &bitplane_matmul);
  m.impl("trellis_matmul", &trellis_matmul);
  m.impl("bitplane_matmul_multi", &bitplane_matmul_multi);
  m.impl("bitplane_dequantize", &bitplane_dequantize);
  m.impl("bitplane_matmul_out", &bitplane_matmul_out);
  m.impl("bitplane_dequantize_out", &bitplane_dequantize_out);
  m.impl("bitplane_q8_matmul_multi", &bitplane_q8_matmul_multi);
  m.impl("dense_q8_matmul", &dense_q8_matmul);
  m.impl("quantize_q8", &quantize_q8);
  m.impl("int8_matmul", &int8_matmul);
  m.impl("group_int8_matmul", &group_int8_matmul);
  m.impl("quantize_act_codes", &quantize_act_codes);
  m.impl("int8_matmul_out", &int8_matmul_out);
}
