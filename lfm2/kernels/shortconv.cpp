// LFM2's gated short convolution (see lfm2/models/lfm2.py, ShortConv), fused, for any number of tokens.
//
// With in_proj's output split as (B, C, H) along the channels, for each token t of a row:
//   u_t = B_t * H_t;  v_t = sum_k w[k] u_{t-(L-1)+k} (+ bias), u before the input from the state;
//   y_t = C_t * v_t;  state <- the last L-1 values of u (the old state, then u_0 .. u_{T-1})
// In PyTorch this is a dozen dispatched operations (chunk, products, transposes, a concatenation,
// the state copy, a depthwise conv1d) around a few multiply-adds a value: at decode, 10 of
// LFM2-350M's 16 layers paid about 10 calls each per token for arithmetic that takes a microsecond
// here, and at prefill oneDNN's depthwise conv of a 512-token (1024, T) input alone took ~5 ms a
// layer, where this pass takes well under one.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <vector>

namespace {

// bch (B, T, 3d) in_proj's output, contiguous; state (B, d, L-1), each row's channels contiguous,
// updated in place to the state after the row's last token; weight (d, 1, L) or (d, L); bias (d)
// or none. Returns y (B, T, d).
at::Tensor short_conv(const at::Tensor& bch, at::Tensor& state, const at::Tensor& weight,
                      const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(bch.scalar_type() == at::kFloat && state.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat,
              "lfm2 short_conv: tensors must be float32");
  TORCH_CHECK(bch.device().is_cpu() && state.device().is_cpu() && weight.device().is_cpu(),
              "lfm2 short_conv: tensors must be on the CPU");
  TORCH_CHECK(bch.is_contiguous() && bch.dim() == 3 && bch.size(-1) % 3 == 0,
              "lfm2 short_conv: bch must be contiguous (B, T, 3d), got ", bch.sizes());
  const int64_t rows = bch.size(0), T = bch.size(1), d = bch.size(2) / 3;
  TORCH_CHECK(state.dim() == 3 && state.size(0) == rows && state.size(1) == d && state.size(2) >= 1 &&
                  state.stride(2) == 1 && state.stride(1) == state.size(2),
              "lfm2 short_conv: state must be (", rows, ", ", d, ", L-1) with contiguous rows, got ",
              state.sizes());
  const int64_t L1 = state.size(2), taps = L1 + 1;
  TORCH_CHECK(weight.numel() == d * taps, "lfm2 short_conv: weight must hold (", d, ", ", taps, ") taps, got ",
              weight.sizes());
  const at::Tensor wt = weight.reshape({d, taps}).t().contiguous();  // (taps, d): a tap's weights contiguous
  at::Tensor bv;
  if (bias.has_value()) {
    bv = bias->contiguous();
    TORCH_CHECK(bv.scalar_type() == at::kFloat && bv.numel() == d, "lfm2 short_conv: bias must be float32 (d)");
  }
  at::Tensor y = at::empty({rows, T, d}, bch.options());
  const float* in = bch.data_ptr<float>();
  const float* wp = wt.data_ptr<float>();
  const float* bp = bv.defined() ? bv.data_ptr<float>() : nullptr;
  float* sp = state.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t srow = state.stride(0);
  const int64_t grain = std::max<int64_t>(1, 16384 / d);
  at::parallel_for(0, rows * T, grain, [&](int64_t i0, int64_t i1) {
    std::vector<float> u(d);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t r = i / T, t = i % T;
      float* __restrict__ out = yp + i * d;
      for (int64_t ch = 0; ch < d; ++ch) out[ch] = bp ? bp[ch] : 0.f;
      for (int64_t k = 0; k < taps; ++k) {
        const int64_t j = t - L1 + k;  // the token this tap reads; before 0: the state
        const float* __restrict__ w = wp + k * d;
        if (j >= 0) {
          const float* __restrict__ b = in + (r * T + j) * 3 * d;
          const float* __restrict__ h = b + 2 * d;
          for (int64_t ch = 0; ch < d; ++ch) out[ch] += w[ch] * (b[ch] * h[ch]);
        } else {
          const float* s = sp + r * srow + (L1 + j);
          for (int64_t ch = 0; ch < d; ++ch) u[ch] = s[ch * L1];
          for (int64_t ch = 0; ch < d; ++ch) out[ch] += w[ch] * u[ch];
        }
      }
      const float* __restrict__ c = in + i * 3 * d + d;
      for (int64_t ch = 0; ch < d; ++ch) out[ch] *= c[ch];
    }
  });
  // The new state: slot k holds u at token T - L1 + k, from the old state where that is before 0
  // (slot T + k, read before this loop overwrites it, since k < T + k).
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t k = 0; k < L1; ++k) {
      const int64_t j = T - L1 + k;
      float* s = sp + r * srow + k;
      if (j >= 0) {
        const float* b = in + (r * T + j) * 3 * d;
        for (int64_t ch = 0; ch < d; ++ch) s[ch * L1] = b[ch] * b[2 * d + ch];
      } else {
        for (int64_t ch = 0; ch < d; ++ch) s[ch * L1] = s[ch * L1 + T];
      }
    }
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lfm2_quant, m) {
  m.def("short_conv(Tensor bch, Tensor(a!) state, Tensor weight, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(lfm2_quant, CPU, m) { m.impl("short_conv", &short_conv); }
