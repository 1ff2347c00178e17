// Quantized matrix-vector and matrix-matrix products and dequantization for lfm2 (see lfm2/quant.py).
//
// The weight format, shared with lfm2/quant.py:
// - a matrix of N rows (outputs) by K columns (inputs), row-major;
// - int8: `qweight` int8 (N, K), value = q * scale;
// - int4: `qweight` uint8 (N, K / 2); each block of 32 values of a row is 16 bytes whose byte j
//   holds value j in its low nibble and value j + 16 in its high nibble, stored as q + 8
//   (0..15 for q in -8..7): GGUF's Q4_0 block;
// - `scales` float16 (N, K / group_size): one scale per group of 32, 64 or 128 consecutive
//   values of a row, or one per row (int8 only, any K).
//
// `qgemv` computes y = x @ W^T for a few rows of x (decode). It streams the weights once per
// call and comes in two numerics:
// - int8 activations (the default in lfm2.quant): each block of 32 activations is quantized to
//   int8 with its own float scale (max |x| / 127, round to nearest even), block dot products
//   are exact integer sums (vpmaddubsw / vpmaddwd), and eight blocks at a time are reduced to
//   one vector, converted to float and scaled together. int4 weights are unpacked two blocks
//   per 32-byte load against activations laid out to match. About 5-6 vector instructions per
//   block of 32 weights, and software prefetch ahead of the hardware's;
// - float activations: weights are widened to float32 in registers and multiplied with the
//   exact activations (FMA). No activation rounding, about twice the instructions.
// On CPUs with AVX-512 VNNI, int4 matrices with groups of 32 may instead be in 16-row tiles (x16,
// q4_tiles.h: `qpack_` makes them in place, `qunpack` restores this layout), which `qgemv` and `qgemm`
// take with x16 = true.
// `qgemm` is the many-row (prefill) product on CPUs with AVX-512 VNNI: the same int8-activation
// numerics, integer block dot products by vpdpbusd on weight tiles repacked per call (see below).
// Elsewhere, `dequantize` widens rows to float32 for a float GEMM on dequantized tiles, which
// beats any GEMV at many rows.
//
// The SIMD code needs AVX2, FMA and F16C (every AVX2 CPU has F16C); without them the same
// functions compile to portable scalar C++ with identical integer arithmetic.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#endif
#include "activations.h"
#include "q4_tiles.h"
#include "simd.h"  // its SIMD helpers only where the SIMD code is built

namespace {

using lfm2_act::kBlock;
using lfm2_act::half_to_float;
using lfm2_act::QActivations;
using lfm2_act::quantize_activations;
#if LFM2_AVX2
using lfm2_act::hsum_i32;
using lfm2_simd::hsum;
#endif

constexpr int kMaxRows = 4;     // rows of x that the float path processes per pass over a weight row
constexpr int64_t kPrefetchBytes = 2048;  // how far ahead the int8-activation GEMV prefetches weights


// One quantized weight matrix, as raw pointers. Block b of a row (values 32b .. 32b+31) has the
// scale s[b >> shift]: shift is log2(group_size / 32), or 62 for one group per row. Only a
// one-group (per-channel) int8 matrix can have a ragged tail of K % 32 values after its nb blocks.
struct QMatrix {
  const uint8_t* q;
  const at::Half* s;
  int64_t n, k, row_bytes, groups, group_size, nb;
  int bits, shift;
};

// ---------------------------------------------------------------------------------------------
// Scalar helpers shared by both builds

// Value k of weight row w as an integer (before scaling).
template <int BITS>
inline int32_t weight_at(const uint8_t* w, int64_t k) {
  if (BITS == 8) return reinterpret_cast<const int8_t*>(w)[k];
  const int64_t j = k % kBlock;
  const uint8_t byte = w[(k / kBlock) * 16 + (j & 15)];
  return (j < 16 ? byte & 15 : byte >> 4) - 8;
}

// The ragged tail of a per-channel row (values nb*32 .. K), in float with the row's one scale s.
template <int BITS>
inline float tail_dot(const QMatrix& W, const uint8_t* w, at::Half s, const float* x) {
  float sum = 0.f;
  for (int64_t k = W.nb * kBlock; k < W.k; ++k) sum += static_cast<float>(weight_at<BITS>(w, k)) * x[k];
  return sum * half_to_float(s);
}

// Exact integer dot product of weight block b with a quantized activation block (scalar).
template <int BITS>
inline int32_t block_dot_scalar(const uint8_t* w, int64_t b, const int8_t* xq) {
  int32_t dot = 0;
  for (int64_t j = 0; j < kBlock; ++j) dot += weight_at<BITS>(w, b * kBlock + j) * xq[j];
  return dot;
}

#if LFM2_AVX2

// ---------------------------------------------------------------------------------------------
// Int8 activations, AVX2

// 32 int4 values (16 bytes) -> 32 bytes 0..15 in value order: low nibbles, then high nibbles.
inline __m256i unpack_nibbles(const uint8_t* p) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m256i both = _mm256_set_m128i(_mm_srli_epi16(raw, 4), raw);
  return _mm256_and_si256(both, _mm256_set1_epi8(0x0F));
}

// The integer dot product of weight block b with activation block xq, as 8 int32 partial sums.
// int4 returns sum (q + 8) x: the caller subtracts 8 sum x.
template <int BITS>
inline __m256i block_isum(const uint8_t* w, int64_t b, const int8_t* xq) {
  const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + b * kBlock));
  __m256i p16;
  if (BITS == 8) {
    const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + b * kBlock));
    // vpmaddubsw takes one unsigned operand: |w| times x carrying w's sign. Pairs stay in
    // int16: 2 * 128 * 127 < 32768 (|-128| is 128 as an unsigned byte).
    p16 = _mm256_maddubs_epi16(_mm256_sign_epi8(wv, wv), _mm256_sign_epi8(xv, wv));
  } else {
    p16 = _mm256_maddubs_epi16(unpack_nibbles(w + b * 16), xv);  // q + 8 is already unsigned
  }
  return _mm256_madd_epi16(p16, _mm256_set1_epi16(1));
}

// The integer dot products of int4 weight blocks b and b+1 (one 32-byte load) with activations
// in pair layout: 8 int32 partial sums, the low four of block b, the high four of block b+1.
// Returns sum (q + 8) x for each block; the caller subtracts 8 sum x.
inline __m256i pair_isum_int4(const uint8_t* w, int64_t b, const int8_t* pairs) {
  const __m256i m4 = _mm256_set1_epi8(0x0F);
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + b * 16));
  const __m256i lo = _mm256_and_si256(raw, m4), hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), m4);
  const __m256i* xp = reinterpret_cast<const __m256i*>(pairs + b * kBlock);
  // Each int16 lane sums four products of at most 15 * 127: no saturation.
  const __m256i p16 = _mm256_add_epi16(_mm256_maddubs_epi16(lo, _mm256_loadu_si256(xp)),
                                       _mm256_maddubs_epi16(hi, _mm256_loadu_si256(xp + 1)));
  return _mm256_madd_epi16(p16, _mm256_set1_epi16(1));
}

// Sums of blocks b .. b+7 in block order, each an exact integer dot product.
template <int BITS>
inline __m256i chunk_isums(const uint8_t* w, int64_t b, const int8_t* xq, const int8_t* pairs) {
  if (BITS == 4) {
    // hadd within 128-bit lanes: [b b+2 b+4 b+6 | b+1 b+3 b+5 b+7], then back in order.
    const __m256i h0 = _mm256_hadd_epi32(pair_isum_int4(w, b, pairs), pair_isum_int4(w, b + 2, pairs));
    const __m256i h1 = _mm256_hadd_epi32(pair_isum_int4(w, b + 4, pairs), pair_isum_int4(w, b + 6, pairs));
    return _mm256_permutevar8x32_epi32(_mm256_hadd_epi32(h0, h1), _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
  }
  // Eight vectors of partial sums -> one of eight block sums: hadd within 128-bit lanes, then
  // the two lanes added crosswise.
  const __m256i h01 = _mm256_hadd_epi32(block_isum<BITS>(w, b, xq), block_isum<BITS>(w, b + 1, xq));
  const __m256i h23 = _mm256_hadd_epi32(block_isum<BITS>(w, b + 2, xq), block_isum<BITS>(w, b + 3, xq));
  const __m256i h45 = _mm256_hadd_epi32(block_isum<BITS>(w, b + 4, xq), block_isum<BITS>(w, b + 5, xq));
  const __m256i h67 = _mm256_hadd_epi32(block_isum<BITS>(w, b + 6, xq), block_isum<BITS>(w, b + 7, xq));
  const __m256i lo = _mm256_hadd_epi32(h01, h23), hi = _mm256_hadd_epi32(h45, h67);
  return _mm256_add_epi32(_mm256_permute2x128_si256(lo, hi, 0x20), _mm256_permute2x128_si256(lo, hi, 0x31));
}

// The float weight scales of blocks b .. b+7 of a row.
inline __m256 scales8(const QMatrix& W, const at::Half* s, int64_t b) {
  if (W.groups == 1) return _mm256_set1_ps(half_to_float(s[0]));
  if (W.shift == 0) return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + b)));
  if (W.shift == 1) {  // 4 scales, each for 2 blocks
    const __m256 four = _mm256_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(s + (b >> 1))));
    return _mm256_permutevar8x32_ps(four, _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3));
  }
  int32_t two;  // shift 2: 2 scales, each for 4 blocks
  std::memcpy(&two, s + (b >> 2), sizeof(two));
  return _mm256_permutevar8x32_ps(_mm256_cvtph_ps(_mm_cvtsi32_si128(two)), _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1));
}

// Weight row n against activation row m of `a`: sum over blocks of w_scale * x_scale * integer dot.
template <int BITS>
float dot_q8(const QMatrix& W, int64_t n, const QActivations& a, int64_t m, const float* x) {
  const uint8_t* w = W.q + n * W.row_bytes;
  const at::Half* s = W.s + n * W.groups;
  const int8_t* xq = a.q.data() + m * a.nb * kBlock;
  const float* xd = a.d.data() + m * a.nb;
  const int32_t* xs = a.sum.data() + m * a.nb;
  __m256 acc = _mm256_setzero_ps();
  int64_t b = 0;
  const int8_t* pairs = BITS == 4 ? a.pairs.data() + m * a.nb * kBlock : nullptr;
  constexpr int64_t chunk_bytes = 8 * kBlock * BITS / 8;
  for (; b + 8 <= W.nb; b += 8) {
    // Ask for the weights 2 KiB ahead (into the next rows at a row's end): the hardware
    // prefetcher alone leaves a single thread well short of the memory bandwidth (measured:
    // 15% faster int4, 8% faster int8 decode steps).
    for (int64_t off = 0; off < chunk_bytes; off += 64)
      _mm_prefetch(reinterpret_cast<const char*>(w + b * chunk_bytes / 8 + kPrefetchBytes + off), _MM_HINT_T0);
    __m256i sums = chunk_isums<BITS>(w, b, xq, pairs);
    if (BITS == 4)
      sums = _mm256_sub_epi32(sums, _mm256_slli_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(xs + b)), 3));
    const __m256 scale = _mm256_mul_ps(scales8(W, s, b), _mm256_loadu_ps(xd + b));
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), scale, acc);
  }
  float res = hsum(acc);
  for (; b < W.nb; ++b) {
    const int32_t dot = hsum_i32(block_isum<BITS>(w, b, xq)) - (BITS == 4 ? 8 * xs[b] : 0);
    res += half_to_float(s[b >> W.shift]) * xd[b] * static_cast<float>(dot);
  }
  if (W.nb * kBlock < W.k) res += tail_dot<BITS>(W, w, s[0], x);
  return res;
}

// ---------------------------------------------------------------------------------------------
// Float activations, AVX2

// Block b of row w against MR float activation rows x (stride K): acc[r] += scale * dot.
template <int BITS, int MR>
inline void block_f32(const QMatrix& W, const uint8_t* w, const at::Half* s, int64_t b, const float* x,
                      __m256 (&acc)[MR]) {
  __m256 wf[4];
  if (BITS == 8) {
    const int8_t* wq = reinterpret_cast<const int8_t*>(w) + b * kBlock;
    for (int j = 0; j < 4; ++j)
      wf[j] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(wq + 8 * j))));
  } else {
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + b * 16));
    const __m128i m4 = _mm_set1_epi8(0x0F), eight = _mm_set1_epi8(8);
    const __m128i lo = _mm_sub_epi8(_mm_and_si128(raw, m4), eight);                     // values 0..15
    const __m128i hi = _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(raw, 4), m4), eight);  // values 16..31
    wf[0] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo));
    wf[1] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(lo, 8)));
    wf[2] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi));
    wf[3] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(hi, 8)));
  }
  const __m256 sc = _mm256_set1_ps(half_to_float(s[b >> W.shift]));
  for (int r = 0; r < MR; ++r) {
    const float* xr = x + r * W.k + b * kBlock;
    __m256 t0 = _mm256_mul_ps(wf[0], _mm256_loadu_ps(xr));
    __m256 t1 = _mm256_mul_ps(wf[1], _mm256_loadu_ps(xr + 8));
    t0 = _mm256_fmadd_ps(wf[2], _mm256_loadu_ps(xr + 16), t0);
    t1 = _mm256_fmadd_ps(wf[3], _mm256_loadu_ps(xr + 24), t1);
    acc[r] = _mm256_fmadd_ps(_mm256_add_ps(t0, t1), sc, acc[r]);
  }
}

// Weight row n against MR float activation rows x (stride K). U blocks are in flight at once,
// each into its own accumulators, to hide the FMA latency.
template <int BITS, int MR>
void dot_f32(const QMatrix& W, int64_t n, const float* x, float* out) {
  constexpr int U = MR == 1 ? 4 : 2;
  const uint8_t* w = W.q + n * W.row_bytes;
  const at::Half* s = W.s + n * W.groups;
  __m256 acc[U][MR];
  for (int u = 0; u < U; ++u)
    for (int r = 0; r < MR; ++r) acc[u][r] = _mm256_setzero_ps();
  int64_t b = 0;
  for (; b + U <= W.nb; b += U)
    for (int u = 0; u < U; ++u) block_f32<BITS, MR>(W, w, s, b + u, x, acc[u]);
  for (; b < W.nb; ++b) block_f32<BITS, MR>(W, w, s, b, x, acc[0]);
  for (int r = 0; r < MR; ++r) {
    __m256 t = acc[0][r];
    for (int u = 1; u < U; ++u) t = _mm256_add_ps(t, acc[u][r]);
    out[r] = hsum(t) + (W.nb * kBlock < W.k ? tail_dot<BITS>(W, w, s[0], x + r * W.k) : 0.f);
  }
}

#else  // portable scalar C++: the same arithmetic, one value at a time

template <int BITS>
float dot_q8(const QMatrix& W, int64_t n, const QActivations& a, int64_t m, const float* x) {
  const uint8_t* w = W.q + n * W.row_bytes;
  const at::Half* s = W.s + n * W.groups;
  const int8_t* xq = a.q.data() + m * a.nb * kBlock;
  float res = 0.f;
  for (int64_t b = 0; b < W.nb; ++b)
    res += half_to_float(s[b >> W.shift]) * a.d[m * a.nb + b] *
           static_cast<float>(block_dot_scalar<BITS>(w, b, xq + b * kBlock));
  if (W.nb * kBlock < W.k) res += tail_dot<BITS>(W, w, s[0], x);
  return res;
}

template <int BITS, int MR>
void dot_f32(const QMatrix& W, int64_t n, const float* x, float* out) {
  const uint8_t* w = W.q + n * W.row_bytes;
  const at::Half* s = W.s + n * W.groups;
  for (int r = 0; r < MR; ++r) {
    float res = 0.f;
    for (int64_t b = 0; b < W.nb; ++b) {
      float dot = 0.f;
      for (int64_t j = 0; j < kBlock; ++j)
        dot += static_cast<float>(weight_at<BITS>(w, b * kBlock + j)) * x[r * W.k + b * kBlock + j];
      res += half_to_float(s[b >> W.shift]) * dot;
    }
    out[r] = res + (W.nb * kBlock < W.k ? tail_dot<BITS>(W, w, s[0], x + r * W.k) : 0.f);
  }
}

#endif

// Weight row n against every row of x, writing column n of y (M, N).
template <int BITS>
void row_q8(const QMatrix& W, int64_t n, const float* x, const QActivations& a, int64_t m_rows, float* y) {
  for (int64_t m = 0; m < m_rows; ++m) y[m * W.n + n] = dot_q8<BITS>(W, n, a, m, x + m * W.k);
}

template <int BITS>
void row_f32(const QMatrix& W, int64_t n, const float* x, int64_t m_rows, float* y) {
  float out[kMaxRows];
  for (int64_t m0 = 0; m0 < m_rows; m0 += kMaxRows) {
    const int64_t mr = std::min<int64_t>(kMaxRows, m_rows - m0);
    const float* xm = x + m0 * W.k;
    switch (mr) {
      case 1: dot_f32<BITS, 1>(W, n, xm, out); break;
      case 2: dot_f32<BITS, 2>(W, n, xm, out); break;
      case 3: dot_f32<BITS, 3>(W, n, xm, out); break;
      default: dot_f32<BITS, 4>(W, n, xm, out); break;
    }
    for (int64_t r = 0; r < mr; ++r) y[(m0 + r) * W.n + n] = out[r];
  }
}

// ---------------------------------------------------------------------------------------------
// Operators

QMatrix check_matrix(const at::Tensor& qweight, const at::Tensor& scales, int64_t bits, int64_t group_size) {
  TORCH_CHECK(bits == 8 || bits == 4, "lfm2 qgemv: bits must be 8 or 4, got ", bits);
  TORCH_CHECK(qweight.device().is_cpu() && scales.device().is_cpu(), "lfm2 qgemv: tensors must be on the CPU");
  TORCH_CHECK(qweight.dim() == 2 && qweight.is_contiguous(), "lfm2 qgemv: qweight must be a contiguous 2-D tensor");
  TORCH_CHECK(qweight.scalar_type() == (bits == 8 ? at::kChar : at::kByte),
              "lfm2 qgemv: qweight must be int8 for 8 bits and uint8 for 4 bits, got ", qweight.scalar_type());
  TORCH_CHECK(scales.scalar_type() == at::kHalf && scales.dim() == 2 && scales.is_contiguous(),
              "lfm2 qgemv: scales must be a contiguous float16 (N, groups) tensor");
  QMatrix W;
  W.bits = static_cast<int>(bits);
  W.n = qweight.size(0);
  W.row_bytes = qweight.size(1);
  W.k = bits == 8 ? W.row_bytes : 2 * W.row_bytes;
  W.nb = W.k / kBlock;
  W.group_size = group_size;
  W.groups = scales.size(1);
  TORCH_CHECK(scales.size(0) == W.n, "lfm2 qgemv: scales has ", scales.size(0), " rows, qweight ", W.n);
  TORCH_CHECK(group_size > 0 && W.k % group_size == 0 && W.groups == W.k / group_size,
              "lfm2 qgemv: group_size ", group_size, " does not split K=", W.k, " into ", W.groups, " groups");
  if (W.groups == 1) {
    W.shift = 62;
  } else {
    TORCH_CHECK(group_size == 32 || group_size == 64 || group_size == 128,
                "lfm2 qgemv: group_size must be 32, 64, 128 or the whole row, got ", group_size);
    W.shift = group_size == 32 ? 0 : group_size == 64 ? 1 : 2;
  }
  TORCH_CHECK(bits == 8 || W.k % kBlock == 0, "lfm2 qgemv: int4 rows must be a multiple of 32 values, got ", W.k);
  W.q = static_cast<const uint8_t*>(qweight.data_ptr());
  W.s = scales.data_ptr<at::Half>();
  return W;
}

// Rows of weights per parallel task: enough bytes that waking a thread is worth it.
int64_t grain_rows(const QMatrix& W) {
  return std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(1, W.row_bytes));
}

at::Tensor qgemv(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales, int64_t bits,
                 int64_t group_size, bool int8_activations, bool x16) {
  const QMatrix W = check_matrix(qweight, scales, bits, group_size);
  const int64_t m_rows = lfm2_act::input_rows(x, W.k, "qgemv");
  at::Tensor y = lfm2_act::output_for(x, W.n);
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  if (x16) {
    lfm2_q4x16::check(W.bits, W.group_size, W.n, "qgemv");
    TORCH_CHECK(int8_activations, "lfm2 qgemv: 16-row tiles multiply int8 activations only");
#if LFM2_AVX2
    // bits 8: no pair layout, the tiles take the values in order
    const QActivations a = quantize_activations(xp, m_rows, W.k, 8);
    const int64_t tile_bytes = lfm2_q4x16::kRows * W.row_bytes;
    at::parallel_for(0, W.n / lfm2_q4x16::kRows, std::max<int64_t>(1, (int64_t{1} << 15) / tile_bytes),
                     [&](int64_t t0, int64_t t1) {
                       for (int64_t ti = t0; ti < t1; ++ti)
                         lfm2_q4x16::tile(W.q + ti * tile_bytes, W.s + ti * lfm2_q4x16::kRows * W.groups, W.nb, a,
                                          m_rows, yp + ti * lfm2_q4x16::kRows, W.n);
                     });
#endif
    return y;
  }
  QActivations a;
  if (int8_activations) a = quantize_activations(xp, m_rows, W.k, W.bits);
  at::parallel_for(0, W.n, grain_rows(W), [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      if (int8_activations) {
        if (W.bits == 8) row_q8<8>(W, n, xp, a, m_rows, yp);
        else row_q8<4>(W, n, xp, a, m_rows, yp);
      } else {
        if (W.bits == 8) row_f32<8>(W, n, xp, m_rows, yp);
        else row_f32<4>(W, n, xp, m_rows, yp);
      }
    }
  });
  return y;
}

at::Tensor dequantize(const at::Tensor& qweight, const at::Tensor& scales, int64_t bits, int64_t group_size) {
  const QMatrix W = check_matrix(qweight, scales, bits, group_size);
  at::Tensor out = at::empty({W.n, W.k}, qweight.options().dtype(at::kFloat));
  float* op = out.data_ptr<float>();
  at::parallel_for(0, W.n, grain_rows(W), [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const uint8_t* w = W.q + n * W.row_bytes;
      float* o = op + n * W.k;
      for (int64_t gi = 0; gi < W.groups; ++gi) {
        const float sc = half_to_float(W.s[n * W.groups + gi]);
        const int64_t k0 = gi * W.group_size, k1 = k0 + W.group_size;
        if (W.bits == 8) {
          const int8_t* q = reinterpret_cast<const int8_t*>(w);
          for (int64_t k = k0; k < k1; ++k) o[k] = sc * static_cast<float>(q[k]);
        } else {
          for (int64_t k = k0; k < k1; k += kBlock) {
            const uint8_t* b = w + k / 2;
            for (int j = 0; j < 16; ++j) {
              o[k + j] = sc * static_cast<float>((b[j] & 15) - 8);
              o[k + j + 16] = sc * static_cast<float>((b[j] >> 4) - 8);
            }
          }
        }
      }
    }
  });
  return out;
}

// ---------------------------------------------------------------------------------------------
// Float32 GEMV: y = x @ W^T for a few rows of x, W float32 (N, K) row-major. Memory-bound like
// the quantized ones: the weights stream through once per call, prefetched ahead, each row of W
// against up to kMaxRows rows of x with independent accumulators.

#if LFM2_AVX2
template <int MR>
void frow(const float* w, const float* x, int64_t k, float* out) {
  __m256 acc[2][MR];
  for (int u = 0; u < 2; ++u)
    for (int r = 0; r < MR; ++r) acc[u][r] = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 16 <= k; j += 16) {
    _mm_prefetch(reinterpret_cast<const char*>(w + j) + kPrefetchBytes, _MM_HINT_T0);
    const __m256 w0 = _mm256_loadu_ps(w + j), w1 = _mm256_loadu_ps(w + j + 8);
    for (int r = 0; r < MR; ++r) {
      acc[0][r] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + r * k + j), acc[0][r]);
      acc[1][r] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + r * k + j + 8), acc[1][r]);
    }
  }
  for (int r = 0; r < MR; ++r) {
    float t = hsum(_mm256_add_ps(acc[0][r], acc[1][r]));
    for (int64_t i = j; i < k; ++i) t += w[i] * x[r * k + i];
    out[r] = t;
  }
}
#else
template <int MR>
void frow(const float* w, const float* x, int64_t k, float* out) {
  for (int r = 0; r < MR; ++r) {
    float t = 0.f;
    for (int64_t i = 0; i < k; ++i) t += w[i] * x[r * k + i];
    out[r] = t;
  }
}
#endif

at::Tensor fgemv(const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kFloat && weight.is_contiguous() &&
                  weight.device().is_cpu(),
              "lfm2 fgemv: weight must be a contiguous float32 (N, K) CPU tensor");
  const int64_t n_rows = weight.size(0), k = weight.size(1), m_rows = lfm2_act::input_rows(x, k, "fgemv");
  at::Tensor y = lfm2_act::output_for(x, n_rows);
  const float* wp = weight.data_ptr<float>();
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(1, 4 * k));
  at::parallel_for(0, n_rows, grain, [&](int64_t n0, int64_t n1) {
    float out[kMaxRows];
    for (int64_t n = n0; n < n1; ++n) {
      for (int64_t m0 = 0; m0 < m_rows; m0 += kMaxRows) {
        const int64_t mr = std::min<int64_t>(kMaxRows, m_rows - m0);
        const float* xm = xp + m0 * k;
        switch (mr) {
          case 1: frow<1>(wp + n * k, xm, k, out); break;
          case 2: frow<2>(wp + n * k, xm, k, out); break;
          case 3: frow<3>(wp + n * k, xm, k, out); break;
          default: frow<4>(wp + n * k, xm, k, out); break;
        }
        for (int64_t r = 0; r < mr; ++r) yp[(m0 + r) * n_rows + n] = out[r];
      }
    }
  });
  return y;
}

// ---------------------------------------------------------------------------------------------
// Quantized GEMM for many rows of x (prefill), with AVX-512 VNNI: int8 activations (the GEMV's
// numerics: blocks of 32, round to nearest even) against int8 or int4 weights, exact integer
// block dot products by vpdpbusd (four u8 x s8 products summed into each int32 lane, no
// saturation, one instruction). A float GEMM on dequantized tiles does 8 multiply-adds per
// instruction; vpdpbusd does 32. CPUs with AVX2 only run the same tiles through vpmaddubsw + vpmaddwd
// (`gemm_tile_avx2`, `lfm2_simd::avx2_block`): about half the VNNI code's speed, 1.3-2x the float GEMM's;
// where 256-bit operations are split in halves, Q8_0 goes as int16 through vpmaddwd (`gemm_tile16`).
//
// Layout: vpdpbusd wants 4 consecutive bytes of one weight row in each 32-bit lane, so tiles of
// 16 weight rows are repacked per call (cheap next to the M x 16 x K products each tile does):
// for block b and group g of 4 values, 64 bytes hold those 4 values of rows 0..15 (row j at
// bytes 4j..4j+3). One broadcast of 4 activation bytes against one such 512-bit vector
// accumulates 16 rows' dot products, with no horizontal sums. Activations go in as unsigned
// bytes (q + 128); the offset is removed per block with 128 x the weights' block sum.

constexpr int kTileRows = 16;  // weight rows per packed tile: one vector of 16 int32 lanes
constexpr int kGemmRows = 4;   // activation rows per pass over a tile

struct PackedTile {
  std::vector<int8_t> q;        // (nb, 8 groups, 16 rows, 4 values)
  std::vector<float> scale;     // (nb, 16): each row's weight scale for the block
  std::vector<int32_t> offset;  // (nb, 16): 128 x the sum of the row's block values
};

void pack_tile(const QMatrix& W, int64_t n0, int64_t rows, PackedTile& t) {
  t.q.assign(W.nb * 8 * kTileRows * 4, 0);
  t.scale.assign(W.nb * kTileRows, 0.f);
  t.offset.assign(W.nb * kTileRows, 0);
  int8_t v[kBlock];
  for (int64_t j = 0; j < rows; ++j) {
    const uint8_t* w = W.q + (n0 + j) * W.row_bytes;
    const at::Half* s = W.s + (n0 + j) * W.groups;
    for (int64_t b = 0; b < W.nb; ++b) {
      if (W.bits == 8) {
        std::memcpy(v, w + b * kBlock, kBlock);
      } else {
        for (int i = 0; i < 16; ++i) {
          v[i] = static_cast<int8_t>((w[b * 16 + i] & 15) - 8);
          v[i + 16] = static_cast<int8_t>((w[b * 16 + i] >> 4) - 8);
        }
      }
      int32_t sum = 0;
      for (int i = 0; i < kBlock; ++i) sum += v[i];
      t.offset[b * kTileRows + j] = 128 * sum;
      t.scale[b * kTileRows + j] = half_to_float(s[W.groups == 1 ? 0 : b >> W.shift]);
      for (int g = 0; g < 8; ++g) std::memcpy(&t.q[((b * 8 + g) * kTileRows + j) * 4], v + 4 * g, 4);
    }
  }
}

#if LFM2_AVX2
#define LFM2_VNNI __attribute__((target("avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni")))

// pack_tile for a whole tile of 16 rows, vectorized: each 64-byte group of the packed layout is
// one gather of a 4-byte word from each of the 16 rows (int4: one gather serves groups g and
// g + 4, the low and high nibbles), and the offsets come from vpdpbusd against bytes of 128.
// From int4 weights in 16-row tiles (x16, q4_tiles.h) each such word group is one load.
LFM2_VNNI void pack_full_tile(const QMatrix& W, int64_t n0, bool x16, PackedTile& t) {
  t.q.resize(W.nb * 8 * kTileRows * 4);
  t.scale.resize(W.nb * kTileRows);
  t.offset.resize(W.nb * kTileRows);
  const __m512i rows = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                          _mm512_set1_epi32(static_cast<int32_t>(W.row_bytes)));
  const __m512i h128 = _mm512_set1_epi8(static_cast<char>(0x80)), low4 = _mm512_set1_epi8(0x0F),
                eight = _mm512_set1_epi8(8);
  const uint8_t* base = W.q + n0 * W.row_bytes;
  for (int64_t b = 0; b < W.nb; ++b) {
    int8_t* dst = t.q.data() + b * 8 * kTileRows * 4;
    __m512i sum = _mm512_setzero_si512();
    if (W.bits == 8) {
      for (int g = 0; g < 8; ++g) {
        const __m512i v = _mm512_i32gather_epi32(rows, base + b * kBlock + 4 * g, 1);
        _mm512_storeu_si512(dst + g * 64, v);
        sum = _mm512_dpbusd_epi32(sum, h128, v);
      }
    } else {
      for (int g = 0; g < 4; ++g) {
        const __m512i v = x16 ? _mm512_loadu_si512(base + b * lfm2_q4x16::kBlockBytes + 64 * g)
                              : _mm512_i32gather_epi32(rows, base + b * 16 + 4 * g, 1);
        const __m512i lo = _mm512_sub_epi8(_mm512_and_si512(v, low4), eight);
        const __m512i hi = _mm512_sub_epi8(_mm512_and_si512(_mm512_srli_epi16(v, 4), low4), eight);
        _mm512_storeu_si512(dst + g * 64, lo);
        _mm512_storeu_si512(dst + (g + 4) * 64, hi);
        sum = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(sum, h128, lo), h128, hi);
      }
    }
    _mm512_storeu_si512(t.offset.data() + b * kTileRows, sum);
    const int64_t gi = W.groups == 1 ? 0 : b >> W.shift;
    for (int j = 0; j < kTileRows; ++j)
      t.scale[b * kTileRows + j] =
          half_to_float(x16 ? W.s[n0 * W.groups + b * kTileRows + j] : W.s[(n0 + j) * W.groups + gi]);
  }
}

// MR activation rows (unsigned bytes xu, stride kp; block scales xd, stride nb) against one
// packed tile: y[r][0:cols] for each row. 512-bit vectors: one holds the tile's 16 rows, so each
// group of 4 values is one weight load and MR broadcast + vpdpbusd pairs (Zen 4 runs them as two
// 256-bit halves, but issues half the instructions, and this loop is instruction-bound).
template <int MR>
LFM2_VNNI void gemm_tile(const PackedTile& t, int64_t nb, const uint8_t* xu, int64_t kp, const float* xd,
                         float* y, int64_t ldy, int64_t cols) {
  __m512 acc[MR];
  for (int r = 0; r < MR; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    __m512i isum[MR];
    lfm2_simd::vnni_block<MR, 8>(t.q.data() + b * 8 * kTileRows * 4, xu + b * kBlock, kp, isum);
    const __m512i off = _mm512_loadu_si512(t.offset.data() + b * kTileRows);
    const __m512 sc = _mm512_loadu_ps(t.scale.data() + b * kTileRows);
    for (int r = 0; r < MR; ++r)
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(isum[r], off)),
                               _mm512_mul_ps(sc, _mm512_set1_ps(xd[r * nb + b])), acc[r]);
  }
  const __mmask16 keep = static_cast<__mmask16>((1u << cols) - 1);
  for (int r = 0; r < MR; ++r) _mm512_mask_storeu_ps(y + r * ldy, keep, acc[r]);
}

// pack_full_tile for CPUs with AVX2 only: each 64-byte group is two gathers of 8 rows' 4-byte words. Q8_0 needs
// no offsets (the signed form of avx2_block); Q4_0's come from vpmaddubsw against bytes of 1 (the values,
// -8..7, summed in pairs) and vpmaddwd against 128s.
void pack_full_tile_avx2(const QMatrix& W, int64_t n0, PackedTile& t) {
  t.q.resize(W.nb * 8 * kTileRows * 4);
  t.scale.resize(W.nb * kTileRows);
  t.offset.resize(W.nb * kTileRows);
  const __m256i row_offsets = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
                                                 _mm256_set1_epi32(static_cast<int32_t>(W.row_bytes)));
  const __m256i low4 = _mm256_set1_epi8(0x0F), eight = _mm256_set1_epi8(8), ones8 = _mm256_set1_epi8(1),
                w128 = _mm256_set1_epi16(128);
  for (int h = 0; h < 2; ++h) {
    const uint8_t* base = W.q + (n0 + 8 * h) * W.row_bytes;
    for (int64_t b = 0; b < W.nb; ++b) {
      int8_t* dst = t.q.data() + b * 8 * kTileRows * 4 + 32 * h;
      auto gather = [&](int64_t at) {
        return _mm256_i32gather_epi32(reinterpret_cast<const int*>(base + at), row_offsets, 1);
      };
      if (W.bits == 8) {
        for (int g = 0; g < 8; ++g)
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + g * 64), gather(b * kBlock + 4 * g));
        continue;
      }
      __m256i pairs = _mm256_setzero_si256();
      for (int g = 0; g < 4; ++g) {
        const __m256i v = gather(b * 16 + 4 * g);
        const __m256i lo = _mm256_sub_epi8(_mm256_and_si256(v, low4), eight);
        const __m256i hi = _mm256_sub_epi8(_mm256_and_si256(_mm256_srli_epi16(v, 4), low4), eight);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + g * 64), lo);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + (g + 4) * 64), hi);
        pairs = _mm256_add_epi16(pairs, _mm256_add_epi16(_mm256_maddubs_epi16(ones8, lo), _mm256_maddubs_epi16(ones8, hi)));
      }
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(t.offset.data() + b * kTileRows + 8 * h),
                          _mm256_madd_epi16(pairs, w128));
    }
  }
  if (W.bits == 8) std::fill(t.offset.begin(), t.offset.end(), 0);
  for (int64_t b = 0; b < W.nb; ++b) {
    const int64_t gi = W.groups == 1 ? 0 : b >> W.shift;
    for (int j = 0; j < kTileRows; ++j) t.scale[b * kTileRows + j] = half_to_float(W.s[(n0 + j) * W.groups + gi]);
  }
}

// gemm_tile for CPUs with AVX2 only: the tile's 16 rows as two 256-bit halves, each group's products by
// `lfm2_simd::avx2_block` (three instructions where VNNI has one). Q8_0 (kQ8) takes the signed form, whose
// sums need no offset. Fewer activation rows a pass than the VNNI code: AVX2 has 16 vector registers.
template <int MR, bool kQ8>
void gemm_tile_avx2(const PackedTile& t, int64_t nb, const uint8_t* xu, int64_t kp, const float* xd, float* y,
                    int64_t ldy, int64_t cols) {
  __m256 acc[MR][2];
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    __m256i isum[MR][2];
    lfm2_simd::avx2_block<MR, 8, kQ8 ? 1 : 8, false, kQ8>(t.q.data() + b * 8 * kTileRows * 4, xu + b * kBlock, kp, isum);
    for (int h = 0; h < 2; ++h) {
      const __m256i off = kQ8 ? _mm256_setzero_si256()
                              : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(t.offset.data() + b * kTileRows + 8 * h));
      const __m256 sc = _mm256_loadu_ps(t.scale.data() + b * kTileRows + 8 * h);
      for (int r = 0; r < MR; ++r)
        acc[r][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(isum[r][h], off)),
                                    _mm256_mul_ps(sc, _mm256_set1_ps(xd[r * nb + b])), acc[r][h]);
    }
  }
  for (int r = 0; r < MR; ++r) lfm2_simd::store_16(y + r * ldy, acc[r], cols);
}

// Q8_0 where 256-bit operations run as two halves (`lfm2_simd::avx2_halved`, Zen 1): weights and activations
// widened to int16 and multiplied by vpmaddwd alone (16 multiply-adds an instruction, the rate of vpmaddubsw +
// vpmaddwd on bytes) without the signed form's vpsignb, vpabsb and xor, which compete with the multiplies for
// Zen 1's vector pipes. 512 rows x 4608x1024, 1024x4608 and 2048x2048, 2 threads: 29.3-29.5 -> 32.4-32.6
// GMAC/s (docs/benchmarks.md). Each block of 32 values holds 16 pairs; pair p of the tile is 64 bytes: rows
// 0..7, then rows 8..15, each row's two values as one 32-bit lane.
struct Tile16 {
  std::vector<int16_t> q;   // (nb, 16 pairs, 16 rows, 2 values)
  std::vector<float> scale;  // (nb, 16)
};

void pack_tile16(const QMatrix& W, int64_t n0, int64_t rows, Tile16& t) {
  t.scale.assign(W.nb * kTileRows, 0.f);
  if (rows == kTileRows) {
    t.q.resize(W.nb * 16 * kTileRows * 2);
    // Per block, 4 rows x 4 pairs at a time: 8 values of each row widened to int16 (4 pairs as 32-bit lanes),
    // then a 4 x 4 transpose of the lanes gives each pair's 4 rows. In 128-bit operations: Zen 1 splits 256-bit
    // ones anyway, and 8 gathers a block (the form before) cost ~1.2 ms of a 512-row 4608x1024 call.
    for (int64_t b = 0; b < W.nb; ++b)
      for (int c = 0; c < 4; ++c) {
        const uint8_t* base = W.q + (n0 + 4 * c) * W.row_bytes + b * kBlock;
        for (int q = 0; q < 4; ++q) {
          __m128i r[4];
          for (int i = 0; i < 4; ++i)
            r[i] = _mm_cvtepi8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(base + i * W.row_bytes + 8 * q)));
          __m128i out[4];
          lfm2_simd::transpose4_epi32(r, out);
          for (int k = 0; k < 4; ++k)  // pair 4q + k, rows 4c .. 4c + 3
            _mm_storeu_si128(reinterpret_cast<__m128i*>(t.q.data() + (b * 16 + 4 * q + k) * kTileRows * 2 + 8 * c),
                             out[k]);
        }
      }
  } else {
    t.q.assign(W.nb * 16 * kTileRows * 2, 0);
    for (int64_t j = 0; j < rows; ++j) {
      const int8_t* w = reinterpret_cast<const int8_t*>(W.q + (n0 + j) * W.row_bytes);
      for (int64_t b = 0; b < W.nb; ++b)
        for (int p = 0; p < 16; ++p) {
          int16_t* dst = t.q.data() + ((b * 16 + p) * kTileRows + j) * 2;
          dst[0] = w[b * kBlock + 2 * p];
          dst[1] = w[b * kBlock + 2 * p + 1];
        }
    }
  }
  for (int64_t b = 0; b < W.nb; ++b) {
    const int64_t gi = W.groups == 1 ? 0 : b >> W.shift;
    for (int64_t j = 0; j < rows; ++j) t.scale[b * kTileRows + j] = half_to_float(W.s[(n0 + j) * W.groups + gi]);
  }
}

// MR activation rows (int16, stride kp) against one Tile16. The float sums live in memory, updated once a
// block, so the MR x 2 int32 sums, two weight vectors and a broadcast fit AVX2's 16 registers at MR = 3.
// Fully unrolling the 16 pairs made gcc spill the products to the stack (1.2x slower); by 4 it does not.
template <int MR>
void gemm_tile16(const Tile16& t, int64_t nb, const int16_t* x, int64_t kp, const float* xd, float* y, int64_t ldy,
                 int64_t cols) {
  alignas(32) float acc[MR][16] = {};
  for (int64_t b = 0; b < nb; ++b) {
    __m256i isum[MR][2];
    for (int r = 0; r < MR; ++r) isum[r][0] = isum[r][1] = _mm256_setzero_si256();
    const int16_t* wb = t.q.data() + b * 16 * kTileRows * 2;
#pragma GCC unroll 4
    for (int p = 0; p < 16; ++p) {
      const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + p * kTileRows * 2));
      const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + p * kTileRows * 2 + 16));
      for (int r = 0; r < MR; ++r) {
        int32_t two;
        std::memcpy(&two, x + r * kp + b * kBlock + 2 * p, 4);
        const __m256i xv = _mm256_set1_epi32(two);
        isum[r][0] = _mm256_add_epi32(isum[r][0], _mm256_madd_epi16(xv, w0));
        isum[r][1] = _mm256_add_epi32(isum[r][1], _mm256_madd_epi16(xv, w1));
      }
    }
    for (int h = 0; h < 2; ++h) {
      const __m256 sc = _mm256_loadu_ps(t.scale.data() + b * kTileRows + 8 * h);
      for (int r = 0; r < MR; ++r)
        _mm256_store_ps(acc[r] + 8 * h, _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[r][h]),
                                                        _mm256_mul_ps(sc, _mm256_set1_ps(xd[r * nb + b])),
                                                        _mm256_load_ps(acc[r] + 8 * h)));
    }
  }
  for (int r = 0; r < MR; ++r) std::memcpy(y + r * ldy, acc[r], cols * sizeof(float));
}

template <bool kQ8>
void gemm_rows_avx2(const PackedTile& t, const QMatrix& W, const lfm2_act::UActivations& a, int64_t m_rows, float* yp,
                    int64_t n0, int64_t cols) {
  constexpr int MR = 2;  // Q4_0: 14.2 ms for 512 rows x 4608x1024, against 18.8 with 4 rows
  const uint8_t* xu = a.xu.get();
  int64_t m = 0;
  for (; m + MR <= m_rows; m += MR)
    gemm_tile_avx2<MR, kQ8>(t, W.nb, xu + m * W.k, W.k, a.d.get() + m * W.nb, yp + m * W.n + n0, W.n, cols);
  for (; m < m_rows; ++m)
    gemm_tile_avx2<1, kQ8>(t, W.nb, xu + m * W.k, W.k, a.d.get() + m * W.nb, yp + m * W.n + n0, W.n, cols);
}
#endif

at::Tensor qgemm(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales, int64_t bits,
                 int64_t group_size, bool x16) {
  const QMatrix W = check_matrix(qweight, scales, bits, group_size);
  if (x16) lfm2_q4x16::check(W.bits, W.group_size, W.n, "qgemm");
  const int64_t m_rows = lfm2_act::input_rows(x, W.k, "qgemm");
  TORCH_CHECK(W.k % kBlock == 0, "lfm2 qgemm: K must be a multiple of 32, got ", W.k);
  TORCH_CHECK(LFM2_AVX2, "lfm2 qgemm: needs the SIMD build (AVX2; check lfm2_quant.simd() first)");
  at::Tensor y = lfm2_act::output_for(x, W.n);
#if LFM2_AVX2
  const bool vnni = lfm2_simd::cpu_has_vnni512();
  const bool wide16 = !vnni && W.bits == 8 && lfm2_simd::avx2_halved();
  // Bytes q + 128 for the VNNI and byte AVX2 tiles; int16 for gemm_tile16
  lfm2_act::UActivations a;
  lfm2_act::WideActivations xw;
  if (wide16) xw = lfm2_act::quantize_activations_i16(x.data_ptr<float>(), m_rows, W.k);
  else a = lfm2_act::quantize_activations_u8(x.data_ptr<float>(), m_rows, W.k);
  const uint8_t* xu = a.xu.get();
  float* yp = y.data_ptr<float>();
  const int64_t tiles = (W.n + kTileRows - 1) / kTileRows;
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    PackedTile t;
    Tile16 t16;
    for (int64_t ti = t0; ti < t1; ++ti) {
      const int64_t n0 = ti * kTileRows, cols = std::min<int64_t>(kTileRows, W.n - n0);
      if (wide16) {
        pack_tile16(W, n0, cols, t16);
        constexpr int MR = 3;  // a standalone loop on Zen 1, K = 1024: 17.6 GMAC/s a core, 1 row 16.9, 2 rows 14.9
        int64_t m = 0;
        for (; m + MR <= m_rows; m += MR)
          gemm_tile16<MR>(t16, W.nb, xw.x.get() + m * W.k, W.k, xw.d.get() + m * W.nb, yp + m * W.n + n0, W.n, cols);
        for (; m < m_rows; ++m)
          gemm_tile16<1>(t16, W.nb, xw.x.get() + m * W.k, W.k, xw.d.get() + m * W.nb, yp + m * W.n + n0, W.n, cols);
        continue;
      }
      if (!vnni) {
        if (cols == kTileRows) pack_full_tile_avx2(W, n0, t);
        else pack_tile(W, n0, cols, t);
        if (W.bits == 8) gemm_rows_avx2<true>(t, W, a, m_rows, yp, n0, cols);
        else gemm_rows_avx2<false>(t, W, a, m_rows, yp, n0, cols);
        continue;
      }
      if (cols == kTileRows) pack_full_tile(W, n0, x16, t);
      else pack_tile(W, n0, cols, t);
      int64_t m = 0;
      for (; m + kGemmRows <= m_rows; m += kGemmRows)
        gemm_tile<kGemmRows>(t, W.nb, xu + m * W.k, W.k, a.d.get() + m * W.nb, yp + m * W.n + n0, W.n, cols);
      for (; m < m_rows; ++m)
        gemm_tile<1>(t, W.nb, xu + m * W.k, W.k, a.d.get() + m * W.nb, yp + m * W.n + n0, W.n, cols);
    }
  });
#endif
  return y;
}

// Rearrange an int4 matrix (groups of 32) into 16-row tiles in place, a tile at a time through a copy of its
// rows: stacked MoE experts stay where they are in their storage. Only where the tiles' code runs.
void qpack_(const at::Tensor& qweight, const at::Tensor& scales) {
  const QMatrix W = check_matrix(qweight, scales, 4, 32);
  lfm2_q4x16::check(W.bits, W.group_size, W.n, "qpack_");
  uint8_t* q = static_cast<uint8_t*>(qweight.data_ptr());
  at::Half* s = scales.data_ptr<at::Half>();
  const int64_t kR = lfm2_q4x16::kRows;
  at::parallel_for(0, W.n / kR, 1, [&](int64_t t0, int64_t t1) {
    std::vector<uint8_t> rows(kR * W.row_bytes);
    std::vector<at::Half> rs(kR * W.groups);
    for (int64_t ti = t0; ti < t1; ++ti) {
      std::memcpy(rows.data(), q + ti * kR * W.row_bytes, rows.size());
      std::memcpy(rs.data(), s + ti * kR * W.groups, rs.size() * sizeof(at::Half));
      lfm2_q4x16::pack(rows.data(), rs.data(), W.row_bytes, W.nb, q + ti * kR * W.row_bytes, s + ti * kR * W.groups);
    }
  });
}

// An int4 matrix in 16-row tiles back in the file's layout (new tensors); runs on any CPU.
std::tuple<at::Tensor, at::Tensor> qunpack(const at::Tensor& qweight, const at::Tensor& scales) {
  const QMatrix W = check_matrix(qweight, scales, 4, 32);
  const int64_t kR = lfm2_q4x16::kRows;
  TORCH_CHECK(W.n % kR == 0, "lfm2 qunpack: 16-row tiles have rows in multiples of 16, the matrix has ", W.n);
  at::Tensor q = at::empty_like(qweight), s = at::empty_like(scales);
  uint8_t* qp = q.data_ptr<uint8_t>();
  at::Half* sp = s.data_ptr<at::Half>();
  at::parallel_for(0, W.n / kR, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t ti = t0; ti < t1; ++ti)
      lfm2_q4x16::unpack(W.q + ti * kR * W.row_bytes, W.s + ti * kR * W.groups, W.row_bytes, W.nb,
                         qp + ti * kR * W.row_bytes, sp + ti * kR * W.groups);
  });
  return {q, s};
}

bool vnni() { return lfm2_simd::cpu_has_vnni512(); }

// Whether this build has the SIMD code: the AVX2 kernels, `qgemm` and `kgemm` among them (for the
// benchmark's report, and `lfm2.kernels.has_int8_gemm`).
bool simd() { return LFM2_AVX2; }

}  // namespace

TORCH_LIBRARY(lfm2_quant, m) {
  m.def("qgemv(Tensor x, Tensor qweight, Tensor scales, int bits, int group_size, bool int8_activations, "
        "bool x16=False) -> Tensor");
  m.def("dequantize(Tensor qweight, Tensor scales, int bits, int group_size) -> Tensor");
  m.def("fgemv(Tensor x, Tensor weight) -> Tensor");
  m.def("simd() -> bool", &simd);
  m.def("vnni() -> bool", &vnni);
  m.def("qgemm(Tensor x, Tensor qweight, Tensor scales, int bits, int group_size, bool x16=False) -> Tensor");
  m.def("qpack_(Tensor(a!) qweight, Tensor(b!) scales) -> ()");
  m.def("qunpack(Tensor qweight, Tensor scales) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(lfm2_quant, CPU, m) {
  m.impl("qgemv", &qgemv);
  m.impl("dequantize", &dequantize);
  m.impl("fgemv", &fgemv);
  m.impl("qgemm", &qgemm);
  m.impl("qpack_", &qpack_);
  m.impl("qunpack", &qunpack);
}
