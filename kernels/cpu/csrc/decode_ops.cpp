// The small fp32 operations of a CPU decode step around the linears (gq_serve/lean_decode.py), each one
// call where PyTorch takes four to eight: at one token per step every op is a dispatch of ~1-2 us, and
// a SmolLM2 step made ~600 of them besides its kernel calls.
//
//   gq_cpu::rms_norm(x [T, H], weight [H], eps) -> weight * (x * rsqrt(mean(x^2) + eps))
//   gq_cpu::rope(x [T, heads, D], cos [T, 1, D], sin [T, 1, D]) -> x * cos + rotate_half(x) * sin
//   gq_cpu::silu_mul(gate_up [T, 2F]) -> silu(gate_up[:, :F]) * gate_up[:, F:]
//   gq_cpu::decode_attention(q [H, D], keys [KV, S, D], values [KV, S, D], scale) -> [1, H * D]:
//       one query's softmax attention, query head h reading key/value head h / (H / KV)
//   gq_cpu::hadamard(x [T, n], signs [n]?, hk [K, K]?, blocks, transpose, scale [n]?) ->
//       ((x * signs) R) * scale, R = blockdiag of `blocks` R_{n/blocks} (R^T with transpose), as
//       gq_kernels.hadamard.hadamard_transform: R_{Kp} = (H_K (x) H_p) / sqrt(Kp), H_p by butterflies
//
// The same arithmetic as the PyTorch expressions they replace (lean_decode.py keeps those for other
// dtypes and devices), in fp32, up to summation order; tests/test_lean_decode.py compares both.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

void check_fp32(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat, "gq_cpu: ", what,
              " must be an fp32 CPU tensor, got ", t.scalar_type(), " on ", t.device());
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_fp32(x, "x");
  check_fp32(weight, "weight");
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && weight.dim() == 1 && weight.is_contiguous() &&
                  weight.size(0) == x.size(1),
              "gq_cpu: rms_norm takes x [T, H] with unit column stride and weight [H], got ", x.sizes(), " and ",
              weight.sizes());
  const int64_t t = x.size(0), h = x.size(1);
  at::Tensor out = at::empty({t, h}, x.options());
  const float* w = weight.data_ptr<float>();
  for (int64_t r = 0; r < t; ++r) {
    const float* xr = x.data_ptr<float>() + r * x.stride(0);
    float* o = out.data_ptr<float>() + r * h;
    float ss = 0.0f;
    for (int64_t c = 0; c < h; ++c) ss += xr[c] * xr[c];
    const float inv = 1.0f / std::sqrt(ss / static_cast<float>(h) + static_cast<float>(eps));
    for (int64_t c = 0; c < h; ++c) o[c] = w[c] * (xr[c] * inv);
  }
  return out;
}

at::Tensor rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  check_fp32(x, "x");
  check_fp32(cos, "cos");
  check_fp32(sin, "sin");
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1 && x.stride(1) == x.size(2) && x.size(2) % 2 == 0,
              "gq_cpu: rope takes x [T, heads, D] (even D, heads contiguous), got ", x.sizes(), " strides ",
              x.strides());
  const int64_t t = x.size(0), heads = x.size(1), d = x.size(2), half = d / 2;
  for (const at::Tensor* c : {&cos, &sin})
    TORCH_CHECK(c->is_contiguous() && c->dim() == 3 && c->size(0) == t && c->size(1) == 1 && c->size(2) == d,
                "gq_cpu: rope's cos and sin must be contiguous [T=", t, ", 1, D=", d, "], got ", c->sizes());
  at::Tensor out = at::empty({t, heads, d}, x.options());
  for (int64_t r = 0; r < t; ++r) {
    const float* cr = cos.data_ptr<float>() + r * d;
    const float* sr = sin.data_ptr<float>() + r * d;
    for (int64_t hh = 0; hh < heads; ++hh) {
      const float* xi = x.data_ptr<float>() + r * x.stride(0) + hh * d;
      float* o = out.data_ptr<float>() + (r * heads + hh) * d;
      for (int64_t i = 0; i < half; ++i) o[i] = xi[i] * cr[i] + (-xi[i + half]) * sr[i];
      for (int64_t i = half; i < d; ++i) o[i] = xi[i] * cr[i] + xi[i - half] * sr[i];
    }
  }
  return out;
}

at::Tensor silu_mul(const at::Tensor& gate_up) {
  check_fp32(gate_up, "gate_up");
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.stride(1) == 1 && gate_up.size(1) % 2 == 0,
              "gq_cpu: silu_mul takes gate_up [T, 2F] with unit column stride, got ", gate_up.sizes());
  const int64_t t = gate_up.size(0), f = gate_up.size(1) / 2;
  at::Tensor out = at::empty({t, f}, gate_up.options());
  for (int64_t r = 0; r < t; ++r) {
    const float* g = gate_up.data_ptr<float>() + r * gate_up.stride(0);
    float* o = out.data_ptr<float>() + r * f;
    for (int64_t c = 0; c < f; ++c) o[c] = g[c] / (1.0f + std::exp(-g[c])) * g[f + c];
  }
  return out;
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values, double scale) {
  check_fp32(q, "q");
  check_fp32(keys, "keys");
  check_fp32(values, "values");
  TORCH_CHECK(q.dim() == 2 && q.is_contiguous() && keys.dim() == 3 && values.sizes() == keys.sizes() &&
                  keys.stride(2) == 1 && values.stride(2) == 1 && keys.stride(1) == keys.size(2) &&
                  values.stride(1) == values.size(2) && keys.size(2) == q.size(1) && keys.size(0) >= 1 &&
                  q.size(0) % keys.size(0) == 0,
              "gq_cpu: decode_attention takes q [H, D] contiguous and keys, values [KV, S, D] with contiguous "
              "rows (H a multiple of KV), got ", q.sizes(), ", ", keys.sizes(), ", ", values.sizes());
  const int64_t nq = q.size(0), d = q.size(1), nkv = keys.size(0), s = keys.size(1), group = nq / nkv;
  at::Tensor out = at::empty({1, nq * d}, q.options());
  const float sc = static_cast<float>(scale);
  auto head = [&](int64_t h, std::vector<float>& p) {
    const float* qh = q.data_ptr<float>() + h * d;
    const float* kh = keys.data_ptr<float>() + (h / group) * keys.stride(0);
    const float* vh = values.data_ptr<float>() + (h / group) * values.stride(0);
    float* o = out.data_ptr<float>() + h * d;
    p.resize(s);
    float mx = -INFINITY;
    for (int64_t j = 0; j < s; ++j) {
      // Eight partial sums: independent adds the compiler can keep in one vector register.
      float part[8] = {};
      int64_t i = 0;
      for (; i + 8 <= d; i += 8)
        for (int l = 0; l < 8; ++l) part[l] += qh[i + l] * kh[j * d + i + l];
      float dot = 0.0f;
      for (; i < d; ++i) dot += qh[i] * kh[j * d + i];
      dot += ((part[0] + part[4]) + (part[2] + part[6])) + ((part[1] + part[5]) + (part[3] + part[7]));
      p[j] = dot * sc;
      mx = std::max(mx, p[j]);
    }
    float sum = 0.0f;
    for (int64_t j = 0; j < s; ++j) sum += (p[j] = std::exp(p[j] - mx));
    const float inv = 1.0f / sum;
    std::fill(o, o + d, 0.0f);
    for (int64_t j = 0; j < s; ++j) {
      const float pj = p[j] * inv;
      for (int64_t i = 0; i < d; ++i) o[i] += pj * vh[j * d + i];
    }
  };
  if (s == 0) return out.zero_();
  // Heads are independent; split them over threads only when each has enough work.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(s * d, 1));
  at::parallel_for(0, nq, grain, [&](int64_t h0, int64_t h1) {
    std::vector<float> p;
    for (int64_t h = h0; h < h1; ++h) head(h, p);
  });
  return out;
}

}  // namespace

// In place on z [K][p]: the butterflies of H_p on each of the K rows, then M z with M = H_K^T (or
// H_K when transposed), then the 1/sqrt(Kp) normalisation. tmp: K * p floats.
void hadamard_block(float* z, int64_t K, int64_t p, const float* hk, bool transpose, float* tmp) {
  for (int64_t k = 0; k < K; ++k) {
    float* row = z + k * p;
    for (int64_t h = 1; h < p; h *= 2)
      for (int64_t i = 0; i < p; i += 2 * h)
        for (int64_t j = i; j < i + h; ++j) {
          const float a = row[j], b = row[j + h];
          row[j] = a + b;
          row[j + h] = a - b;
        }
  }
  const float norm = 1.0f / std::sqrt(static_cast<float>(K * p));
  if (K == 1) {
    for (int64_t j = 0; j < p; ++j) z[j] *= norm;
    return;
  }
  std::fill(tmp, tmp + K * p, 0.0f);
  for (int64_t a = 0; a < K; ++a) {
    float* out = tmp + a * p;
    for (int64_t b = 0; b < K; ++b) {
      const float m = transpose ? hk[a * K + b] : hk[b * K + a];
      const float* in = z + b * p;
      for (int64_t j = 0; j < p; ++j) out[j] += m * in[j];
    }
  }
  for (int64_t j = 0; j < K * p; ++j) z[j] = tmp[j] * norm;
}

at::Tensor hadamard(const at::Tensor& x, const std::optional<at::Tensor>& signs, const std::optional<at::Tensor>& hk,
                    int64_t blocks, bool transpose, const std::optional<at::Tensor>& scale) {
  check_fp32(x, "x");
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "gq_cpu: hadamard takes x [T, n] with unit column stride, got ",
              x.sizes());
  const int64_t t = x.size(0), n = x.size(1);
  TORCH_CHECK(blocks >= 1 && n % blocks == 0, "gq_cpu: ", blocks, " Hadamard blocks do not divide ", n);
  const int64_t nb = n / blocks;
  const int64_t K = hk.has_value() ? hk->size(0) : 1;
  TORCH_CHECK(nb % K == 0 && ((nb / K) & (nb / K - 1)) == 0, "gq_cpu: a block of ", nb, " is not K * 2^a for K=", K);
  if (hk.has_value()) {
    check_fp32(*hk, "hk");
    TORCH_CHECK(hk->dim() == 2 && hk->size(1) == K && hk->is_contiguous(), "gq_cpu: hk must be [K, K], got ",
                hk->sizes());
  }
  for (const auto* v : {&signs, &scale}) {
    if (v->has_value()) {
      check_fp32(**v, "signs / scale");
      TORCH_CHECK((*v)->dim() == 1 && (*v)->size(0) == n && (*v)->is_contiguous(), "gq_cpu: signs and scale must be [",
                  n, "], got ", (*v)->sizes());
    }
  }
  const int64_t p = nb / K;
  at::Tensor out = at::empty({t, n}, x.options());
  const float* sg = signs.has_value() ? signs->data_ptr<float>() : nullptr;
  const float* sc = scale.has_value() ? scale->data_ptr<float>() : nullptr;
  const float* h = hk.has_value() ? hk->data_ptr<float>() : nullptr;
  at::parallel_for(0, t, std::max<int64_t>(1, 16384 / std::max<int64_t>(n, 1)), [&](int64_t r0, int64_t r1) {
    std::vector<float> tmp(K > 1 ? nb : 0);
    for (int64_t r = r0; r < r1; ++r) {
      const float* xr = x.data_ptr<float>() + r * x.stride(0);
      float* o = out.data_ptr<float>() + r * n;
      for (int64_t j = 0; j < n; ++j) o[j] = sg ? xr[j] * sg[j] : xr[j];
      for (int64_t b = 0; b < blocks; ++b) hadamard_block(o + b * nb, K, p, h, transpose, tmp.data());
      if (sc)
        for (int64_t j = 0; j < n; ++j) o[j] *= sc[j];
    }
  });
  return out;
}

TORCH_LIBRARY_FRAGMENT(gq_cpu, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("rope(Tensor x, Tensor cos, Tensor sin) -> Tensor");
  m.def("silu_mul(Tensor gate_up) -> Tensor");
  m.def("decode_attention(Tensor q, Tensor keys, Tensor values, float scale) -> Tensor");
  m.def("hadamard(Tensor x, Tensor? signs, Tensor? hk, int blocks, bool transpose, Tensor? scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(gq_cpu, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("rope", &rope);
  m.impl("silu_mul", &silu_mul);
  m.impl("decode_attention", &decode_attention);
  m.impl("hadamard", &hadamard);
}
