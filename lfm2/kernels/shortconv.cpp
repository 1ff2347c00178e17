// One decode step of LFM2's gated short convolution (see lfm2/models/lfm2.py, ShortConv), fused.
//
// For one new token per row, with in_proj's output split as (B, C, H) along the channels:
//   u = B * H;  v = sum_k state[k] w[k] + u w[L-1] (+ bias);  y = C * v;  state <- (state[1:], u)
// In PyTorch this is a dozen dispatched operations (chunk, products, transposes, a concatenation,
// the state copy, a sum) around a few thousand multiply-adds: at decode, 10 of LFM2-350M's 16
// layers paid about 10 calls each per token for arithmetic that takes a microsecond here.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <optional>

namespace {

// bch (R, 3d) rows of in_proj's output (any leading shape, contiguous); state (R, d, L-1), each
// row's channels contiguous; weight (d, 1, L) or (d, L); bias (d) or none. Returns y (..., d).
at::Tensor short_conv_step(const at::Tensor& bch, at::Tensor& state, const at::Tensor& weight,
                           const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(bch.scalar_type() == at::kFloat && state.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat,
              "lfm2 short_conv_step: tensors must be float32");
  TORCH_CHECK(bch.device().is_cpu() && state.device().is_cpu() && weight.device().is_cpu(),
              "lfm2 short_conv_step: tensors must be on the CPU");
  TORCH_CHECK(bch.is_contiguous() && bch.dim() >= 1 && bch.size(-1) % 3 == 0,
              "lfm2 short_conv_step: bch must be contiguous (..., 3d)");
  const int64_t d = bch.size(-1) / 3, rows = bch.numel() / (3 * d);
  TORCH_CHECK(state.dim() == 3 && state.size(0) == rows && state.size(1) == d && state.stride(2) == 1 &&
                  state.stride(1) == state.size(2),
              "lfm2 short_conv_step: state must be (", rows, ", ", d, ", L-1) with contiguous rows, got ",
              state.sizes());
  const int64_t taps = state.size(2) + 1;
  const at::Tensor w = weight.contiguous();
  TORCH_CHECK(w.numel() == d * taps, "lfm2 short_conv_step: weight must hold (", d, ", ", taps, ") taps, got ",
              weight.sizes());
  at::Tensor bv;
  if (bias.has_value()) {
    bv = bias->contiguous();
    TORCH_CHECK(bv.scalar_type() == at::kFloat && bv.numel() == d, "lfm2 short_conv_step: bias must be float32 (d)");
  }
  std::vector<int64_t> sizes = bch.sizes().vec();
  sizes.back() = d;
  at::Tensor y = at::empty(sizes, bch.options());
  const float* in = bch.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  const float* bp = bv.defined() ? bv.data_ptr<float>() : nullptr;
  float* sp = state.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t row_stride = state.stride(0);
  for (int64_t r = 0; r < rows; ++r) {
    const float* x = in + r * 3 * d;
    float* s = sp + r * row_stride;
    for (int64_t ch = 0; ch < d; ++ch) {
      const float u = x[ch] * x[2 * d + ch];
      float* sc = s + ch * (taps - 1);
      const float* wc = wp + ch * taps;
      float v = 0.f;
      for (int64_t k = 0; k + 1 < taps; ++k) v += sc[k] * wc[k];
      v += u * wc[taps - 1];
      if (bp) v += bp[ch];
      for (int64_t k = 0; k + 2 < taps; ++k) sc[k] = sc[k + 1];
      sc[taps - 2] = u;
      yp[r * d + ch] = x[d + ch] * v;
    }
  }
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lfm2_quant, m) {
  m.def("short_conv_step(Tensor bch, Tensor(a!) state, Tensor weight, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(lfm2_quant, CPU, m) { m.impl("short_conv_step", &short_conv_step); }
