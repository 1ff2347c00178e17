// Small SIMD helpers shared by lfm2's kernels (qgemv.cpp, kquant.cpp, attention.cpp, moe.cpp).
#pragma once

#if defined(__AVX2__)
#include <immintrin.h>

#include <cstdint>
#include <cstring>

namespace lfm2_simd {

// The sum of a vector's eight floats.
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// One block of the VNNI GEMMs (qgemv.cpp's `qgemm`, kquant.cpp's `kgemm`): G groups of 4 values of a
// packed weight tile (64 bytes a group: 4 values of each of 16 rows) against MR activation rows of
// bytes xu (stride kp, at the block's first value). isum[r] gets the 16 rows' exact integer dot
// products with row r: one broadcast of 4 activation bytes and one vpdpbusd per group and row.
// vpdpbusd multiplies unsigned by signed bytes: by default the activations are the unsigned ones
// (q + 128, the caller takes 128 x the weights' sums off); with kUnsignedWeights the weights are
// (Q4_K / Q5_K values, 0..31) and the activations signed, and the sums need no correction.
template <int MR, int G, bool kUnsignedWeights = false>
__attribute__((target("avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni"), always_inline)) inline void
vnni_block(const int8_t* wq, const uint8_t* xu, int64_t kp, __m512i isum[MR]) {
  for (int r = 0; r < MR; ++r) isum[r] = _mm512_setzero_si512();
  for (int g = 0; g < G; ++g) {
    const __m512i w = _mm512_loadu_si512(wq + g * 64);
    for (int r = 0; r < MR; ++r) {
      int32_t four;
      std::memcpy(&four, xu + r * kp + 4 * g, 4);
      isum[r] = kUnsignedWeights ? _mm512_dpbusd_epi32(isum[r], w, _mm512_set1_epi32(four))
                                 : _mm512_dpbusd_epi32(isum[r], _mm512_set1_epi32(four), w);
    }
  }
}

}  // namespace lfm2_simd
#endif

namespace lfm2_simd {

// Whether this CPU runs the VNNI GEMMs (qgemv.cpp's `qgemm`, kquant.cpp's `kgemm`): AVX-512 VNNI, and
// the BW and VL instructions their packing uses. False where the SIMD code is not built.
inline bool cpu_has_vnni512() {
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl");
#else
  return false;
#endif
}

}  // namespace lfm2_simd
