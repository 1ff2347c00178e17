// GGUF K-quant weights (Q4_K, Q5_K, Q6_K) used as they are stored: a matrix-vector product for
// decode (`kgemv`) and row dequantization for prefill tiles and embedding lookups (`kdequantize`).
// See lfm2/kquant.py.
//
// The block layouts (llama.cpp's ggml-common.h; gguf-py's gguf/quants.py reads them the same way),
// each a super-block of 256 values of one weight row:
// - Q4_K, 144 bytes: d, dmin (float16); 12 bytes of 6-bit scales and mins for 8 sub-blocks of 32;
//   128 bytes of nibbles. Bytes 32i..32i+31 hold sub-block 2i in their low nibbles and 2i+1 in
//   their high nibbles. w = d * sc[s] * q - dmin * m[s], q in 0..15.
// - Q5_K, 176 bytes: d, dmin; the same 12 scale bytes; qh (32 bytes: bit s of byte l is the fifth
//   bit of value l of sub-block s); the 128 nibble bytes as in Q4_K. q in 0..31.
// - Q6_K, 210 bytes: ql (128 bytes of low nibbles), qh (64 bytes of 2-bit high parts), 16 int8
//   scales (one per 16 values), d (float16). Each half of 128 values takes 64 ql bytes and 32 qh
//   bytes: value l + 32j of the half (l < 32, j < 4) is nibble (j / 2) of ql[l + 32 (j % 2)], with
//   bits 2j..2j+1 of qh[l] above it; w = d * sc[(l + 32j) / 16] * (q - 32), q in 0..63.
//
// Numerics of `kgemv`, as llama.cpp's K-quant products (its Q8_K activations): each row of
// activations is quantized to int8 per super-block of 256 values, with one float scale
// xd = max|x| / 127 (round to nearest even), and each sub-block's sum of int8 activations is kept.
// A super-block's dot product is then exact in integers with the 6/8-bit scales folded in, and
// only two float multiply-adds per super-block remain:
//   Q4_K / Q5_K: xd (d sum_s sc_s isum_s - dmin sum_s m_s xsum_s);   Q6_K: xd d sum_g sc_g isum_g,
// with Q6_K's -32 applied to the weights before the products. (Per-256 activation scales are
// coarser than the per-32 ones of lfm2's int8/int4 GEMV, but what lets the scales stay integer;
// tests/test_kquant.py measures the error against the float product.)

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#endif
#include "activations.h"
#include "simd.h"  // its SIMD helpers only where the SIMD code is built
#include "moe_slots.h"

namespace {

using lfm2_act::half_to_float;

constexpr int64_t kSuper = 256;           // values per super-block
constexpr int64_t kPrefetchBytes = 2048;  // how far ahead the GEMV asks for weights
// GGML type ids (ggml.h), lfm2's own id for Q4_K in tiles of kTile rows (see "Q4_K in tiles of 16 rows"),
// and each super-block's bytes.
constexpr int64_t kQ4K = 12, kQ5K = 13, kQ6K = 14, kQ4KX16 = 112;
constexpr int kTile = 16;  // weight rows per packed tile (kgemm's, and Q4_K's): one vector of 16 int32 lanes

int64_t block_bytes(int64_t type) {
  return type == kQ4K || type == kQ4KX16 ? 144 : type == kQ5K ? 176 : type == kQ6K ? 210 : 0;
}

// Small helpers are forced inline: GCC does not inline them into the AVX-512 functions (a different
// target) by itself, and a call per super-block costs a fifth of the Q4_K product.
#define LFM2_INLINE inline __attribute__((always_inline))

LFM2_INLINE float f16_at(const uint8_t* p) {
  at::Half h;
  std::memcpy(&h, p, 2);
  return half_to_float(h);
}

// The 8 6-bit scales and 8 6-bit mins of a Q4_K / Q5_K super-block, from its 12 scale bytes q:
// sub-block j < 4 has sc = q[j] & 63, m = q[j + 4] & 63; j >= 4 has sc = (q[j + 4] & 15) | (q[j - 4] >> 6) << 4
// and m = (q[j + 4] >> 4) | (q[j] >> 6) << 4. Done four bytes at a time on 32-bit words.
LFM2_INLINE void scales_mins(const uint8_t* q, uint8_t sc[8], uint8_t m[8]) {
  uint32_t u[3];
  std::memcpy(u, q, 12);
  const uint32_t low6 = 0x3f3f3f3f, low4 = 0x0f0f0f0f, low2 = 0x03030303;
  const uint32_t s0 = u[0] & low6, s1 = (u[2] & low4) | (((u[0] >> 6) & low2) << 4);
  const uint32_t m0 = u[1] & low6, m1 = ((u[2] >> 4) & low4) | (((u[1] >> 6) & low2) << 4);
  std::memcpy(sc, &s0, 4);
  std::memcpy(sc + 4, &s1, 4);
  std::memcpy(m, &m0, 4);
  std::memcpy(m + 4, &m1, 4);
}

// The same 8 scales and 8 mins, each set as the 8 bytes of one integer (what the SIMD code loads).
LFM2_INLINE void scales_mins_packed(const uint8_t* q, int64_t* sc8, int64_t* mn8) {
  uint8_t sc[8], m[8];
  scales_mins(q, sc, m);
  std::memcpy(sc8, sc, 8);
  std::memcpy(mn8, m, 8);
}

// A super-block's factors: w[i] = scale[i / 16] * v[i] - minv[i / 16] for its integer values v.
void factors(int64_t type, const uint8_t* blk, float scale[16], float minv[16]) {
  if (type == kQ6K) {
    const int8_t* sc = reinterpret_cast<const int8_t*>(blk + 192);
    const float d = f16_at(blk + 208);
    for (int g = 0; g < 16; ++g) {
      scale[g] = d * static_cast<float>(sc[g]);
      minv[g] = 0.f;
    }
    return;
  }
  const float d = f16_at(blk), dmin = f16_at(blk + 2);
  uint8_t sc[8], m[8];
  scales_mins(blk + 4, sc, m);
  for (int g = 0; g < 16; ++g) {
    scale[g] = d * static_cast<float>(sc[g / 2]);
    minv[g] = dmin * static_cast<float>(m[g / 2]);
  }
}

// A super-block's integer values, in order, one at a time: the reference for the SIMD code.
void unpack_values(int64_t type, const uint8_t* blk, int8_t v[kSuper]) {
  if (type == kQ6K) {
    const uint8_t* ql = blk;
    const uint8_t* qh = blk + 128;
    for (int h = 0; h < 2; ++h)
      for (int l = 0; l < 32; ++l)
        for (int j = 0; j < 4; ++j) {
          const uint8_t lo = ql[64 * h + l + 32 * (j % 2)];
          const int q = ((j < 2 ? lo & 15 : lo >> 4) | (((qh[32 * h + l] >> (2 * j)) & 3) << 4));
          v[128 * h + 32 * j + l] = static_cast<int8_t>(q - 32);
        }
    return;
  }
  const uint8_t* qh = type == kQ5K ? blk + 16 : nullptr;
  const uint8_t* qs = blk + (type == kQ5K ? 48 : 16);
  for (int i = 0; i < 4; ++i)
    for (int l = 0; l < 32; ++l) {
      int lo = qs[32 * i + l] & 15, hi = qs[32 * i + l] >> 4;
      if (qh) {
        lo |= ((qh[l] >> (2 * i)) & 1) << 4;
        hi |= ((qh[l] >> (2 * i + 1)) & 1) << 4;
      }
      v[64 * i + l] = static_cast<int8_t>(lo);
      v[64 * i + 32 + l] = static_cast<int8_t>(hi);
    }
}

// Activations quantized per super-block: q (M, K) int8, d (M, K/256), bsum (M, K/32) the sums of
// q over each 32 values (for Q4_K / Q5_K's mins).
struct KActivations {
  std::vector<int8_t> q;
  std::vector<float> d;
  std::vector<int16_t> bsum;
  // For the AVX-512 code only: q with each 128 values' 32-value quarters in the order 0, 2, 1, 3
  // (to match Q4_K / Q5_K nibbles, see superblock_q45_512), and the sums of q over each 16 values.
  std::vector<int8_t> q_0213;
  std::vector<int16_t> bsum16;
};

// One super-block of 256 activations to int8 with one scale (returned), as described above, and
// the sums of each 32 values' q. With kUnsigned the values are stored as unsigned bytes q + 128.
template <bool kUnsigned = false, typename Sum = int16_t>
LFM2_INLINE float quantize_superblock(const float* xs, int8_t* q, Sum* bsum) {
#if LFM2_AVX2
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  __m256 vmax = _mm256_setzero_ps();
  for (int64_t j = 0; j < kSuper; j += 8) vmax = _mm256_max_ps(vmax, _mm256_and_ps(_mm256_loadu_ps(xs + j), abs_mask));
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(vmax), _mm256_extractf128_ps(vmax, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  const float d = _mm_cvtss_f32(m) / 127.f;
  const __m256 id = _mm256_set1_ps(d > 0.f ? 1.f / d : 0.f);
  for (int s = 0; s < 8; ++s) {
    __m256i i[4];
    for (int j = 0; j < 4; ++j) i[j] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xs + 32 * s + 8 * j), id));
    bsum[s] = static_cast<Sum>(lfm2_act::store_q32<kUnsigned>(i, q + 32 * s));
  }
  return d;
#else
  float amax = 0.f;
  for (int64_t j = 0; j < kSuper; ++j) amax = std::max(amax, std::fabs(xs[j]));
  const float d = amax / 127.f, id = d > 0.f ? 1.f / d : 0.f;
  for (int s = 0; s < 8; ++s) {
    int32_t sum = 0;
    for (int j = 32 * s; j < 32 * s + 32; ++j) {
      const int32_t v = static_cast<int32_t>(std::nearbyint(xs[j] * id));
      q[j] = static_cast<int8_t>(kUnsigned ? v ^ 0x80 : v);
      sum += v;
    }
    bsum[s] = static_cast<Sum>(sum);
  }
  return d;
#endif
}

// All rows' super-blocks, in parallel: at a 512-token prefill this is 0.5-2.4M values a product. `wide`: also
// what the AVX-512 code reads; `sums16`: the sums of each 16 values (Q6_K's products, AVX2 and AVX-512).
KActivations quantize_activations_k(const float* x, int64_t m_rows, int64_t k, bool wide, bool sums16) {
  KActivations a;
  a.q.resize(m_rows * k);
  a.d.resize(m_rows * k / kSuper);
  a.bsum.resize(m_rows * k / 32);
  sums16 = sums16 || wide;
  if (wide) a.q_0213.resize(m_rows * k);
  if (sums16) a.bsum16.resize(m_rows * k / 16);
  at::parallel_for(0, m_rows * k / kSuper, 64, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      int8_t* q = a.q.data() + i * kSuper;
      a.d[i] = quantize_superblock(x + i * kSuper, q, a.bsum.data() + i * 8);
      if (wide) {
        static constexpr int order[4] = {0, 2, 1, 3};
        for (int c = 0; c < 8; ++c)  // 32-value chunk c of the super-block goes to position 4 (c / 4) + order[c % 4]
          std::memcpy(a.q_0213.data() + i * kSuper + 32 * (4 * (c / 4) + order[c % 4]), q + 32 * c, 32);
      }
      if (sums16)
        for (int g = 0; g < 16; ++g) {
          int32_t sum = 0;
          for (int j = 0; j < 16; ++j) sum += q[16 * g + j];
          a.bsum16[i * 16 + g] = static_cast<int16_t>(sum);
        }
    }
  });
  return a;
}

struct KMatrix {
  const uint8_t* q;
  int64_t n, k, type, row_bytes, nsb;  // nsb: super-blocks per row
};

// Weight row n against activation row m, one value at a time (builds without AVX2; the tests'
// reference for the SIMD code). The same integer sums as the SIMD code, so the same result up to
// the order of float additions.
float dot_scalar(const KMatrix& W, int64_t n, const KActivations& a, int64_t m) {
  const int8_t* xq = a.q.data() + m * W.k;
  int8_t v[kSuper];
  const int64_t bytes = block_bytes(W.type);
  float res = 0.f;
  for (int64_t sb = 0; sb < W.nsb; ++sb) {
    const uint8_t* blk = W.q + n * W.row_bytes + sb * bytes;
    unpack_values(W.type, blk, v);
    int32_t sumi = 0, summ = 0;
    if (W.type == kQ6K) {
      const int8_t* sc = reinterpret_cast<const int8_t*>(blk + 192);
      for (int i = 0; i < kSuper; ++i) sumi += sc[i / 16] * v[i] * xq[sb * kSuper + i];
    } else {
      uint8_t sc[8], mn[8];
      scales_mins(blk + 4, sc, mn);
      for (int i = 0; i < kSuper; ++i) sumi += sc[i / 32] * v[i] * xq[sb * kSuper + i];
      for (int s = 0; s < 8; ++s) summ += mn[s] * a.bsum[(m * W.nsb + sb) * 8 + s];
    }
    const float xd = a.d[m * W.nsb + sb];
    if (W.type == kQ6K) {
      res += xd * f16_at(blk + 208) * static_cast<float>(sumi);
    } else {
      res += xd * (f16_at(blk) * static_cast<float>(sumi) - f16_at(blk + 2) * static_cast<float>(summ));
    }
  }
  return res;
}

#if LFM2_AVX2

using lfm2_simd::hsum;

inline __m256i load256(const void* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }

LFM2_INLINE void prefetch_block(const uint8_t* blk, int64_t bytes) {
  for (int64_t off = 0; off < bytes; off += 64)
    _mm_prefetch(reinterpret_cast<const char*>(blk + kPrefetchBytes + off), _MM_HINT_T0);
}

// vpshufb control that copies int16 lane j of each 128-bit half into all eight lanes of that half
// (lo for the low half, hi for the high one).
inline __m256i spread16(int lo, int hi) {
  return _mm256_set_m128i(_mm_set1_epi16(static_cast<int16_t>(((2 * hi + 1) << 8) | (2 * hi))),
                          _mm_set1_epi16(static_cast<int16_t>(((2 * lo + 1) << 8) | (2 * lo))));
}

LFM2_INLINE float hsum128(__m128 s) {
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Q4_K / Q5_K: one super-block against 256 activations xq (scale xd, 32-value sums bsum).
// acc gathers d xd sum_s sc_s isum_s, accm dmin xd sum_s m_s bsum_s.
template <bool FIVE>
inline void superblock_q45(const uint8_t* blk, const int8_t* xq, float xd, const int16_t* bsum, __m256& acc,
                           __m128& accm) {
  const __m256i m4 = _mm256_set1_epi8(0x0F);
  int64_t sc8, mn8;
  scales_mins_packed(blk + 4, &sc8, &mn8);
  const __m256i sc16 = _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(_mm_cvtsi64_si128(sc8)));
  const uint8_t* qs = blk + (FIVE ? 48 : 16);
  __m256i qh;
  if (FIVE) qh = load256(blk + 16);
  __m256i sumi = _mm256_setzero_si256();
  for (int i = 0; i < 4; ++i) {
    const __m256i raw = load256(qs + 32 * i);
    __m256i lo = _mm256_and_si256(raw, m4), hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), m4);
    if (FIVE) {
      // Bit 2i (2i+1) of each qh byte moved to bit 4: 16-bit shifts, then a per-byte mask.
      const __m256i b16 = _mm256_set1_epi8(0x10);
      const __m256i lo5 = i < 2 ? _mm256_slli_epi16(qh, 4 - 2 * i) : _mm256_srli_epi16(qh, 2 * i - 4);
      const __m256i hi5 = i < 2 ? _mm256_slli_epi16(qh, 3 - 2 * i) : _mm256_srli_epi16(qh, 2 * i - 3);
      lo = _mm256_or_si256(lo, _mm256_and_si256(lo5, b16));
      hi = _mm256_or_si256(hi, _mm256_and_si256(hi5, b16));
    }
    // q <= 31, |x| <= 127: int16 pairs below 2 * 31 * 127; times a 6-bit scale, int32 lanes far from overflow.
    const __m256i plo = _mm256_maddubs_epi16(lo, load256(xq + 64 * i));
    const __m256i phi = _mm256_maddubs_epi16(hi, load256(xq + 64 * i + 32));
    sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(plo, _mm256_shuffle_epi8(sc16, spread16(2 * i, 2 * i))));
    sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(phi, _mm256_shuffle_epi8(sc16, spread16(2 * i + 1, 2 * i + 1))));
  }
  acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sumi), _mm256_set1_ps(xd * f16_at(blk)), acc);
  const __m128i mins = _mm_madd_epi16(_mm_cvtepu8_epi16(_mm_cvtsi64_si128(mn8)),
                                      _mm_loadu_si128(reinterpret_cast<const __m128i*>(bsum)));
  accm = _mm_fmadd_ps(_mm_cvtepi32_ps(mins), _mm_set1_ps(xd * f16_at(blk + 2)), accm);
}

// Q6_K: one super-block against 256 activations xq (scale xd, the sums of each 16 in bsum16). The values
// enter unsigned (0..63: int16 pairs below 2 x 63 x 127) and the -32 comes off once, as 32 sum_g sc_g xsum_g
// (as in superblock_q6_512): three operations fewer per 32 values than signed values through vpsignb. Zen 1,
// 2 threads, 65536x1024: 5.0 -> 3.95 ms (11.0 -> 13.9 GB/s).
inline __m256 superblock_q6(const uint8_t* blk, const int8_t* xq, float xd, const int16_t* bsum16, __m256 acc) {
  const __m256i m4 = _mm256_set1_epi8(0x0F), m2 = _mm256_set1_epi8(0x30);
  const uint8_t* sc = blk + 192;
  __m256i sumi = _mm256_setzero_si256();
  for (int h = 0; h < 2; ++h) {
    int64_t sc8;
    std::memcpy(&sc8, sc + 8 * h, 8);
    const __m256i sc16 = _mm256_broadcastsi128_si256(_mm_cvtepi8_epi16(_mm_cvtsi64_si128(sc8)));
    const __m256i l0 = load256(blk + 64 * h), l1 = load256(blk + 64 * h + 32), qh = load256(blk + 128 + 32 * h);
    __m256i q[4];
    q[0] = _mm256_or_si256(_mm256_and_si256(l0, m4), _mm256_and_si256(_mm256_slli_epi16(qh, 4), m2));
    q[1] = _mm256_or_si256(_mm256_and_si256(l1, m4), _mm256_and_si256(_mm256_slli_epi16(qh, 2), m2));
    q[2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l0, 4), m4), _mm256_and_si256(qh, m2));
    q[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), m4),
                           _mm256_and_si256(_mm256_srli_epi16(qh, 2), m2));
    for (int j = 0; j < 4; ++j) {
      const __m256i p16 = _mm256_maddubs_epi16(q[j], load256(xq + 128 * h + 32 * j));
      // Each 128-bit half is one 16-value sub-block: its int8 scale goes into vpmaddwd.
      sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(p16, _mm256_shuffle_epi8(sc16, spread16(2 * j, 2 * j + 1))));
    }
  }
  // 32 sum_g sc_g xsum_g: at most 32 x 16 x 128 x 16 x 127 (133M); the products at most 256 x 63 x 127 x 128 (262M)
  const __m256i scales = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sc)));
  sumi = _mm256_sub_epi32(sumi, _mm256_slli_epi32(_mm256_madd_epi16(scales, load256(bsum16)), 5));
  return _mm256_fmadd_ps(_mm256_cvtepi32_ps(sumi), _mm256_set1_ps(xd * f16_at(blk + 208)), acc);
}

// A super-block's values as int8, in order (what `unpack` gives), with the AVX2 code's bit operations.
inline void unpack_values_simd(int64_t type, const uint8_t* blk, int8_t v[kSuper]) {
  const __m256i m4 = _mm256_set1_epi8(0x0F);
  if (type == kQ6K) {
    const __m256i m2 = _mm256_set1_epi8(0x30), bias = _mm256_set1_epi8(32);
    for (int h = 0; h < 2; ++h) {
      const __m256i l0 = load256(blk + 64 * h), l1 = load256(blk + 64 * h + 32), qh = load256(blk + 128 + 32 * h);
      const __m256i q[4] = {
          _mm256_or_si256(_mm256_and_si256(l0, m4), _mm256_and_si256(_mm256_slli_epi16(qh, 4), m2)),
          _mm256_or_si256(_mm256_and_si256(l1, m4), _mm256_and_si256(_mm256_slli_epi16(qh, 2), m2)),
          _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l0, 4), m4), _mm256_and_si256(qh, m2)),
          _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), m4), _mm256_and_si256(_mm256_srli_epi16(qh, 2), m2))};
      for (int j = 0; j < 4; ++j)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(v + 128 * h + 32 * j), _mm256_sub_epi8(q[j], bias));
    }
    return;
  }
  const uint8_t* qs = blk + (type == kQ5K ? 48 : 16);
  const __m256i qh = type == kQ5K ? load256(blk + 16) : _mm256_setzero_si256();
  const __m256i b16 = _mm256_set1_epi8(0x10);
  for (int i = 0; i < 4; ++i) {
    const __m256i raw = load256(qs + 32 * i);
    __m256i lo = _mm256_and_si256(raw, m4), hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), m4);
    if (type == kQ5K) {  // as in superblock_q45
      lo = _mm256_or_si256(lo, _mm256_and_si256(i < 2 ? _mm256_slli_epi16(qh, 4 - 2 * i) : _mm256_srli_epi16(qh, 2 * i - 4), b16));
      hi = _mm256_or_si256(hi, _mm256_and_si256(i < 2 ? _mm256_slli_epi16(qh, 3 - 2 * i) : _mm256_srli_epi16(qh, 2 * i - 3), b16));
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(v + 64 * i), lo);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(v + 64 * i + 32), hi);
  }
}

// A super-block dequantized: 8 values at a time widened to float, times the scale, less the minimum.
inline void dequantize_simd(int64_t type, const uint8_t* blk, float* out) {
  alignas(32) int8_t v[kSuper];
  float scale[16], minv[16];
  factors(type, blk, scale, minv);
  unpack_values_simd(type, blk, v);
  for (int g = 0; g < 16; ++g) {
    const __m256 sc = _mm256_set1_ps(scale[g]), mn = _mm256_set1_ps(minv[g]);
    for (int h = 0; h < 2; ++h) {
      const __m256i wi = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(v + 16 * g + 8 * h)));
      // a product, then a difference (not fused): the rounding of gguf-py's reader, bit for bit
      _mm256_storeu_ps(out + 16 * g + 8 * h, _mm256_sub_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(wi), sc), mn));
    }
  }
}

float dot_simd(const KMatrix& W, int64_t n, const KActivations& a, int64_t m) {
  const uint8_t* row = W.q + n * W.row_bytes;
  const int8_t* xq = a.q.data() + m * W.k;
  const float* xd = a.d.data() + m * W.nsb;
  const int16_t* bsum = a.bsum.data() + m * W.nsb * 8;
  const int64_t bytes = block_bytes(W.type);
  __m256 acc = _mm256_setzero_ps();
  __m128 accm = _mm_setzero_ps();
  for (int64_t sb = 0; sb < W.nsb; ++sb) {
    const uint8_t* blk = row + sb * bytes;
    prefetch_block(blk, bytes);
    if (W.type == kQ4K) superblock_q45<false>(blk, xq + sb * kSuper, xd[sb], bsum + 8 * sb, acc, accm);
    else if (W.type == kQ5K) superblock_q45<true>(blk, xq + sb * kSuper, xd[sb], bsum + 8 * sb, acc, accm);
    else acc = superblock_q6(blk, xq + sb * kSuper, xd[sb], a.bsum16.data() + (m * W.nsb + sb) * 16, acc);
  }
  return lfm2_simd::hsum(acc) - hsum128(accm);
}

// ---------------------------------------------------------------------------------------------
// AVX-512 (BW): the same integer sums in 512-bit vectors, half the instructions of the AVX2 code.
// vpshufb and the 16-bit shifts work per 128-bit lane, so scales are spread lane by lane.

#define LFM2_AVX512 __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl")))

bool cpu_has_avx512bw() {
#if defined(__GNUC__) || defined(__clang__)
  __builtin_cpu_init();
  return !lfm2_simd::capped_at_avx2() && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
#else
  return false;
#endif
}

// vpshufb controls that copy, in 128-bit lane j of a zmm, one int16 element of that lane into all
// eight: the table's row r picks elements kSpread[r][j]. Rows 0-3: Q4_K / Q5_K sub-blocks s, s, s + 2, s + 2
// for s = 0, 1, 4, 5; rows 4-5: Q6_K elements 0-3 and 4-7.
constexpr int kSpread[6][4] = {{0, 0, 2, 2}, {1, 1, 3, 3}, {4, 4, 6, 6}, {5, 5, 7, 7}, {0, 1, 2, 3}, {4, 5, 6, 7}};

struct SpreadTable {
  alignas(64) int8_t bytes[6][64];
  SpreadTable() {
    for (int r = 0; r < 6; ++r)
      for (int j = 0; j < 4; ++j)
        for (int i = 0; i < 8; ++i) {
          bytes[r][16 * j + 2 * i] = static_cast<int8_t>(2 * kSpread[r][j]);
          bytes[r][16 * j + 2 * i + 1] = static_cast<int8_t>(2 * kSpread[r][j] + 1);
        }
  }
};
const SpreadTable kSpreadTable;

LFM2_AVX512 inline __m512i spread(int row) { return _mm512_load_si512(kSpreadTable.bytes[row]); }

// Per-256-bit-half shift counts for vpsllvw / vpsrlvw.
LFM2_AVX512 inline __m512i halves16(int lo, int hi) {
  return _mm512_inserti64x4(_mm512_set1_epi16(static_cast<int16_t>(lo)), _mm256_set1_epi16(static_cast<int16_t>(hi)), 1);
}

// Activation rows r of one product, at super-block sb: what the AVX-512 code reads.
struct RowPtrs {
  const int8_t* xq;      // q, natural order
  const int8_t* xp;      // q_0213
  const float* xd;       // one scale per super-block
  const int16_t* bsum;   // 8 per super-block
  const int16_t* bsum16;  // 16 per super-block
};

// Q4_K / Q5_K: a 64-byte load of nibbles holds sub-blocks 4t and 4t+2 in its low nibbles and 4t+1,
// 4t+3 in its high ones; the activations come in the matching 0, 2, 1, 3 order (q_0213). The
// weights are unpacked once for the MR activation rows.
template <bool FIVE, int MR>
LFM2_AVX512 inline void superblock_q45_512(const uint8_t* blk, int64_t sb, const RowPtrs (&x)[MR], __m512 (&acc)[MR],
                                           __m128 (&accm)[MR]) {
  const __m512i m4 = _mm512_set1_epi8(0x0F);
  int64_t sc8, mn8;
  scales_mins_packed(blk + 4, &sc8, &mn8);
  const __m512i sc16 = _mm512_broadcast_i32x4(_mm_cvtepu8_epi16(_mm_cvtsi64_si128(sc8)));
  const __m128i mins16 = _mm_cvtepu8_epi16(_mm_cvtsi64_si128(mn8));
  const uint8_t* qs = blk + (FIVE ? 48 : 16);
  __m512i qh;
  if (FIVE) qh = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 16)));
  __m512i sumi[MR];
  for (int r = 0; r < MR; ++r) sumi[r] = _mm512_setzero_si512();
  for (int t = 0; t < 2; ++t) {
    const __m512i raw = _mm512_loadu_si512(qs + 64 * t);
    __m512i lo = _mm512_and_si512(raw, m4), hi = _mm512_and_si512(_mm512_srli_epi16(raw, 4), m4);
    if (FIVE) {
      // The fifth bits of sub-blocks 4t, 4t+2 (low nibbles) and 4t+1, 4t+3 (high) moved to bit 4.
      const __m512i b16 = _mm512_set1_epi8(0x10);
      const __m512i lo5 = t == 0 ? _mm512_sllv_epi16(qh, halves16(4, 2)) : _mm512_srlv_epi16(qh, halves16(0, 2));
      const __m512i hi5 = t == 0 ? _mm512_sllv_epi16(qh, halves16(3, 1)) : _mm512_srlv_epi16(qh, halves16(1, 3));
      lo = _mm512_or_si512(lo, _mm512_and_si512(lo5, b16));
      hi = _mm512_or_si512(hi, _mm512_and_si512(hi5, b16));
    }
    const __m512i slo = _mm512_shuffle_epi8(sc16, spread(2 * t)), shi = _mm512_shuffle_epi8(sc16, spread(2 * t + 1));
    for (int r = 0; r < MR; ++r) {
      const int8_t* xp = x[r].xp + sb * kSuper + 128 * t;
      const __m512i plo = _mm512_maddubs_epi16(lo, _mm512_loadu_si512(xp));
      const __m512i phi = _mm512_maddubs_epi16(hi, _mm512_loadu_si512(xp + 64));
      sumi[r] = _mm512_add_epi32(sumi[r], _mm512_add_epi32(_mm512_madd_epi16(plo, slo), _mm512_madd_epi16(phi, shi)));
    }
  }
  const float d = f16_at(blk), dmin = f16_at(blk + 2);
  for (int r = 0; r < MR; ++r) {
    const float xd = x[r].xd[sb];
    acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sumi[r]), _mm512_set1_ps(xd * d), acc[r]);
    const __m128i mins =
        _mm_madd_epi16(mins16, _mm_loadu_si128(reinterpret_cast<const __m128i*>(x[r].bsum + 8 * sb)));
    accm[r] = _mm_fmadd_ps(_mm_cvtepi32_ps(mins), _mm_set1_ps(xd * dmin), accm[r]);
  }
}

// Q6_K: per half of 128 values, one 64-byte load of ql gives values 0..63 (low nibbles) and 64..127
// (high nibbles) in order, each 128-bit lane one 16-value sub-block. Weights enter unsigned (0..63)
// and the -32 comes off at the end as 32 sum_g sc_g (sum of the sub-block's activations).
template <int MR>
LFM2_AVX512 inline void superblock_q6_512(const uint8_t* blk, int64_t sb, const RowPtrs (&x)[MR], __m512 (&acc)[MR]) {
  const __m512i m4 = _mm512_set1_epi8(0x0F), m2 = _mm512_set1_epi8(0x30);
  const uint8_t* sc = blk + 192;
  __m512i sumi[MR];
  for (int r = 0; r < MR; ++r) sumi[r] = _mm512_setzero_si512();
  for (int h = 0; h < 2; ++h) {
    int64_t sc8;
    std::memcpy(&sc8, sc + 8 * h, 8);
    const __m512i sc16 = _mm512_broadcast_i32x4(_mm_cvtepi8_epi16(_mm_cvtsi64_si128(sc8)));
    const __m512i l = _mm512_loadu_si512(blk + 64 * h);
    const __m512i qh = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 128 + 32 * h)));
    const __m512i a = _mm512_or_si512(_mm512_and_si512(l, m4),
                                      _mm512_and_si512(_mm512_sllv_epi16(qh, halves16(4, 2)), m2));
    const __m512i b = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(l, 4), m4),
                                      _mm512_and_si512(_mm512_srlv_epi16(qh, halves16(0, 2)), m2));
    const __m512i sa = _mm512_shuffle_epi8(sc16, spread(4)), sb16 = _mm512_shuffle_epi8(sc16, spread(5));
    for (int r = 0; r < MR; ++r) {
      // q <= 63, |x| <= 127: int16 pairs below 2 * 63 * 127; times an int8 scale, far from int32's limit.
      const int8_t* xq = x[r].xq + sb * kSuper + 128 * h;
      const __m512i pa = _mm512_maddubs_epi16(a, _mm512_loadu_si512(xq));
      const __m512i pb = _mm512_maddubs_epi16(b, _mm512_loadu_si512(xq + 64));
      sumi[r] = _mm512_add_epi32(sumi[r], _mm512_add_epi32(_mm512_madd_epi16(pa, sa), _mm512_madd_epi16(pb, sb16)));
    }
  }
  const __m256i sc16all = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sc)));
  const float d = f16_at(blk + 208);
  for (int r = 0; r < MR; ++r) {
    const __m256i corr =
        _mm256_madd_epi16(sc16all, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x[r].bsum16 + 16 * sb)));
    const __m512i s = _mm512_sub_epi32(sumi[r], _mm512_zextsi256_si512(_mm256_slli_epi32(corr, 5)));
    acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_set1_ps(x[r].xd[sb] * d), acc[r]);
  }
}

// Weight row n against activation rows m0 .. m0+MR-1, results into out[0..MR).
template <int MR>
LFM2_AVX512 void rows_avx512(const KMatrix& W, int64_t n, const KActivations& a, int64_t m0, float* out) {
  RowPtrs x[MR];
  for (int r = 0; r < MR; ++r) {
    const int64_t m = m0 + r;
    x[r] = {a.q.data() + m * W.k, a.q_0213.data() + m * W.k, a.d.data() + m * W.nsb, a.bsum.data() + m * W.nsb * 8,
            a.bsum16.data() + m * W.nsb * 16};
  }
  const uint8_t* row = W.q + n * W.row_bytes;
  const int64_t bytes = block_bytes(W.type);
  __m512 acc[MR];
  __m128 accm[MR];
  for (int r = 0; r < MR; ++r) {
    acc[r] = _mm512_setzero_ps();
    accm[r] = _mm_setzero_ps();
  }
  for (int64_t sb = 0; sb < W.nsb; ++sb) {
    const uint8_t* blk = row + sb * bytes;
    prefetch_block(blk, bytes);
    if (W.type == kQ4K) superblock_q45_512<false, MR>(blk, sb, x, acc, accm);
    else if (W.type == kQ5K) superblock_q45_512<true, MR>(blk, sb, x, acc, accm);
    else superblock_q6_512<MR>(blk, sb, x, acc);
  }
  for (int r = 0; r < MR; ++r) out[r] = _mm512_reduce_add_ps(acc[r]) - hsum128(accm[r]);
}

// Weight row n against every activation row, four at a time (the weights unpacked once per four).
LFM2_AVX512 void row_avx512(const KMatrix& W, int64_t n, const KActivations& a, int64_t m_rows, float* y) {
  float out[4];
  int64_t m = 0;
  for (; m + 4 <= m_rows; m += 4) {
    rows_avx512<4>(W, n, a, m, out);
    for (int r = 0; r < 4; ++r) y[(m + r) * W.n + n] = out[r];
  }
  for (; m + 2 <= m_rows; m += 2) {
    rows_avx512<2>(W, n, a, m, out);
    for (int r = 0; r < 2; ++r) y[(m + r) * W.n + n] = out[r];
  }
  if (m < m_rows) {
    rows_avx512<1>(W, n, a, m, out);
    y[m * W.n + n] = out[0];
  }
}
#endif

// Which code computes the products: 0 the scalar C++, 1 AVX2, 2 AVX-512; the best this CPU runs by default.
int best_isa() {
#if LFM2_AVX2
  static const int isa = cpu_has_avx512bw() ? 2 : 1;
  return isa;
#else
  return 0;
#endif
}

KMatrix check(const at::Tensor& blocks, int64_t type, int64_t k, const char* op) {
  TORCH_CHECK(type == kQ4K || type == kQ5K || type == kQ6K || type == kQ4KX16, "lfm2 ", op,
              ": type must be a GGML K-quant id (12 Q4_K, 13 Q5_K, 14 Q6_K) or 112 (Q4_K in 16-row tiles), got ", type);
  TORCH_CHECK(blocks.device().is_cpu() && blocks.scalar_type() == at::kByte && blocks.dim() == 2 &&
                  blocks.is_contiguous(),
              "lfm2 ", op, ": blocks must be a contiguous uint8 (N, bytes per row) CPU tensor");
  TORCH_CHECK(k > 0 && k % kSuper == 0, "lfm2 ", op, ": K must be a multiple of 256, got ", k);
  KMatrix W;
  W.q = blocks.data_ptr<uint8_t>();
  W.n = blocks.size(0);
  W.k = k;
  W.type = type;
  W.nsb = k / kSuper;
  W.row_bytes = W.nsb * block_bytes(type);
  TORCH_CHECK(blocks.size(1) == W.row_bytes, "lfm2 ", op, ": rows of K=", k, " take ", W.row_bytes,
              " bytes in this type, blocks has ", blocks.size(1));
  TORCH_CHECK(type != kQ4KX16 || W.n % kTile == 0, "lfm2 ", op, ": Q4_K tiles need rows in multiples of 16, the matrix has ",
              W.n);
  return W;
}

// ---------------------------------------------------------------------------------------------
// Prefill GEMM (`kgemm`; AVX-512 VNNI, or the AVX2 form at the end): many rows of x against K-quant weights, as
// qgemv.cpp's `qgemm` does for int8/int4 (the same tile layout), with `kgemv`'s numerics: int8
// activations with one scale per 256 values, as llama.cpp computes K-quant products at decode and
// prefill alike (its Q8_K). Tiles of 16 weight rows are unpacked to their integer values once per call,
// 4 consecutive values of a row per 32-bit lane, so one vpdpbusd of 4 broadcast activation bytes
// accumulates 16 rows' block dot products exactly. Per block of BV values:
//   Q4_K / Q5_K (blocks of 32, one 6-bit scale and min per sub-block; values 0..31, the unsigned
//   operand against signed activations): y[m][n] += xd[m] (s[n] isum - mn[n] xsum[m]);
//   Q6_K (blocks of 16, an int8 scale each; values -32..31, signed, against activations q + 128):
//   y[m][n] += xd[m] s[n] (isum - 128 vsum[n]).
// Since the integer sums are exact,
// the result is x rounded to those int8 activations times the dequantized weights, to float
// rounding (a token's prefill logits are its decode logits), with 32 products an instruction where
// a float GEMM on dequantized tiles does 8.


struct KTile {
  std::vector<int8_t> q;           // (blocks, BV / 4 groups, 16 rows, 4 values)
  std::vector<float> scale, minv;  // (blocks, 16): the VNNI code's float block factors
  std::vector<int32_t> offset;     // (blocks, 16), Q6_K only: 128 x the sum of the row's block values
  // The AVX2 code's integer factors (kgemm_tile_avx2): each row's block scale as an int16 pair (blocks, 16 x 2);
  // Q4_K / Q5_K: the mins of blocks 2i and 2i + 1 as a pair (blocks / 2, 16 x 2); the super-blocks' float
  // factors d and dmin (super-blocks, 16); Q6_K: 128 x the scaled sums of the row's values (super-blocks, 16).
  std::vector<int16_t> scale16, min16;
  std::vector<float> d, dmin;
  std::vector<int32_t> offset_sb;
};

#if LFM2_AVX2
#define LFM2_KVNNI __attribute__((target("avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni")))

// Q6_K's offsets (128 x each row's block sums) of a packed tile: vpdpbusd against bytes of 128, 16 rows at
// a time (as qgemv.cpp's pack_full_tile).
LFM2_KVNNI void ktile_offsets_vnni(KTile& t, int64_t nblk, int64_t groups) {
  const __m512i h128 = _mm512_set1_epi8(static_cast<char>(0x80));
  const int8_t* q = t.q.data();
  for (int64_t b = 0; b < nblk; ++b) {
    __m512i sum = _mm512_setzero_si512();
    for (int64_t g = 0; g < groups; ++g)
      sum = _mm512_dpbusd_epi32(sum, h128, _mm512_loadu_si512(q + (b * groups + g) * 64));
    _mm512_storeu_si512(t.offset.data() + b * kTile, sum);
  }
}

// The same offsets with AVX2: each row's 4 values of a group summed in pairs by vpmaddubsw against bytes of 1
// (a block's 16 values of -32..31 stay far inside int16), then by vpmaddwd against 128s.
void ktile_offsets(KTile& t, int64_t nblk, int64_t groups) {
  const __m256i ones8 = _mm256_set1_epi8(1), w128 = _mm256_set1_epi16(128);
  const int8_t* q = t.q.data();
  for (int64_t b = 0; b < nblk; ++b)
    for (int h = 0; h < 2; ++h) {
      __m256i pairs = _mm256_setzero_si256();
      for (int64_t g = 0; g < groups; ++g) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + (b * groups + g) * 64 + 32 * h));
        pairs = _mm256_add_epi16(pairs, _mm256_maddubs_epi16(ones8, v));
      }
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(t.offset.data() + b * kTile + 8 * h), _mm256_madd_epi16(pairs, w128));
    }
}

// The integer block scales (and Q4_K / Q5_K mins) and the super-blocks' float factors of a tile's rows, for
// kgemm_tile_avx2. Rows past `rows` keep zeros.
void pack_ktile_factors(const KMatrix& W, int64_t n0, int64_t rows, int bv, KTile& t) {
  const int64_t per_sb = kSuper / bv, nblk = W.nsb * per_sb, bytes = block_bytes(W.type);
  t.scale16.assign(nblk * kTile * 2, 0);
  t.min16.assign(W.type == kQ6K ? 0 : nblk * kTile, 0);
  t.d.assign(W.nsb * kTile, 0.f);
  t.dmin.assign(W.nsb * kTile, 0.f);
  for (int64_t j = 0; j < rows; ++j)
    for (int64_t sb = 0; sb < W.nsb; ++sb) {
      const uint8_t* blk = W.q + (n0 + j) * W.row_bytes + sb * bytes;
      int16_t sc[16], mn[8];
      if (W.type == kQ6K) {
        for (int kb = 0; kb < 16; ++kb) sc[kb] = reinterpret_cast<const int8_t*>(blk + 192)[kb];
        t.d[sb * kTile + j] = f16_at(blk + 208);
      } else {
        uint8_t s6[8], m6[8];
        scales_mins(blk + 4, s6, m6);
        for (int kb = 0; kb < 8; ++kb) {
          sc[kb] = s6[kb];
          mn[kb] = m6[kb];
        }
        t.d[sb * kTile + j] = f16_at(blk);
        t.dmin[sb * kTile + j] = f16_at(blk + 2);
      }
      for (int64_t kb = 0; kb < per_sb; ++kb) {
        const int64_t b = sb * per_sb + kb;
        t.scale16[(b * kTile + j) * 2] = t.scale16[(b * kTile + j) * 2 + 1] = sc[kb];
        if (W.type != kQ6K) t.min16[((b / 2) * kTile + j) * 2 + b % 2] = mn[kb];
      }
    }
}

// Rows n0 .. n0 + rows of W (rows <= 16; the rest of the tile is zero) in blocks of bv values. Each
// row's super-blocks are unpacked with the SIMD code and their 4-byte words laid out 16 rows apart.
void pack_ktile(const KMatrix& W, int64_t n0, int64_t rows, int bv, KTile& t, bool vnni) {
  const int64_t nblk = W.k / bv, groups = bv / 4, per_sb = kSuper / bv;
  if (rows < kTile) t.q.assign(nblk * groups * kTile * 4, 0);
  else t.q.resize(nblk * groups * kTile * 4);
  t.offset.resize(nblk * kTile);
  alignas(32) int8_t v[4][kSuper];
  const int64_t bytes = block_bytes(W.type);
  int8_t* q = t.q.data();
  int64_t j = 0;
  for (; j + 4 <= rows; j += 4)  // 4 rows at a time: their words w .. w + 3 by a 4 x 4 transpose of 32-bit lanes
    for (int64_t sb = 0; sb < W.nsb; ++sb) {
      for (int i = 0; i < 4; ++i) unpack_values_simd(W.type, W.q + (n0 + j + i) * W.row_bytes + sb * bytes, v[i]);
      int8_t* dst = q + (sb * per_sb * groups * kTile + j) * 4;  // word w of the super-block: group w of its blocks
      for (int64_t w = 0; w < kSuper / 4; w += 4) {
        __m128i r[4];
        for (int i = 0; i < 4; ++i) r[i] = _mm_load_si128(reinterpret_cast<const __m128i*>(v[i] + 4 * w));
        __m128i out[4];
        lfm2_simd::transpose4_epi32(r, out);
        for (int k = 0; k < 4; ++k) _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + (w + k) * kTile * 4), out[k]);
      }
    }
  for (; j < rows; ++j)
    for (int64_t sb = 0; sb < W.nsb; ++sb) {
      unpack_values_simd(W.type, W.q + (n0 + j) * W.row_bytes + sb * bytes, v[0]);
      int8_t* dst = q + (sb * per_sb * groups * kTile + j) * 4;
      for (int64_t w = 0; w < kSuper / 4; ++w) std::memcpy(dst + w * kTile * 4, v[0] + 4 * w, 4);
    }
  if (vnni) {  // the VNNI code's float factors of each block
    t.scale.assign(nblk * kTile, 0.f);
    t.minv.assign(nblk * kTile, 0.f);
    float scale[16], minv[16];
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t sb = 0; sb < W.nsb; ++sb) {
        factors(W.type, W.q + (n0 + r) * W.row_bytes + sb * bytes, scale, minv);
        for (int64_t kb = 0; kb < per_sb; ++kb) {
          t.scale[(sb * per_sb + kb) * kTile + r] = scale[kb * bv / 16];
          t.minv[(sb * per_sb + kb) * kTile + r] = minv[kb * bv / 16];
        }
      }
  } else {
    pack_ktile_factors(W, n0, rows, bv, t);
  }
  if (bv == 32) return;  // Q4_K / Q5_K: unsigned values against signed activations, no offsets (kgemm_tile)
  if (vnni) return ktile_offsets_vnni(t, nblk, groups);
  ktile_offsets(t, nblk, groups);
  t.offset_sb.assign(W.nsb * kTile, 0);
  for (int64_t sb = 0; sb < W.nsb; ++sb)  // at most 16 x 128 x 128 x 16 x 32 (134M): far inside int32
    for (int64_t kb = 0; kb < per_sb; ++kb) {
      const int64_t b = sb * per_sb + kb;
      for (int64_t r = 0; r < kTile; ++r)
        t.offset_sb[sb * kTile + r] += t.scale16[(b * kTile + r) * 2] * t.offset[b * kTile + r];
    }
}

// MR activation rows (unsigned bytes xu, stride kp; scales xd per 256 values, stride nsb; block sums
// xs per 32 values as floats, stride nb32) against one packed tile of blocks of BV values:
// y[r][0:cols]. A super-block's blocks are summed with the weights' scales first, then scaled by
// the activations' one scale of the super-block: a block costs its products and two multiply-adds.
template <int MR, int BV>
LFM2_KVNNI void kgemm_tile(const KTile& t, int64_t nsb, const uint8_t* xu, int64_t kp, const float* xd,
                           const float* xs, int64_t nb32, float* y, int64_t ldy, int64_t cols) {
  constexpr int64_t kPerSuper = kSuper / BV;
  __m512 acc[MR];
  for (int r = 0; r < MR; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t sb = 0; sb < nsb; ++sb) {
    __m512 part[MR];
    for (int r = 0; r < MR; ++r) part[r] = _mm512_setzero_ps();
    for (int64_t b = sb * kPerSuper; b < (sb + 1) * kPerSuper; ++b) {
      __m512i isum[MR];
      const __m512 sc = _mm512_loadu_ps(t.scale.data() + b * kTile);
      if (BV == 32) {  // Q4_K / Q5_K: exact sums of the unsigned values and signed activations, less each
                       // block's minimum times the activations' block sum
        lfm2_simd::vnni_block<MR, BV / 4, true>(t.q.data() + b * (BV / 4) * 64, xu + b * BV, kp, isum);
        const __m512 mn = _mm512_loadu_ps(t.minv.data() + b * kTile);
        for (int r = 0; r < MR; ++r) {
          part[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum[r]), sc, part[r]);
          part[r] = _mm512_fnmadd_ps(mn, _mm512_set1_ps(xs[r * nb32 + b]), part[r]);
        }
      } else {  // Q6_K: signed values against activations + 128, less 128 x the values' sums
        lfm2_simd::vnni_block<MR, BV / 4>(t.q.data() + b * (BV / 4) * 64, xu + b * BV, kp, isum);
        const __m512i off = _mm512_loadu_si512(t.offset.data() + b * kTile);
        for (int r = 0; r < MR; ++r)
          part[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(isum[r], off)), sc, part[r]);
      }
    }
    for (int r = 0; r < MR; ++r) acc[r] = _mm512_fmadd_ps(part[r], _mm512_set1_ps(xd[r * nsb + sb]), acc[r]);
  }
  const __mmask16 keep = static_cast<__mmask16>((1u << cols) - 1);
  for (int r = 0; r < MR; ++r) _mm512_mask_storeu_ps(y + r * ldy, keep, acc[r]);
}

// kgemm_tile for CPUs with AVX2 only: the 16 rows as two 256-bit halves, each group's products by
// `lfm2_simd::avx2_block` (exact for these values: see there), with S groups summed in int16: 4 for Q4_K and
// Q5_K (8 for Q4_K, whose values 0..15 allow it, where `avx2_halved`: see kgemm_rows_avx2), 2 for Q6_K. The
// int16 sums are widened by vpmaddwd against each row's integer block scale, so a super-block's products sum
// exactly in int32 as `kgemv` sums them (`dot_scalar`): y[m][n] += xd[m] (d[n] isum - dmin[n] msum) with
// msum = sum over blocks of min x the activations' block sum (vpmaddwd of two blocks' pairs), for Q6_K
// y[m][n] += xd[m] d[n] (isum - offset). The int32 sums of a super-block stay far from overflow: Q4_K at most
// 256 x 15 x 127 x 63 (31M), Q5_K 256 x 31 x 127 x 63 (64M), Q6_K 256 x 255 x 32 x 128 (267M, with the offset's
// 128s), the mins 256 x 127 x 63 (2M). Against scaling each block in float (Zen 1, 512 rows x 4608x1024,
// 2 threads): Q4_K 49-51 -> 45-47 ms, Q5_K 50-54 -> 48-49, Q6_K 63-65 -> 51-52.
template <int MR, int BV, int S>
void kgemm_tile_avx2(const KTile& t, int64_t nsb, const uint8_t* xu, int64_t kp, const float* xd,
                     const int16_t* xs, int64_t nb32, float* y, int64_t ldy, int64_t cols) {
  constexpr int64_t kPerSuper = kSuper / BV;
  __m256 acc[MR][2];
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  for (int64_t sb = 0; sb < nsb; ++sb) {
    __m256i isum[MR][2], msum[MR][2];
    for (int r = 0; r < MR; ++r)
      for (int h = 0; h < 2; ++h) isum[r][h] = msum[r][h] = _mm256_setzero_si256();
    for (int64_t b = sb * kPerSuper; b < (sb + 1) * kPerSuper; ++b) {
      const __m256i* scale = reinterpret_cast<const __m256i*>(t.scale16.data() + b * kTile * 2);
      const __m256i sc[2] = {_mm256_loadu_si256(scale), _mm256_loadu_si256(scale + 1)};
      lfm2_simd::avx2_block<MR, BV / 4, S, BV == 32, false, true>(t.q.data() + b * (BV / 4) * 64, xu + b * BV, kp,
                                                                   isum, sc);
      if (BV == 32 && b % 2 == 1) {  // Q4_K / Q5_K: the mins of this block and the one before times their sums
        const __m256i* mins = reinterpret_cast<const __m256i*>(t.min16.data() + (b / 2) * kTile * 2);
        for (int h = 0; h < 2; ++h) {
          const __m256i mn = _mm256_loadu_si256(mins + h);
          for (int r = 0; r < MR; ++r) {
            int32_t two;  // the activations' sums of blocks b - 1 and b, at most 32 x 127 each
            std::memcpy(&two, xs + r * nb32 + b - 1, 4);
            msum[r][h] = _mm256_add_epi32(msum[r][h], _mm256_madd_epi16(mn, _mm256_set1_epi32(two)));
          }
        }
      }
    }
    for (int h = 0; h < 2; ++h) {
      const __m256 d = _mm256_loadu_ps(t.d.data() + sb * kTile + 8 * h);
      const __m256 dmin = _mm256_loadu_ps(t.dmin.data() + sb * kTile + 8 * h);
      __m256i off = _mm256_setzero_si256();  // Q6_K's (t.offset_sb is empty for Q4_K / Q5_K)
      if (BV != 32) off = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(t.offset_sb.data() + sb * kTile) + h);
      for (int r = 0; r < MR; ++r) {
        const __m256 v = BV == 32 ? _mm256_fnmadd_ps(_mm256_cvtepi32_ps(msum[r][h]), dmin,
                                                     _mm256_mul_ps(_mm256_cvtepi32_ps(isum[r][h]), d))
                                  : _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(isum[r][h], off)), d);
        acc[r][h] = _mm256_fmadd_ps(v, _mm256_set1_ps(xd[r * nsb + sb]), acc[r][h]);
      }
    }
  }
  for (int r = 0; r < MR; ++r) lfm2_simd::store_16(y + r * ldy, acc[r], cols);
}

// MR activation rows a pass. Zen 4 capped at AVX2: 11.5 ms for 512 rows x Q4_K 4608x1024 with 4 rows (S = 4),
// against 15.0 with 3 and 15.4 with 2; 4 rows with S = 8 1.6x slower. Zen 1 (`avx2_halved`), best of 12
// interleaved: Q4_K 4 rows S = 4 54.3 ms, 2 rows S = 4 49.6, 2 rows S = 8 46.6; Q5_K 4 rows 59.6, 2 rows 49.9;
// Q6_K 61.0 against 59.8 (kept at 4). With the blocks' integer scales (kgemm_tile_avx2, 2026-12-06, Zen 1, two
// rounds): Q4_K 1 / 2 / 3 rows 47.7-49.5 / 45.4-46.7 / 48.0-65.1 ms; Q6_K 1-4 rows within 51-52 ms.
template <int BV, int S, int MR>
void kgemm_rows_avx2(const KTile& t, const KMatrix& W, const uint8_t* xu, const float* xd, const int16_t* xs,
                     int64_t m_rows, float* y, int64_t n0, int64_t cols) {
  const int64_t nb32 = W.k / 32;
  int64_t m = 0;
  for (; m + MR <= m_rows; m += MR)
    kgemm_tile_avx2<MR, BV, S>(t, W.nsb, xu + m * W.k, W.k, xd + m * W.nsb, xs + m * nb32, nb32, y + m * W.n + n0, W.n,
                            cols);
  for (; m < m_rows; ++m)
    kgemm_tile_avx2<1, BV, S>(t, W.nsb, xu + m * W.k, W.k, xd + m * W.nsb, xs + m * nb32, nb32, y + m * W.n + n0, W.n,
                           cols);
}

template <int BV>
void kgemm_rows(const KTile& t, const KMatrix& W, const uint8_t* xu, const float* xd, const float* xs,
                int64_t m_rows, float* y, int64_t n0, int64_t cols) {
  constexpr int MR = 4;
  const int64_t nb32 = W.k / 32;
  int64_t m = 0;
  for (; m + MR <= m_rows; m += MR)
    kgemm_tile<MR, BV>(t, W.nsb, xu + m * W.k, W.k, xd + m * W.nsb, xs + m * nb32, nb32, y + m * W.n + n0, W.n, cols);
  for (; m < m_rows; ++m)
    kgemm_tile<1, BV>(t, W.nsb, xu + m * W.k, W.k, xd + m * W.nsb, xs + m * nb32, nb32, y + m * W.n + n0, W.n, cols);
}
#endif

// ---------------------------------------------------------------------------------------------
// Q4_K in tiles of 16 rows (lfm2's own type id kQ4KX16; `kpack_` rearranges a matrix in place, `kunpack`
// restores the file's layout): the layout of the decode product on CPUs with AVX-512 VNNI, and with AVX2 alone
// (`x16_rows_avx2`, below). Per row, a
// Q4_K super-block costs ~38 vector operations in `rows_avx512` (nibbles unpacked, scales spread over the
// lanes, vpmaddubsw + vpmaddwd, the scale epilogue): on two Zen 4 cores that code streams Q4_K from memory at
// 29-32 GB/s where the memory gives ~36, and 32 GB/s from cache (docs/benchmarks.md). With 16 rows' super-blocks interleaved, one vpdpbusd multiplies four
// values of 16 rows by four broadcast activations (as `kgemm`'s tiles, and llama.cpp's CPU_REPACK Q4_K
// 8x8 layout, ggml-cpu/repack.cpp), and the 6-bit scales are vectors of the 16 rows: ~15 operations a
// row's super-block. A tile's super-block sb is 16 x 144 bytes, the same bytes as in the file, moved:
//   0: the 16 rows' d (float16); 32: their dmin; 64: the 12 scale bytes, byte i of the 16 rows at 64 + 16 i;
//   256: 32 chunks of 64 bytes; byte 4 r + l of chunk g holds value 8 g + l of row r in its low nibble and
//        value 8 g + 4 + l in its high one (l < 4).
// Tiles follow one another, each its super-blocks in order, so a matrix keeps its (N, K / 256 * 144) shape;
// N must be a multiple of 16.

constexpr int64_t kX16Bytes = kTile * 144;  // one tile's super-block

// 16 rows of Q4_K super-blocks (stride row_bytes) into one tile.
void pack_x16(const uint8_t* rows, int64_t row_bytes, int64_t nsb, uint8_t* tile) {
  int8_t v[kSuper];
  for (int64_t sb = 0; sb < nsb; ++sb) {
    uint8_t* t = tile + sb * kX16Bytes;
    for (int r = 0; r < kTile; ++r) {
      const uint8_t* blk = rows + r * row_bytes + sb * 144;
      std::memcpy(t + 2 * r, blk, 2);
      std::memcpy(t + 32 + 2 * r, blk + 2, 2);
      for (int i = 0; i < 12; ++i) t[64 + 16 * i + r] = blk[4 + i];
      unpack_values(kQ4K, blk, v);
      for (int g = 0; g < 32; ++g)
        for (int l = 0; l < 4; ++l) t[256 + 64 * g + 4 * r + l] = static_cast<uint8_t>(v[8 * g + l] | v[8 * g + 4 + l] << 4);
    }
  }
}

// One tile back to 16 rows of Q4_K super-blocks (the file's bytes).
void unpack_x16(const uint8_t* tile, int64_t nsb, uint8_t* rows, int64_t row_bytes) {
  uint8_t v[kSuper];
  for (int64_t sb = 0; sb < nsb; ++sb) {
    const uint8_t* t = tile + sb * kX16Bytes;
    for (int r = 0; r < kTile; ++r) {
      uint8_t* blk = rows + r * row_bytes + sb * 144;
      std::memcpy(blk, t + 2 * r, 2);
      std::memcpy(blk + 2, t + 32 + 2 * r, 2);
      for (int i = 0; i < 12; ++i) blk[4 + i] = t[64 + 16 * i + r];
      for (int g = 0; g < 32; ++g)
        for (int l = 0; l < 4; ++l) {
          v[8 * g + l] = t[256 + 64 * g + 4 * r + l] & 15;
          v[8 * g + 4 + l] = t[256 + 64 * g + 4 * r + l] >> 4;
        }
      for (int i = 0; i < 4; ++i)  // bytes 32i..32i+31: sub-block 2i low, 2i+1 high (see the top of this file)
        for (int l = 0; l < 32; ++l) blk[16 + 32 * i + l] = static_cast<uint8_t>(v[64 * i + l] | v[64 * i + 32 + l] << 4);
    }
  }
}

// `check` for the two layouts of Q4_K, the file's and the tiles (whose rows come in multiples of 16 either way).
KMatrix check_x16(const at::Tensor& blocks, int64_t type, int64_t k, const char* op) {
  TORCH_CHECK(type == kQ4K || type == kQ4KX16, "lfm2 ", op, ": type must be 12 (Q4_K) or 112 (Q4_K in 16-row tiles), got ",
              type);
  const KMatrix W = check(blocks, type, k, op);
  TORCH_CHECK(W.n % kTile == 0, "lfm2 ", op, ": Q4_K tiles need rows in multiples of 16, the matrix has ", W.n);
  return W;
}

// Rearrange a Q4_K matrix into 16-row tiles, in place (a tile at a time through a copy of its rows):
// stacked experts stay where they are in their storage.
void kpack_(const at::Tensor& blocks, int64_t type, int64_t k) {
  const KMatrix W = check_x16(blocks, type, k, "kpack_");
  TORCH_CHECK(type == kQ4K, "lfm2 kpack_: the blocks must be in the file's Q4_K layout (type 12)");
  uint8_t* q = blocks.data_ptr<uint8_t>();
  at::parallel_for(0, W.n / kTile, 1, [&](int64_t t0, int64_t t1) {
    std::vector<uint8_t> rows(kTile * W.row_bytes);
    for (int64_t ti = t0; ti < t1; ++ti) {
      uint8_t* tile = q + ti * kTile * W.row_bytes;
      std::memcpy(rows.data(), tile, rows.size());
      pack_x16(rows.data(), W.row_bytes, W.nsb, tile);
    }
  });
}

at::Tensor kunpack(const at::Tensor& blocks, int64_t type, int64_t k) {
  const KMatrix W = check_x16(blocks, type, k, "kunpack");
  TORCH_CHECK(type == kQ4KX16, "lfm2 kunpack: the blocks must be Q4_K in 16-row tiles (type 112)");
  at::Tensor out = at::empty_like(blocks);
  uint8_t* o = out.data_ptr<uint8_t>();
  at::parallel_for(0, W.n / kTile, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t ti = t0; ti < t1; ++ti)
      unpack_x16(W.q + ti * kTile * W.row_bytes, W.nsb, o + ti * kTile * W.row_bytes, W.row_bytes);
  });
  return out;
}

#if LFM2_AVX2
// A tile super-block's 8 scales and 8 minimums of its 16 rows (bytes in 128-bit vectors), from the 12
// scale-byte vectors S: the formula of `scales_mins`, 16 rows at a time (SSE2, for the AVX2 and VNNI code).
LFM2_INLINE void x16_scales(const uint8_t* t, __m128i sc[8], __m128i mn[8]) {
  const __m128i m63 = _mm_set1_epi8(63), m15 = _mm_set1_epi8(15), m3 = _mm_set1_epi8(3);
  __m128i S[12];
  for (int i = 0; i < 12; ++i) S[i] = _mm_loadu_si128(reinterpret_cast<const __m128i*>(t + 64 + 16 * i));
  for (int j = 0; j < 4; ++j) {
    sc[j] = _mm_and_si128(S[j], m63);
    mn[j] = _mm_and_si128(S[j + 4], m63);
    // the two high bits of byte j (or j + 4) above the nibble of byte j + 8 (16-bit shifts, then masks per byte)
    const __m128i top_sc = _mm_slli_epi16(_mm_and_si128(_mm_srli_epi16(S[j], 6), m3), 4);
    const __m128i top_mn = _mm_slli_epi16(_mm_and_si128(_mm_srli_epi16(S[j + 4], 6), m3), 4);
    sc[j + 4] = _mm_or_si128(_mm_and_si128(S[j + 8], m15), top_sc);
    mn[j + 4] = _mm_or_si128(_mm_and_si128(_mm_srli_epi16(S[j + 8], 4), m15), top_mn);
  }
}

// Activation rows m0 .. m0 + MR - 1 against one tile: y[r * ldy + 0..16). Per sub-block, the low and high
// nibbles go to separate sums (the high ones as 16 q, so no shift per chunk), each sub-block's sum times
// its scales exactly in integers; per super-block two float multiply-adds: d xd isum - dmin xd msum.
// No software prefetch: a tile is one sequential stream, which the hardware prefetcher follows. Asking
// for lines 1-8 tile super-blocks ahead was no faster, 2-8 slower (Zen 4, runs alternated in one process);
// the products stream weights from memory as fast as torch.sum reads them (~35 GB/s on two cores here).
template <int MR>
LFM2_KVNNI void x16_rows(const uint8_t* tile, int64_t nsb, const KActivations& a, int64_t m0, int64_t k,
                         float* y, int64_t ldy) {
  const __m512i lo4 = _mm512_set1_epi8(0x0F), hi4 = _mm512_set1_epi8(static_cast<char>(0xF0));
  __m512 acc[MR];
  for (int r = 0; r < MR; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t sb = 0; sb < nsb; ++sb) {
    const uint8_t* t = tile + sb * kX16Bytes;
    __m128i sc[8], mn[8];
    x16_scales(t, sc, mn);
    __m512i isum[MR], msum[MR];
    const int8_t* xq[MR];
    const int16_t* bs[MR];
    for (int r = 0; r < MR; ++r) {
      isum[r] = msum[r] = _mm512_setzero_si512();
      xq[r] = a.q.data() + (m0 + r) * k + sb * kSuper;
      bs[r] = a.bsum.data() + ((m0 + r) * nsb + sb) * 8;
    }
    for (int j = 0; j < 8; ++j) {
      __m512i lo[MR], hi[MR];
      for (int r = 0; r < MR; ++r) lo[r] = hi[r] = _mm512_setzero_si512();
      for (int i = 0; i < 4; ++i) {
        const int g = 4 * j + i;
        const __m512i w = _mm512_loadu_si512(t + 256 + 64 * g);
        const __m512i wl = _mm512_and_si512(w, lo4), wh = _mm512_and_si512(w, hi4);
        for (int r = 0; r < MR; ++r) {
          int32_t x0, x1;
          std::memcpy(&x0, xq[r] + 8 * g, 4);
          std::memcpy(&x1, xq[r] + 8 * g + 4, 4);
          lo[r] = _mm512_dpbusd_epi32(lo[r], wl, _mm512_set1_epi32(x0));
          hi[r] = _mm512_dpbusd_epi32(hi[r], wh, _mm512_set1_epi32(x1));
        }
      }
      const __m512i scz = _mm512_cvtepu8_epi32(sc[j]), mnz = _mm512_cvtepu8_epi32(mn[j]);
      for (int r = 0; r < MR; ++r) {
        const __m512i s = _mm512_add_epi32(lo[r], _mm512_srai_epi32(hi[r], 4));
        isum[r] = _mm512_add_epi32(isum[r], _mm512_mullo_epi32(s, scz));
        msum[r] = _mm512_add_epi32(msum[r], _mm512_mullo_epi32(mnz, _mm512_set1_epi32(bs[r][j])));
      }
    }
    const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(t)));
    const __m512 dmin = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(t + 32)));
    for (int r = 0; r < MR; ++r) {
      const __m512 xd = _mm512_set1_ps(a.d[(m0 + r) * nsb + sb]);
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum[r]), _mm512_mul_ps(d, xd), acc[r]);
      acc[r] = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(msum[r]), _mm512_mul_ps(dmin, xd), acc[r]);
    }
  }
  for (int r = 0; r < MR; ++r) _mm512_storeu_ps(y + r * ldy, acc[r]);
}

// Every activation row against tile ti, four rows at a time (the tile read from cache again per four).
LFM2_KVNNI void x16_tile(const KMatrix& W, int64_t ti, const KActivations& a, int64_t m_rows, float* y) {
  const uint8_t* tile = W.q + ti * kTile * W.row_bytes;
  float* out = y + ti * kTile;
  int64_t m = 0;
  for (; m + 4 <= m_rows; m += 4) x16_rows<4>(tile, W.nsb, a, m, W.k, out + m * W.n, W.n);
  for (; m + 2 <= m_rows; m += 2) x16_rows<2>(tile, W.nsb, a, m, W.k, out + m * W.n, W.n);
  if (m < m_rows) x16_rows<1>(tile, W.nsb, a, m, W.k, out + m * W.n, W.n);
}

// One tile super-block dequantized: out[r * ldo + i] = value i of row r's super-block, as
// `dequantize_simd` computes it from the file's layout (a product, then a difference: gguf-py's rounding).
// Each chunk's low and high nibbles interleaved per 32-bit word are a row's 8 values in order: rows 4L and
// 4L + 1 in 128-bit lane L of the low interleave, rows 4L + 2 and 4L + 3 in the high one.
LFM2_KVNNI void dequantize_x16(const uint8_t* t, float* out, int64_t ldo) {
  const __m512i lo4 = _mm512_set1_epi8(0x0F);
  __m128i sc[8], mn[8];
  x16_scales(t, sc, mn);
  const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(t)));
  const __m512 dmin = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(t + 32)));
  alignas(64) float scale[kTile], minv[kTile];
  alignas(64) uint8_t v[128];
  for (int j = 0; j < 8; ++j) {
    _mm512_store_ps(scale, _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(sc[j]))));
    _mm512_store_ps(minv, _mm512_mul_ps(dmin, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(mn[j]))));
    for (int i = 0; i < 4; ++i) {
      const int g = 4 * j + i;
      const __m512i w = _mm512_loadu_si512(t + 256 + 64 * g);
      const __m512i lo = _mm512_and_si512(w, lo4), hi = _mm512_and_si512(_mm512_srli_epi16(w, 4), lo4);
      _mm512_store_si512(v, _mm512_unpacklo_epi32(lo, hi));
      _mm512_store_si512(v + 64, _mm512_unpackhi_epi32(lo, hi));
      for (int r = 0; r < kTile; ++r) {
        const uint8_t* q = v + (r & 2) * 32 + (r >> 2) * 16 + (r & 1) * 8;
        const __m256 f = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q))));
        _mm256_storeu_ps(out + r * ldo + 8 * g,
                         _mm256_sub_ps(_mm256_mul_ps(f, _mm256_set1_ps(scale[r])), _mm256_set1_ps(minv[r])));
      }
    }
  }
}

// `kgemm`'s tile of blocks of 32 values from one tile of this layout: the chunks' nibbles are already
// 4 values of a row per 32-bit lane, 16 rows apart, in order.
LFM2_KVNNI void pack_ktile_x16(const uint8_t* tile, int64_t nsb, KTile& kt) {
  kt.q.resize(nsb * 8 * 8 * 64);
  kt.scale.resize(nsb * 8 * kTile);
  kt.minv.resize(nsb * 8 * kTile);
  const __m512i lo4 = _mm512_set1_epi8(0x0F);
  for (int64_t sb = 0; sb < nsb; ++sb) {
    const uint8_t* t = tile + sb * kX16Bytes;
    __m128i sc[8], mn[8];
    x16_scales(t, sc, mn);
    const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(t)));
    const __m512 dmin = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(t + 32)));
    for (int j = 0; j < 8; ++j) {
      const int64_t b = sb * 8 + j;
      _mm512_storeu_ps(kt.scale.data() + b * kTile, _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(sc[j]))));
      _mm512_storeu_ps(kt.minv.data() + b * kTile, _mm512_mul_ps(dmin, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(mn[j]))));
      for (int i = 0; i < 4; ++i) {
        const __m512i w = _mm512_loadu_si512(t + 256 + 64 * (4 * j + i));
        int8_t* dst = kt.q.data() + (b * 8 + 2 * i) * 64;
        _mm512_storeu_si512(dst, _mm512_and_si512(w, lo4));
        _mm512_storeu_si512(dst + 64, _mm512_and_si512(_mm512_srli_epi16(w, 4), lo4));
      }
    }
  }
}

// The AVX2 forms of the tile code, for CPUs without AVX-512 VNNI. A chunk's 64 bytes are two 256-bit halves,
// rows 0-7 and 8-15, each 32-bit lane one row's 4 + 4 values. vpmaddubsw multiplies a row's 4 low-nibble
// values by 4 broadcast activation bytes into two int16 pair sums (at most 2 x 15 x 127 = 3810 each), and a
// sub-block's 8 of them (4 chunks, low and high nibbles) stay inside int16 (30480); one vpmaddwd against the
// row's scale then sums the pairs into int32, exactly as `x16_rows` sums them, and the same two float
// multiply-adds a super-block follow, so the results are the VNNI code's bits. Per 32 multiply-adds of a row
// that is one vpmaddubsw and a quarter vpmaddwd, against one of each in the file layout's `dot_simd`. Zen 1,
// 2 threads, one activation row: 4608x1024 in cache 0.235 -> 0.133 ms (1.8x), 65536x1024 from memory 3.3 ->
// 2.1 ms (11.5 -> 17.8 GB/s; 2-4 rows 2.1x). Unlike the VNNI code this one asks for the next super-block as it
// goes: without that it read 12.4-13.5 GB/s from memory (the bandwidth is ~23, one core's ~13).

// Half h (rows 8h .. 8h + 7) of two tile vectors of 16 row bytes as int16 pairs: row r's byte of a and of b
// side by side in its 32-bit lane (a = b: a block scale against a row's pair sums; two blocks' mins).
LFM2_INLINE __m256i row_pairs(__m128i a, __m128i b, int h) {
  return _mm256_cvtepu8_epi16(h == 0 ? _mm_unpacklo_epi8(a, b) : _mm_unpackhi_epi8(a, b));
}

template <int MR>
void x16_rows_avx2(const uint8_t* tile, int64_t nsb, const KActivations& a, int64_t m0, int64_t k, float* y,
                   int64_t ldy) {
  const __m256i lo4 = _mm256_set1_epi8(0x0F);
  __m256 acc[MR][2];
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  for (int64_t sb = 0; sb < nsb; ++sb) {
    const uint8_t* t = tile + sb * kX16Bytes;
    __m128i sc[8], mn[8];
    x16_scales(t, sc, mn);
    __m256i isum[MR][2], msum[MR][2];
    const int8_t* xq[MR];
    const int16_t* bs[MR];
    for (int r = 0; r < MR; ++r) {
      isum[r][0] = isum[r][1] = msum[r][0] = msum[r][1] = _mm256_setzero_si256();
      xq[r] = a.q.data() + (m0 + r) * k + sb * kSuper;
      bs[r] = a.bsum.data() + ((m0 + r) * nsb + sb) * 8;
    }
    for (int j = 0; j < 8; ++j) {
      __m256i s16[MR][2];
      for (int r = 0; r < MR; ++r) s16[r][0] = s16[r][1] = _mm256_setzero_si256();
      for (int i = 0; i < 4; ++i) {
        const int g = 4 * j + i;
        _mm_prefetch(reinterpret_cast<const char*>(t + kX16Bytes + 72 * g), _MM_HINT_T0);  // the next super-block
        __m256i x0[MR], x1[MR];
        for (int r = 0; r < MR; ++r) {
          int32_t v0, v1;
          std::memcpy(&v0, xq[r] + 8 * g, 4);
          std::memcpy(&v1, xq[r] + 8 * g + 4, 4);
          x0[r] = _mm256_set1_epi32(v0);
          x1[r] = _mm256_set1_epi32(v1);
        }
        for (int h = 0; h < 2; ++h) {
          const __m256i w = load256(t + 256 + 64 * g + 32 * h);
          const __m256i wl = _mm256_and_si256(w, lo4), wh = _mm256_and_si256(_mm256_srli_epi16(w, 4), lo4);
          for (int r = 0; r < MR; ++r)
            s16[r][h] = _mm256_add_epi16(s16[r][h], _mm256_add_epi16(_mm256_maddubs_epi16(wl, x0[r]),
                                                                     _mm256_maddubs_epi16(wh, x1[r])));
        }
      }
      for (int h = 0; h < 2; ++h) {
        const __m256i scale = row_pairs(sc[j], sc[j], h);
        for (int r = 0; r < MR; ++r) isum[r][h] = _mm256_add_epi32(isum[r][h], _mm256_madd_epi16(s16[r][h], scale));
        if (j % 2 == 0) continue;
        const __m256i mins = row_pairs(mn[j - 1], mn[j], h);  // times the activations' sums of sub-blocks j - 1, j
        for (int r = 0; r < MR; ++r) {
          int32_t two;
          std::memcpy(&two, bs[r] + j - 1, 4);
          msum[r][h] = _mm256_add_epi32(msum[r][h], _mm256_madd_epi16(mins, _mm256_set1_epi32(two)));
        }
      }
    }
    for (int h = 0; h < 2; ++h) {
      const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(t + 16 * h)));
      const __m256 dmin = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(t + 32 + 16 * h)));
      for (int r = 0; r < MR; ++r) {
        const __m256 xd = _mm256_set1_ps(a.d[(m0 + r) * nsb + sb]);
        acc[r][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[r][h]), _mm256_mul_ps(d, xd), acc[r][h]);
        acc[r][h] = _mm256_fnmadd_ps(_mm256_cvtepi32_ps(msum[r][h]), _mm256_mul_ps(dmin, xd), acc[r][h]);
      }
    }
  }
  for (int r = 0; r < MR; ++r) {
    _mm256_storeu_ps(y + r * ldy, acc[r][0]);
    _mm256_storeu_ps(y + r * ldy + 8, acc[r][1]);
  }
}

// Every activation row against tile ti, two rows at a time.
void x16_tile_avx2(const KMatrix& W, int64_t ti, const KActivations& a, int64_t m_rows, float* y) {
  const uint8_t* tile = W.q + ti * kTile * W.row_bytes;
  float* out = y + ti * kTile;
  int64_t m = 0;
  for (; m + 2 <= m_rows; m += 2) x16_rows_avx2<2>(tile, W.nsb, a, m, W.k, out + m * W.n, W.n);
  if (m < m_rows) x16_rows_avx2<1>(tile, W.nsb, a, m, W.k, out + m * W.n, W.n);
}

// `dequantize_x16` with AVX2: the same factors and the same product-then-difference per value.
void dequantize_x16_avx2(const uint8_t* t, float* out, int64_t ldo) {
  const __m128i lo4 = _mm_set1_epi8(0x0F);
  __m128i sc[8], mn[8];
  x16_scales(t, sc, mn);
  alignas(16) uint8_t s[8][16], m[8][16];
  for (int j = 0; j < 8; ++j) {
    _mm_store_si128(reinterpret_cast<__m128i*>(s[j]), sc[j]);
    _mm_store_si128(reinterpret_cast<__m128i*>(m[j]), mn[j]);
  }
  for (int r = 0; r < kTile; ++r) {
    const float d = f16_at(t + 2 * r), dmin = f16_at(t + 32 + 2 * r);
    for (int j = 0; j < 8; ++j) {
      const __m256 scale = _mm256_set1_ps(d * static_cast<float>(s[j][r]));
      const __m256 minv = _mm256_set1_ps(dmin * static_cast<float>(m[j][r]));
      for (int g = 4 * j; g < 4 * j + 4; ++g) {
        int32_t word;  // the row's 4 bytes of chunk g: values 8g .. 8g + 3 low, 8g + 4 .. 8g + 7 high
        std::memcpy(&word, t + 256 + 64 * g + 4 * r, 4);
        const __m128i w = _mm_cvtsi32_si128(word);
        const __m128i v = _mm_unpacklo_epi32(_mm_and_si128(w, lo4), _mm_and_si128(_mm_srli_epi16(w, 4), lo4));
        const __m256 f = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v));
        _mm256_storeu_ps(out + r * ldo + 8 * g, _mm256_sub_ps(_mm256_mul_ps(f, scale), minv));
      }
    }
  }
}

// `pack_ktile_x16` for kgemm_tile_avx2: the same values, and `pack_ktile_factors`'s integer factors.
void pack_ktile_x16_avx2(const uint8_t* tile, int64_t nsb, KTile& kt) {
  kt.q.resize(nsb * 8 * 8 * 64);
  kt.scale16.resize(nsb * 8 * kTile * 2);
  kt.min16.resize(nsb * 8 * kTile);
  kt.d.resize(nsb * kTile);
  kt.dmin.resize(nsb * kTile);
  const __m256i lo4 = _mm256_set1_epi8(0x0F);
  for (int64_t sb = 0; sb < nsb; ++sb) {
    const uint8_t* t = tile + sb * kX16Bytes;
    __m128i sc[8], mn[8];
    x16_scales(t, sc, mn);
    for (int h = 0; h < 2; ++h) {
      _mm256_storeu_ps(kt.d.data() + sb * kTile + 8 * h,
                       _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(t + 16 * h))));
      _mm256_storeu_ps(kt.dmin.data() + sb * kTile + 8 * h,
                       _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(t + 32 + 16 * h))));
    }
    for (int j = 0; j < 8; ++j) {
      const int64_t b = sb * 8 + j;
      for (int h = 0; h < 2; ++h) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(kt.scale16.data() + (b * kTile + 8 * h) * 2),
                            row_pairs(sc[j], sc[j], h));
        if (j % 2 == 1)
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(kt.min16.data() + ((b / 2) * kTile + 8 * h) * 2),
                              row_pairs(mn[j - 1], mn[j], h));
      }
      for (int i = 0; i < 4; ++i)
        for (int h = 0; h < 2; ++h) {
          const __m256i w = load256(t + 256 + 64 * (4 * j + i) + 32 * h);
          int8_t* dst = kt.q.data() + (b * 8 + 2 * i) * 64 + 32 * h;
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), _mm256_and_si256(w, lo4));
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 64), _mm256_and_si256(_mm256_srli_epi16(w, 4), lo4));
        }
    }
  }
}

// `kgemm`'s tile of rows n0 .. n0 + rows of W, whichever its layout. Not inlined: with the tiles' two packers
// inside `kgemm`'s loop over tiles, GCC compiled that loop's products 5-8% slower (Zen 1, Q4_K and Q6_K).
__attribute__((noinline)) void pack_tile(const KMatrix& W, int64_t n0, int64_t rows, int bv, KTile& t, bool vnni) {
  if (W.type == kQ4KX16 && vnni) pack_ktile_x16(W.q + n0 * W.row_bytes, W.nsb, t);
  else if (W.type == kQ4KX16) pack_ktile_x16_avx2(W.q + n0 * W.row_bytes, W.nsb, t);
  else pack_ktile(W, n0, rows, bv, t, vnni);
}
#endif

// Which code runs Q4_K in 16-row tiles: 2 the VNNI code, 1 the AVX2 code, 0 none (no SIMD build). Asked once,
// as `best_isa`: every `kgemv` of a tile matrix asks.
int x16_code() {
  static const int code = lfm2_simd::cpu_has_vnni512() ? 2 : best_isa() >= 1 ? 1 : 0;
  return code;
}

at::Tensor kgemv_isa(const at::Tensor& x, const at::Tensor& blocks, int64_t type, int64_t k, int64_t isa) {
  const KMatrix W = check(blocks, type, k, "kgemv");
  const int64_t m_rows = lfm2_act::input_rows(x, k, "kgemv");
  TORCH_CHECK(isa >= 0 && isa <= best_isa(), "lfm2 kgemv: code ", isa, " does not run here (best: ", best_isa(), ")");
  at::Tensor y = lfm2_act::output_for(x, W.n);
  if (type == kQ4KX16) {  // the VNNI code where asked for and there, else the AVX2 code
    TORCH_CHECK(isa >= 1 && x16_code() >= 1, "lfm2 kgemv: Q4_K in 16-row tiles (type 112) needs the AVX2 code; "
                "restore the file's layout with kunpack");
#if LFM2_AVX2
    const bool vnni = isa == 2 && x16_code() == 2;
    const KActivations a = quantize_activations_k(x.data_ptr<float>(), m_rows, k, false, false);
    float* yp = y.data_ptr<float>();
    const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / (kTile * W.row_bytes));
    at::parallel_for(0, W.n / kTile, grain, [&](int64_t t0, int64_t t1) {
      for (int64_t ti = t0; ti < t1; ++ti) {
        if (vnni) x16_tile(W, ti, a, m_rows, yp);
        else x16_tile_avx2(W, ti, a, m_rows, yp);
      }
    });
#endif
    return y;
  }
  const KActivations a = quantize_activations_k(x.data_ptr<float>(), m_rows, k, isa == 2, type == kQ6K);
  float* yp = y.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / W.row_bytes);
  at::parallel_for(0, W.n, grain, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
#if LFM2_AVX2
      if (isa == 2) {
        row_avx512(W, n, a, m_rows, yp);
        continue;
      }
#endif
      for (int64_t m = 0; m < m_rows; ++m) {
#if LFM2_AVX2
        if (isa == 1) yp[m * W.n + n] = dot_simd(W, n, a, m);
        else
#endif
          yp[m * W.n + n] = dot_scalar(W, n, a, m);
      }
    }
  });
  return y;
}

at::Tensor kgemv(const at::Tensor& x, const at::Tensor& blocks, int64_t type, int64_t k) {
  return kgemv_isa(x, blocks, type, k, best_isa());
}

int64_t kgemv_best_isa() { return best_isa(); }

// Rows of blocks as float32, or bfloat16 with `bf16` (rounded to nearest even from the float32
// values: a prefill GEMM in AMX tiles takes them without another pass over the weights).
at::Tensor kdequantize(const at::Tensor& blocks, int64_t type, int64_t k, bool bf16) {
  const KMatrix W = check(blocks, type, k, "kdequantize");
  TORCH_CHECK(type != kQ4KX16 || x16_code() >= 1, "lfm2 kdequantize: Q4_K in 16-row tiles (type 112) needs the "
              "AVX2 code");
  at::Tensor out = at::empty({W.n, k}, blocks.options().dtype(bf16 ? at::kBFloat16 : at::kFloat));
  float* of = bf16 ? nullptr : out.data_ptr<float>();
  at::BFloat16* ob = bf16 ? out.data_ptr<at::BFloat16>() : nullptr;
  if (type == kQ4KX16) {  // a tile's super-block at a time (the tiles exist only where the SIMD code runs)
#if LFM2_AVX2
    const bool vnni = x16_code() == 2;
    const auto dequantize = [vnni](const uint8_t* t, float* out, int64_t ldo) {
      if (vnni) dequantize_x16(t, out, ldo);
      else dequantize_x16_avx2(t, out, ldo);
    };
    at::parallel_for(0, W.n / kTile, 1, [&](int64_t t0, int64_t t1) {
      std::vector<float> tmp(bf16 ? kTile * kSuper : 0);
      for (int64_t ti = t0; ti < t1; ++ti)
        for (int64_t sb = 0; sb < W.nsb; ++sb) {
          const uint8_t* t = W.q + ti * kTile * W.row_bytes + sb * kX16Bytes;
          if (!bf16) {
            dequantize(t, of + ti * kTile * k + sb * kSuper, k);
            continue;
          }
          dequantize(t, tmp.data(), kSuper);
          for (int r = 0; r < kTile; ++r)
            for (int i = 0; i < kSuper; ++i) ob[(ti * kTile + r) * k + sb * kSuper + i] = at::BFloat16(tmp[r * kSuper + i]);
        }
    });
#endif
    return out;
  }
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / W.row_bytes);
  at::parallel_for(0, W.n, grain, [&](int64_t n0, int64_t n1) {
    int8_t v[kSuper];
    float scale[16], minv[16], tmp[kSuper];
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t sb = 0; sb < W.nsb; ++sb) {
        const uint8_t* blk = W.q + n * W.row_bytes + sb * block_bytes(type);
        float* o = bf16 ? tmp : of + n * k + sb * kSuper;
#if LFM2_AVX2
        dequantize_simd(type, blk, o);
#else
        factors(type, blk, scale, minv);
        unpack_values(type, blk, v);
        for (int i = 0; i < kSuper; ++i) o[i] = scale[i / 16] * static_cast<float>(v[i]) - minv[i / 16];
#endif
        if (bf16) {
          at::BFloat16* ob_row = ob + n * k + sb * kSuper;
          for (int i = 0; i < kSuper; ++i) ob_row[i] = at::BFloat16(tmp[i]);
        }
      }
  });
  return out;
}

at::Tensor kgemm(const at::Tensor& x, const at::Tensor& blocks, int64_t type, int64_t k) {
  const KMatrix W = check(blocks, type, k, "kgemm");
  const int64_t m_rows = lfm2_act::input_rows(x, k, "kgemm");
  TORCH_CHECK(LFM2_AVX2, "lfm2 kgemm: needs the SIMD build (AVX2; check lfm2_quant.simd() first)");
  at::Tensor y = lfm2_act::output_for(x, W.n);
#if LFM2_AVX2
  // kgemv's activations (for Q6_K as unsigned bytes q + 128) with the block sums (for the minimums: floats
  // for the VNNI code, int16 for the AVX2 code), in parallel and straight into buffers that are not zero-filled
  // first (megabytes at a prefill)
  const bool vnni = lfm2_simd::cpu_has_vnni512(), halved = lfm2_simd::avx2_halved();
  const int64_t nsb_all = m_rows * W.nsb;
  const std::unique_ptr<uint8_t[]> xu(new uint8_t[m_rows * k]);
  const std::unique_ptr<float[]> xd(new float[nsb_all]), xs(new float[vnni ? nsb_all * 8 : 0]);
  const std::unique_ptr<int16_t[]> xs16(new int16_t[vnni ? 0 : nsb_all * 8]);
  const float* xp = x.data_ptr<float>();
  const int bv = type == kQ6K ? 16 : 32;
  at::parallel_for(0, nsb_all, 64, [&](int64_t i0, int64_t i1) {
    int8_t* q = reinterpret_cast<int8_t*>(xu.get());
    for (int64_t i = i0; i < i1; ++i) {  // unsigned for Q6_K's signed values, signed for Q4_K / Q5_K's unsigned ones
      const float* from = xp + i * kSuper;
      if (vnni) xd[i] = bv == 16 ? quantize_superblock<true, float>(from, q + i * kSuper, xs.get() + i * 8)
                                 : quantize_superblock<false, float>(from, q + i * kSuper, xs.get() + i * 8);
      else xd[i] = bv == 16 ? quantize_superblock<true>(from, q + i * kSuper, xs16.get() + i * 8)
                            : quantize_superblock<false>(from, q + i * kSuper, xs16.get() + i * 8);
    }
  });
  float* yp = y.data_ptr<float>();
  const bool q4k = type == kQ4K || type == kQ4KX16;
  at::parallel_for(0, (W.n + kTile - 1) / kTile, 1, [&](int64_t t0, int64_t t1) {
    KTile t;
    for (int64_t ti = t0; ti < t1; ++ti) {
      const int64_t n0 = ti * kTile, cols = std::min<int64_t>(kTile, W.n - n0);
      pack_tile(W, n0, cols, bv, t, vnni);
      const uint8_t* u = xu.get();
      const float* d = xd.get();
      const int16_t* s16 = xs16.get();
      if (vnni && bv == 16) kgemm_rows<16>(t, W, u, d, xs.get(), m_rows, yp, n0, cols);
      else if (vnni) kgemm_rows<32>(t, W, u, d, xs.get(), m_rows, yp, n0, cols);
      else if (bv == 16) kgemm_rows_avx2<16, 2, 4>(t, W, u, d, s16, m_rows, yp, n0, cols);
      else if (halved && q4k) kgemm_rows_avx2<32, 8, 2>(t, W, u, d, s16, m_rows, yp, n0, cols);
      else if (halved) kgemm_rows_avx2<32, 4, 2>(t, W, u, d, s16, m_rows, yp, n0, cols);
      else kgemm_rows_avx2<32, 4, 4>(t, W, u, d, s16, m_rows, yp, n0, cols);
    }
  });
#endif
  return y;
}

// ---------------------------------------------------------------------------------------------
// The experts of an LFM2-MoE block in K-quants, in one call: moe.cpp's `moe_experts` for files
// whose expert tensors are Q4_K / Q5_K / Q6_K (a Q4_K_M file has gate/up in Q4_K and down in Q4_K
// or Q6_K). The same two passes and summation order (`lfm2_moe::two_passes`, moe_slots.h); each product
// is `kgemv`'s, so a row here equals KQuantLinear's result for that token and expert.

// Weight row n of W against activation row m, with the code `isa` (as kgemv_isa).
LFM2_INLINE float kdot(const KMatrix& W, int64_t n, const KActivations& a, int64_t m, int isa) {
#if LFM2_AVX2
  if (isa == 2) {
    float out;
    rows_avx512<1>(W, n, a, m, &out);
    return out;
  }
  if (isa == 1) return dot_simd(W, n, a, m);
#endif
  return dot_scalar(W, n, a, m);
}

at::Tensor kmoe_experts(const at::Tensor& x, const at::Tensor& chosen, const at::Tensor& weights, at::TensorList w1,
                        at::TensorList w3, at::TensorList w2, int64_t t1, int64_t t3, int64_t t2) {
  lfm2_moe::check_routing(x, chosen, weights, "kmoe_experts");
  using lfm2_moe::expert_at;
  using lfm2_moe::num_experts;
  const int64_t M = x.size(0), D = x.size(1), E = num_experts(w1), K = chosen.size(1);
  TORCH_CHECK(E > 0 && num_experts(w3) == E && num_experts(w2) == E,
              "lfm2 kmoe_experts: w1, w3, w2 must hold the same number of experts (", E, ")");
  // Q4_K tiles run 16 rows at a time (w1 and w3 together: a tile's rows of the other in another type one by
  // one), other types a row at a time
  const bool tiles13 = t1 == kQ4KX16 || t3 == kQ4KX16, tiles2 = t2 == kQ4KX16;
  TORCH_CHECK(!(tiles13 || tiles2) || x16_code() >= 1,
              "lfm2 kmoe_experts: Q4_K in 16-row tiles (type 112) needs the AVX2 code");
  const int64_t H = expert_at(w1, 0).size(0);
  const int isa = best_isa();
  [[maybe_unused]] const int x16 = x16_code();

  const lfm2_moe::ExpertSlots g = lfm2_moe::group_slots(chosen, E, "kmoe_experts");
  const int64_t U = g.count();
  // KMatrix points into the tensors; a stacked expert's blocks are its slice's (lfm2_moe::expert_matrices)
  const auto matrices = [&](at::TensorList list, int64_t t, int64_t k, const char* op) {
    return lfm2_moe::expert_matrices<KMatrix>(
        g, lfm2_moe::stacked(list), [&](int64_t e) { return check(expert_at(list, e), t, k, op); },
        [&](KMatrix W, int64_t e) {
          W.q += e * list[0].stride(0);
          return W;
        });
  };
  const std::vector<KMatrix> W1 = matrices(w1, t1, D, "kmoe_experts (w1)"), W3 = matrices(w3, t3, D, "kmoe_experts (w3)"),
                             W2 = matrices(w2, t2, H, "kmoe_experts (w2)");
  for (int64_t u = 0; u < U; ++u) {
    const int64_t e = g.experts[u];
    TORCH_CHECK(W1[u].n == H && W3[u].n == H && W2[u].n == D, "lfm2 kmoe_experts: expert ", e,
                " has w1/w3 of ", W1[u].n, "/", W3[u].n, " rows and w2 of ", W2[u].n, "; expected ", H, " and ", D);
  }

  // each product is kgemv's (the tiles' code or rows_avx512 / dot_simd / dot_scalar), on kgemv's activations
  const int64_t unit13 = tiles13 ? kTile : 1;
  const KActivations xa = quantize_activations_k(x.data_ptr<float>(), M, D, isa == 2 && t1 + t3 != 2 * kQ4KX16,
                                                  t1 == kQ6K || t3 == kQ6K);
  const auto rows13 = [&](const KMatrix& W, int64_t n0, int64_t m, float* out) {
#if LFM2_AVX2
    if (W.type == kQ4KX16 && x16 == 2) return x16_rows<1>(W.q + n0 * W.row_bytes, W.nsb, xa, m, D, out, 0);
    if (W.type == kQ4KX16) return x16_rows_avx2<1>(W.q + n0 * W.row_bytes, W.nsb, xa, m, D, out, 0);
#endif
    for (int64_t l = 0; l < unit13; ++l) out[l] = kdot(W, n0 + l, xa, m, isa);
  };
  KActivations ha;
  return lfm2_moe::two_passes_units(
      x, weights, g, H, unit13, tiles2 ? kTile : 1, W1[0].row_bytes, W2[0].row_bytes,
      [&](int64_t u, int64_t n0, int64_t m, float* a, float* b) {
        rows13(W1[u], n0, m, a);
        rows13(W3[u], n0, m, b);
      },
      [&](const std::vector<float>& h) {
        ha = quantize_activations_k(h.data(), M * K, H, isa == 2 && !tiles2, t2 == kQ6K);
      },
      [&](int64_t u, int64_t n0, int64_t slot, const float*, float* out) {
#if LFM2_AVX2
        if (tiles2 && x16 == 2) return x16_rows<1>(W2[u].q + n0 * W2[u].row_bytes, W2[u].nsb, ha, slot, H, out, 0);
        if (tiles2) return x16_rows_avx2<1>(W2[u].q + n0 * W2[u].row_bytes, W2[u].nsb, ha, slot, H, out, 0);
#endif
        out[0] = kdot(W2[u], n0, ha, slot, isa);
      });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lfm2_quant, m) {
  m.def("kgemv(Tensor x, Tensor blocks, int type, int k) -> Tensor");
  m.def("kgemv_isa(Tensor x, Tensor blocks, int type, int k, int isa) -> Tensor");
  m.def("kgemv_best_isa() -> int", &kgemv_best_isa);
  m.def("kdequantize(Tensor blocks, int type, int k, bool bf16=False) -> Tensor");
  m.def("kpack_(Tensor(a!) blocks, int type, int k) -> ()");
  m.def("kunpack(Tensor blocks, int type, int k) -> Tensor");
  m.def("kgemm(Tensor x, Tensor blocks, int type, int k) -> Tensor");
  m.def("kmoe_experts(Tensor x, Tensor chosen, Tensor weights, Tensor[] w1, Tensor[] w3, Tensor[] w2, int t1, "
        "int t3, int t2) -> Tensor");
}

TORCH_LIBRARY_IMPL(lfm2_quant, CPU, m) {
  m.impl("kgemv", &kgemv);
  m.impl("kgemv_isa", &kgemv_isa);
  m.impl("kdequantize", &kdequantize);
  m.impl("kpack_", &kpack_);
  m.impl("kunpack", &kunpack);
  m.impl("kgemm", &kgemm);
  m.impl("kmoe_experts", &kmoe_experts);
}
