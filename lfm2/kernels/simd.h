// Small SIMD helpers shared by lfm2's kernels (qgemv.cpp, kquant.cpp, attention.cpp, moe.cpp).
#pragma once

#include <cstdlib>
#include <cstring>

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

// The core of Cephes' single-precision expf, 8 at a time: x = n ln2 + r with |r| <= ln2 / 2 (ln2 in two parts),
// exp(r) by its degree-5 polynomial. Returns exp(r) and sets n; the caller clamps x first and scales by 2^n
// (attention.cpp's softmax in one factor, swiglu.cpp's gate in two, where n reaches 128).
inline __m256 exp_reduced(__m256 x, __m256i* n) {
  const __m256 fn = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(fn, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(fn, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  *n = _mm256_cvtps_epi32(fn);
  return _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
}

// 2^n as floats, for n in float32's normal exponents (-126..127).
inline __m256 pow2(__m256i n) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n, _mm256_set1_epi32(127)), 23));
}

// A 4 x 4 transpose of 32-bit lanes: out[k] = lane k of r[0], r[1], r[2], r[3] (the GEMMs' tile packing:
// qgemv.cpp's pack_tile16, kquant.cpp's pack_ktile).
inline void transpose4_epi32(const __m128i r[4], __m128i out[4]) {
  const __m128i t0 = _mm_unpacklo_epi32(r[0], r[1]), t1 = _mm_unpackhi_epi32(r[0], r[1]);
  const __m128i t2 = _mm_unpacklo_epi32(r[2], r[3]), t3 = _mm_unpackhi_epi32(r[2], r[3]);
  out[0] = _mm_unpacklo_epi64(t0, t2);
  out[1] = _mm_unpackhi_epi64(t0, t2);
  out[2] = _mm_unpacklo_epi64(t1, t3);
  out[3] = _mm_unpackhi_epi64(t1, t3);
}

// The first `cols` of a tile's 16 float results, held as two 256-bit halves, to y (the AVX2 GEMMs' store).
inline void store_16(float* y, const __m256 half[2], int64_t cols) {
  alignas(32) float out[16];
  _mm256_store_ps(out, half[0]);
  _mm256_store_ps(out + 8, half[1]);
  std::memcpy(y, out, cols * sizeof(float));
}

// vnni_block's AVX2 form, for CPUs without AVX-512 VNNI: the 16 rows of a group as two 256-bit halves, and
// vpdpbusd as vpmaddubsw (pairs of unsigned x signed bytes into int16) then vpmaddwd against ones (pairs of
// int16 into int32), the sequence llama.cpp's AVX2 dot products use (ggml-cpu/arch/x86/quants.c). vpmaddubsw
// saturates at 32767, so it is exact where 2 x max unsigned x max |signed| fits: Q4_0 (-8..7 against
// activations + 128: 4,080), Q6_K (-32..31: 16,320), Q4_K / Q5_K (0..31 against activations -127..127:
// 7,874). S groups' int16 sums are added before one vpmaddwd, as many as stay below 32768 (Q4_0: 8, Q4_K /
// Q5_K: 4, Q6_K: 2). Q8_0's values (-128..127) do not fit against unsigned activations: with kSigned the
// activations are taken back to signed (q + 128 xor 128), each carries its weight's sign (vpsignb) and
// multiplies the weight's magnitude (vpabsb): 2 x 128 x 127 = 32,512 at most (S = 1), and no offset to take off.
// With kScaled the widening vpmaddwd multiplies by `scale` (per half: each row's int16 block scale in both of
// its lanes) instead of ones, and isum is added to, not set: the K-quant GEMM sums a super-block's blocks,
// each times its integer scale, exactly in int32 (kquant.cpp's kgemm_tile_avx2), as llama.cpp's AVX2 Q4_K dot
// product does (ggml-cpu/arch/x86/quants.c), for the same vpmaddwd count.
template <int MR, int G, int S, bool kUnsignedWeights = false, bool kSigned = false, bool kScaled = false>
__attribute__((target("avx2,fma,f16c"), always_inline)) inline void
avx2_block(const int8_t* wq, const uint8_t* xu, int64_t kp, __m256i isum[MR][2], const __m256i* scale = nullptr) {
  static_assert(G % S == 0 && (!kSigned || S == 1), "avx2_block: S groups per widening must divide G");
  const __m256i ones = _mm256_set1_epi16(1), h128 = _mm256_set1_epi8(static_cast<char>(0x80));
  if (!kScaled)
    for (int r = 0; r < MR; ++r) isum[r][0] = isum[r][1] = _mm256_setzero_si256();
  for (int g0 = 0; g0 < G; g0 += S) {
    __m256i p16[MR][2];
#pragma GCC unroll 8  // S = 8 left as a loop kept p16 in memory: 2x slower (Q4_K, 2 rows, Zen 1)
    for (int g = g0; g < g0 + S; ++g) {
      __m256i w[2], mag[2];
      for (int h = 0; h < 2; ++h) {
        w[h] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wq + g * 64 + 32 * h));
        if (kSigned) mag[h] = _mm256_abs_epi8(w[h]);
      }
      for (int r = 0; r < MR; ++r) {
        int32_t four;
        std::memcpy(&four, xu + r * kp + 4 * g, 4);
        __m256i x = _mm256_set1_epi32(four);
        if (kSigned) x = _mm256_xor_si256(x, h128);
        for (int h = 0; h < 2; ++h) {
          const __m256i p = kUnsignedWeights ? _mm256_maddubs_epi16(w[h], x)
                            : kSigned        ? _mm256_maddubs_epi16(mag[h], _mm256_sign_epi8(x, w[h]))
                                             : _mm256_maddubs_epi16(x, w[h]);
          p16[r][h] = g == g0 ? p : _mm256_add_epi16(p16[r][h], p);
        }
      }
    }
    for (int r = 0; r < MR; ++r)
      for (int h = 0; h < 2; ++h)
        isum[r][h] = _mm256_add_epi32(isum[r][h], _mm256_madd_epi16(p16[r][h], kScaled ? scale[h] : ones));
  }
}

}  // namespace lfm2_simd
#endif

namespace lfm2_simd {

// `LFM2_KERNEL_ISA` (read once; `lfm2.kernels.ISA_ENV` documents it): 0 unset, 1 "avx2", 2 "avx2-128".
inline int isa_setting() {
  static const int setting = [] {
    const char* v = std::getenv("LFM2_KERNEL_ISA");
    if (v == nullptr) return 0;
    if (std::strcmp(v, "avx2") == 0 || std::strcmp(v, "AVX2") == 0) return 1;
    return std::strcmp(v, "avx2-128") == 0 || std::strcmp(v, "AVX2-128") == 0 ? 2 : 0;
  }();
  return setting;
}

// Whether the kernels are capped at their AVX2 code: to test and measure, on an AVX-512 CPU, what a CPU with
// AVX2 only runs.
inline bool capped_at_avx2() { return isa_setting() != 0; }

// Whether this CPU runs 256-bit vector operations as two 128-bit halves (AMD Zen 1 / Zen+), or
// `LFM2_KERNEL_ISA=avx2-128` says to act as if. There the one vector pipe that multiplies integers is the
// bound of the AVX2 GEMMs, and fewer activation rows a pass with more int16 sums before each vpmaddwd
// won (`kquant.cpp`'s kgemm); on Zen 4 capped at AVX2 the other way round (docs/benchmarks.md).
inline bool avx2_halved() {
  static const bool halved = [] {
    if (isa_setting() != 0) return isa_setting() == 2;
#if defined(__AVX2__) && (defined(__GNUC__) || defined(__clang__))
    __builtin_cpu_init();
    return __builtin_cpu_is("znver1") != 0;
#else
    return false;
#endif
  }();
  return halved;
}

// Whether this CPU runs the VNNI GEMMs (qgemv.cpp's `qgemm`, kquant.cpp's `kgemm`): AVX-512 VNNI, and
// the BW and VL instructions their packing uses. False where the SIMD code is not built.
inline bool cpu_has_vnni512() {
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  return !capped_at_avx2() && __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl");
#else
  return false;
#endif
}

}  // namespace lfm2_simd
