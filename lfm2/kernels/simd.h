// Small SIMD helpers shared by lfm2's kernels (qgemv.cpp, attention.cpp).
#pragma once

#if defined(__AVX2__)
#include <immintrin.h>

namespace lfm2_simd {

// The sum of a vector's eight floats.
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

}  // namespace lfm2_simd
#endif
