// Activations quantized to int8 per block of 32, shared by lfm2's quantized kernels (qgemv.cpp for
// the int8/int4 formats, kquant.cpp for GGUF's K-quants): x ~ q * d, each block of 32 values with
// its own float scale d = max|x| / 127 and values rounded to nearest even, plus each block's sum
// of q (for weights with a zero point or a minimum). Block dot products against such activations
// are exact integer sums; only the per-block scaling is float.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define LFM2_AVX2 1
#else
#define LFM2_AVX2 0
#endif

namespace lfm2_act {

constexpr int64_t kBlock = 32;  // values per block: of int4 packing, and of activation quantization

// The rows of a product's input x (..., K): float32, contiguous, on the CPU, K columns. Any leading
// shape, so that a model's (B, T, K) activations need no reshape around the call (at decode, two
// reshapes per layer call were a quarter of the step's dispatched operations).
inline int64_t input_rows(const at::Tensor& x, int64_t k, const char* op) {
  TORCH_CHECK(x.dim() >= 1 && x.scalar_type() == at::kFloat && x.is_contiguous() && x.device().is_cpu(), "lfm2 ",
              op, ": x must be a contiguous float32 (..., K) CPU tensor");
  TORCH_CHECK(x.size(-1) == k, "lfm2 ", op, ": x has ", x.size(-1), " columns, the weight K=", k);
  return x.numel() / k;
}

// The output (..., N) of a product with input x (..., K).
inline at::Tensor output_for(const at::Tensor& x, int64_t n) {
  std::vector<int64_t> sizes = x.sizes().vec();
  sizes.back() = n;
  return at::empty(sizes, x.options());
}

inline float half_to_float(at::Half h) {
#if LFM2_AVX2
  return _cvtsh_ss(h.x);
#else
  return static_cast<float>(h);
#endif
}

// Activations quantized per block of 32: x ~ q * d. Only whole blocks; a ragged tail stays float.
struct QActivations {
  std::vector<int8_t> q;      // (M, nb * 32)
  std::vector<int8_t> pairs;  // int4, SIMD: pairs of blocks b, b+1 as b[0:16] b+1[0:16] b[16:32] b+1[16:32]
  std::vector<float> d;       // (M, nb): each block's scale
  std::vector<int32_t> sum;   // (M, nb): sum of the block's q, for int4's zero point of 8
  int64_t nb = 0;
};

// ---------------------------------------------------------------------------------------------
// Activation quantization

#if LFM2_AVX2

inline int32_t hsum_i32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

// Four vectors of 8 int32 values (each in int8's range) stored as 32 bytes in order at q, as the
// unsigned bytes q + 128 with kUnsigned (what the VNNI GEMMs multiply); returns their sum.
template <bool kUnsigned>
inline int32_t store_q32(const __m256i i[4], int8_t* q) {
  // The packs work within 128-bit lanes; the permutation puts the values back in order.
  const __m256i p8 = _mm256_packs_epi16(_mm256_packs_epi32(i[0], i[1]), _mm256_packs_epi32(i[2], i[3]));
  __m256i out = _mm256_permutevar8x32_epi32(p8, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
  if (kUnsigned) out = _mm256_xor_si256(out, _mm256_set1_epi8(static_cast<char>(0x80)));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(q), out);
  return hsum_i32(_mm256_add_epi32(_mm256_add_epi32(i[0], i[1]), _mm256_add_epi32(i[2], i[3])));
}

// A block's 32 values rounded to integers of int8's range, as four vectors of 8 int32; returns its scale.
inline float block_values(const float* x, __m256i i[4]) {
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  __m256 v[4];
  __m256 amax = _mm256_setzero_ps();
  for (int j = 0; j < 4; ++j) {
    v[j] = _mm256_loadu_ps(x + 8 * j);
    amax = _mm256_max_ps(amax, _mm256_and_ps(v[j], abs_mask));
  }
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  const float d = _mm_cvtss_f32(m) / 127.f;
  const __m256 id = _mm256_set1_ps(d > 0.f ? 1.f / d : 0.f);
  for (int j = 0; j < 4; ++j) i[j] = _mm256_cvtps_epi32(_mm256_mul_ps(v[j], id));  // nearest even
  return d;
}

template <bool kUnsigned = false>
inline void quantize_block(const float* x, int8_t* q, float* d_out, int32_t* sum_out) {
  __m256i i[4];
  *d_out = block_values(x, i);
  *sum_out = store_q32<kUnsigned>(i, q);
}

#else

template <bool kUnsigned = false>
inline void quantize_block(const float* x, int8_t* q, float* d_out, int32_t* sum_out) {
  float amax = 0.f;
  for (int64_t j = 0; j < kBlock; ++j) amax = std::max(amax, std::fabs(x[j]));
  const float d = amax / 127.f;
  const float id = d > 0.f ? 1.f / d : 0.f;
  int32_t sum = 0;
  for (int64_t j = 0; j < kBlock; ++j) {
    const int32_t v = static_cast<int32_t>(std::nearbyint(x[j] * id));
    q[j] = static_cast<int8_t>(kUnsigned ? v ^ 0x80 : v);
    sum += v;
  }
  *d_out = d;
  *sum_out = sum;
}

#endif

inline QActivations quantize_activations(const float* x, int64_t m_rows, int64_t k, int bits) {
  QActivations a;
  a.nb = k / kBlock;
  const int64_t kp = a.nb * kBlock;
  a.q.resize(m_rows * kp);
  a.d.resize(m_rows * a.nb);
  a.sum.resize(m_rows * a.nb);
  // Rows in parallel: at a prefill this is the whole (tokens, K) input of every product.
  at::parallel_for(0, m_rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(k, 1)), [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m)
      for (int64_t b = 0; b < a.nb; ++b)
        quantize_block(x + m * k + b * kBlock, a.q.data() + m * kp + b * kBlock, &a.d[m * a.nb + b],
                       &a.sum[m * a.nb + b]);
  });
  if (LFM2_AVX2 && bits == 4) {
    // One 32-byte load of int4 weights holds blocks b and b+1; its low nibbles are values 0..15
    // of both, its high nibbles values 16..31. Lay the activations out to match.
    a.pairs.resize(a.q.size());
    for (int64_t m = 0; m < m_rows; ++m) {
      for (int64_t b = 0; b + 1 < a.nb; b += 2) {
        const int8_t* src = a.q.data() + m * kp + b * kBlock;
        int8_t* dst = a.pairs.data() + m * kp + b * kBlock;
        std::memcpy(dst, src, 16);
        std::memcpy(dst + 16, src + 32, 16);
        std::memcpy(dst + 32, src + 16, 16);
        std::memcpy(dst + 48, src + 48, 16);
      }
    }
  }
  return a;
}

// x (M, K) for the VNNI GEMM (qgemv.cpp's `qgemm`): `quantize_block`'s values as unsigned bytes
// q + 128 (M, K) and each block's scale (M, K / 32), rows in parallel, straight into buffers that are
// not zero-filled first (at a prefill they are megabytes, written once).
struct UActivations {
  std::unique_ptr<uint8_t[]> xu;
  std::unique_ptr<float[]> d;
};

inline UActivations quantize_activations_u8(const float* x, int64_t m_rows, int64_t k) {
  const int64_t nb = k / kBlock;
  UActivations a{std::unique_ptr<uint8_t[]>(new uint8_t[m_rows * k]), std::unique_ptr<float[]>(new float[m_rows * nb])};
  at::parallel_for(0, m_rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(k, 1)), [&](int64_t m0, int64_t m1) {
    int32_t sum;
    for (int64_t m = m0; m < m1; ++m)
      for (int64_t b = 0; b < nb; ++b)
        quantize_block<true>(x + m * k + b * kBlock, reinterpret_cast<int8_t*>(a.xu.get()) + m * k + b * kBlock,
                             &a.d[m * nb + b], &sum);
  });
  return a;
}

#if LFM2_AVX2
// x (M, K) as `quantize_block`'s values in int16 (M, K) and each block's scale (M, K / 32): what qgemv.cpp's
// int16 Q8_0 GEMM (`gemm_tile16`) multiplies, in one pass rather than bytes widened afterwards.
struct WideActivations {
  std::unique_ptr<int16_t[]> x;
  std::unique_ptr<float[]> d;
};

inline WideActivations quantize_activations_i16(const float* x, int64_t m_rows, int64_t k) {
  const int64_t nb = k / kBlock;
  WideActivations a{std::unique_ptr<int16_t[]>(new int16_t[m_rows * k]),
                    std::unique_ptr<float[]>(new float[m_rows * nb])};
  at::parallel_for(0, m_rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(k, 1)), [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m)
      for (int64_t b = 0; b < nb; ++b) {
        __m256i i[4];
        a.d[m * nb + b] = block_values(x + m * k + b * kBlock, i);
        int16_t* q = a.x.get() + m * k + b * kBlock;
        for (int h = 0; h < 2; ++h)  // packs works within 128-bit lanes: its 64-bit quarters 0, 2, 1, 3 are in order
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + 16 * h),
                              _mm256_permute4x64_epi64(_mm256_packs_epi32(i[2 * h], i[2 * h + 1]), 0xD8));
      }
  });
  return a;
}
#endif

}  // namespace lfm2_act
