// SwiGLU's gate at inference, in place and in one pass (see lfm2/models/lfm2.py, MLP):
//   gate = silu(gate) * up = gate * up / (1 + exp(-gate))
// PyTorch runs it as `silu_` then `mul_`: two passes over (tokens, hidden) float32 tensors. At a 512-token
// prefill of LFM2-350M on a Zen 1 core pair they took 45 + 17 ms of 4.9 s (docs/benchmarks.md); here each
// value is read and written once. exp is Cephes' single-precision `expf` (range reduction by ln 2 in two
// parts, a degree-5 polynomial, the exponent added as an integer), vectorized. silu(x) comes out within
// 2.9 ulp of its exact value over [-88, 88] (PyTorch's: 2.2; 2M points, float64 reference).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

#include "simd.h"
#define LFM2_SWIGLU_AVX2 1
#else
#define LFM2_SWIGLU_AVX2 0
#endif

namespace {

#if LFM2_SWIGLU_AVX2
// exp(x) for 8 floats (`lfm2_simd::exp_reduced`, times 2^n). Inputs are clamped to [-87.3, 88.7]: below, the
// result would be denormal (exp(-87.3) is about FLT_MIN), and silu then gives x * 1 / (1 + huge) = -0.0 either
// way; above, exp overflows to inf, as std::exp does.
inline __m256 exp8(__m256 x) {
  const __m256 hi = _mm256_set1_ps(88.7228391f), lo = _mm256_set1_ps(-87.3365479f);
  const __m256 inf_mask = _mm256_cmp_ps(x, hi, _CMP_GT_OQ);
  __m256i n;
  const __m256 p = lfm2_simd::exp_reduced(_mm256_max_ps(_mm256_min_ps(x, hi), lo), &n);
  // 2^n in two factors: n reaches 128 at the top of the range, one past the largest exponent.
  const __m256i half = _mm256_srai_epi32(n, 1);
  const __m256 e = _mm256_mul_ps(_mm256_mul_ps(p, lfm2_simd::pow2(half)), lfm2_simd::pow2(_mm256_sub_epi32(n, half)));
  return _mm256_blendv_ps(e, _mm256_set1_ps(INFINITY), inf_mask);
}
#endif

inline float silu_times(float g, float u) { return g * u / (1.f + std::exp(-g)); }

at::Tensor swiglu_(at::Tensor gate, const at::Tensor& up) {
  TORCH_CHECK(gate.scalar_type() == at::kFloat && up.scalar_type() == at::kFloat && gate.device().is_cpu() &&
                  up.device().is_cpu(),
              "lfm2 swiglu_: gate and up must be float32 CPU tensors");
  TORCH_CHECK(gate.is_contiguous() && up.is_contiguous() && gate.sizes() == up.sizes(),
              "lfm2 swiglu_: gate and up must be contiguous and of one shape, got ", gate.sizes(), " and ",
              up.sizes());
  float* g = gate.data_ptr<float>();
  const float* u = up.data_ptr<float>();
  at::parallel_for(0, gate.numel(), 16384, [&](int64_t i0, int64_t i1) {
    int64_t i = i0;
#if LFM2_SWIGLU_AVX2
    const __m256 one = _mm256_set1_ps(1.f), sign = _mm256_set1_ps(-0.f);
    for (; i + 8 <= i1; i += 8) {
      const __m256 x = _mm256_loadu_ps(g + i);
      const __m256 d = _mm256_add_ps(one, exp8(_mm256_xor_ps(x, sign)));
      _mm256_storeu_ps(g + i, _mm256_div_ps(_mm256_mul_ps(x, _mm256_loadu_ps(u + i)), d));
    }
#endif
    for (; i < i1; ++i) g[i] = silu_times(g[i], u[i]);
  });
  return gate;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lfm2_quant, m) { m.def("swiglu_(Tensor(a!) gate, Tensor up) -> Tensor(a!)"); }

TORCH_LIBRARY_IMPL(lfm2_quant, CPU, m) { m.impl("swiglu_", &swiglu_); }
