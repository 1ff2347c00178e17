// RMSNorm over the last dimension of a float32 tensor, one pass a row (see lfm2/models/lfm2.py, RMSNorm):
//   y = x / sqrt(mean(x^2) + eps) * weight
// PyTorch's CPU `rms_norm` runs it as five or six whole-tensor operations (square, mean, add, rsqrt
// and two products), each writing a tensor the size of x: at a 512-token prefill of LFM2-350M its
// 45 norms took ~40 ms, most of it memory traffic and page faults of the temporaries.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

namespace {

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat && x.device().is_cpu() &&
                  weight.device().is_cpu(),
              "lfm2 rms_norm: x and weight must be float32 CPU tensors");
  TORCH_CHECK(x.is_contiguous() && x.dim() >= 1 && weight.is_contiguous() && weight.dim() == 1 &&
                  weight.size(0) == x.size(-1),
              "lfm2 rms_norm: x must be contiguous (..., D) and weight (D), got ", x.sizes(), " and ",
              weight.sizes());
  const int64_t D = x.size(-1), rows = D ? x.numel() / D : 0;
  at::Tensor y = at::empty_like(x);
  const float* xp = x.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  constexpr int kLanes = 16;  // independent partial sums: the loop vectorizes without reassociation
  at::parallel_for(0, rows, std::max<int64_t>(1, 32768 / std::max<int64_t>(D, 1)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* __restrict__ row = xp + r * D;
      float* __restrict__ out = yp + r * D;
      float part[kLanes] = {};
      int64_t i = 0;
      for (; i + kLanes <= D; i += kLanes)
        for (int l = 0; l < kLanes; ++l) part[l] += row[i + l] * row[i + l];
      float sum = 0.f;
      for (; i < D; ++i) sum += row[i] * row[i];
      for (int l = 0; l < kLanes; ++l) sum += part[l];
      const float inv = 1.f / std::sqrt(sum / static_cast<float>(D) + static_cast<float>(eps));
      for (int64_t j = 0; j < D; ++j) out[j] = row[j] * inv * wp[j];
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lfm2_quant, m) { m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor"); }

TORCH_LIBRARY_IMPL(lfm2_quant, CPU, m) { m.impl("rms_norm", &rms_norm); }
