// The experts of an LFM2-MoE block at decode, in one call (see lfm2/models/lfm2_moe.py).
//
// For a few tokens x (M, D), each routed to k experts chosen[m, :] with weights[m, :], computes
//   y[m] = sum_j weights[m, j] * W2_e (silu(W1_e x[m]) * W3_e x[m]),  e = chosen[m, j]
// without a Python loop over experts. Why: at decode each expert product is a ~50-200 us GEMV,
// and the Python around 3 k of them per token (module calls, torch.where, index_add, and a
// host sync to learn which experts were chosen) cost as much again (issue #30).
//
// Two passes (`lfm2_moe::two_passes`, moe_slots.h), each one parallel region over the output rows of
// every chosen expert together:
// 1. gate/up: for each distinct chosen expert e and each of its H rows n, W1_e[n] and W3_e[n] are
//    read once and dotted with every token routed to e; h[slot, n] = silu(a) * b (SwiGLU fused);
// 2. down: for each output column n of y, the experts in ascending order: y[m, n] += w * W2_e[n] h.
//    A thread owns a range of n, so no two threads write one value, and each token's sum runs in
//    the same (ascending expert) order whatever else is in the batch: batch rows stay independent.
//
// Weights: int8 or int4 in lfm2/quant.py's format (GGUF Q8_0 / Q4_0 blocks, float16 scales) with
// the int8-activation numerics of QuantLinear's GEMV (lfm2/kernels/qgemv.cpp: `quantize_activations`,
// `dot_q8`): activations quantized per block of 32 (max |x| / 127, round to nearest even; shared in
// activations.h), exact integer block dot products. The row dot products below are copies of
// qgemv.cpp's (which keeps its own in an anonymous namespace); tests/test_moe.py holds this kernel
// equal to QuantLinear expert by expert.
// int4 experts with groups of 32 may be in qgemv's 16-row tiles (x16, q4_tiles.h), taken a whole tile of
// rows at a time. Or float32 weights (bits = 32): float dot products, as the float GEMV `fgemv`.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>

#include "simd.h"
#endif
#include "activations.h"
#include "moe_slots.h"
#include "q4_tiles.h"
#define LFM2_MOE_AVX2 LFM2_AVX2

namespace {

using lfm2_act::half_to_float;
using lfm2_act::kBlock;
using lfm2_act::QActivations;
using lfm2_act::quantize_activations;
#if LFM2_MOE_AVX2
using lfm2_act::hsum_i32;
using lfm2_simd::hsum;
#endif

constexpr int64_t kPrefetchBytes = 2048;

// One expert's weight matrix (N, K): quantized (bits 8 or 4, scales s) or float32 (bits 32, f).
// Block b of a quantized row has the scale s[b >> shift]; shift 62 means one scale per row.
struct Mat {
  const uint8_t* q = nullptr;
  const at::Half* s = nullptr;
  const float* f = nullptr;
  int64_t n = 0, k = 0, row_bytes = 0, groups = 1, nb = 0;
  int bits = 32, shift = 62;
};

// ---------------------------------------------------------------------------------------------
// Row dot products (qgemv.cpp's `dot_q8`, and `frow<1>` of its float GEMV)

template <int BITS>
inline int32_t weight_at(const uint8_t* w, int64_t k) {
  if (BITS == 8) return reinterpret_cast<const int8_t*>(w)[k];
  const int64_t j = k % kBlock;
  const uint8_t byte = w[(k / kBlock) * 16 + (j & 15)];
  return (j < 16 ? byte & 15 : byte >> 4) - 8;
}

// The ragged tail of a per-channel int8 row (values nb*32 .. K), in float with the row's scale.
template <int BITS>
inline float tail_dot(const Mat& W, const uint8_t* w, at::Half s, const float* x) {
  float sum = 0.f;
  for (int64_t k = W.nb * kBlock; k < W.k; ++k) sum += static_cast<float>(weight_at<BITS>(w, k)) * x[k];
  return sum * half_to_float(s);
}

#if LFM2_MOE_AVX2

inline __m256i unpack_nibbles(const uint8_t* p) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m256i both = _mm256_set_m128i(_mm_srli_epi16(raw, 4), raw);
  return _mm256_and_si256(both, _mm256_set1_epi8(0x0F));
}

template <int BITS>
inline __m256i block_isum(const uint8_t* w, int64_t b, const int8_t* xq) {
  const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + b * kBlock));
  __m256i p16;
  if (BITS == 8) {
    const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + b * kBlock));
    p16 = _mm256_maddubs_epi16(_mm256_sign_epi8(wv, wv), _mm256_sign_epi8(xv, wv));
  } else {
    p16 = _mm256_maddubs_epi16(unpack_nibbles(w + b * 16), xv);
  }
  return _mm256_madd_epi16(p16, _mm256_set1_epi16(1));
}

inline __m256i pair_isum_int4(const uint8_t* w, int64_t b, const int8_t* pairs) {
  const __m256i m4 = _mm256_set1_epi8(0x0F);
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + b * 16));
  const __m256i lo = _mm256_and_si256(raw, m4), hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), m4);
  const __m256i* xp = reinterpret_cast<const __m256i*>(pairs + b * kBlock);
  const __m256i p16 = _mm256_add_epi16(_mm256_maddubs_epi16(lo, _mm256_loadu_si256(xp)),
                                       _mm256_maddubs_epi16(hi, _mm256_loadu_si256(xp + 1)));
  return _mm256_madd_epi16(p16, _mm256_set1_epi16(1));
}

template <int BITS>
inline __m256i chunk_isums(const uint8_t* w, int64_t b, const int8_t* xq, const int8_t* pairs) {
  if (BITS == 4) {
    const __m256i h0 = _mm256_hadd_epi32(pair_isum_int4(w, b, pairs), pair_isum_int4(w, b + 2, pairs));
    const __m256i h1 = _mm256_hadd_epi32(pair_isum_int4(w, b + 4, pairs), pair_isum_int4(w, b + 6, pairs));
    return _mm256_permutevar8x32_epi32(_mm256_hadd_epi32(h0, h1), _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
  }
  const __m256i h01 = _mm256_hadd_epi32(block_isum<BITS>(w, b, xq), block_isum<BITS>(w, b + 1, xq));
  const __m256i h23 = _mm256_hadd_epi32(block_isum<BITS>(w, b + 2, xq), block_isum<BITS>(w, b + 3, xq));
  const __m256i h45 = _mm256_hadd_epi32(block_isum<BITS>(w, b + 4, xq), block_isum<BITS>(w, b + 5, xq));
  const __m256i h67 = _mm256_hadd_epi32(block_isum<BITS>(w, b + 6, xq), block_isum<BITS>(w, b + 7, xq));
  const __m256i lo = _mm256_hadd_epi32(h01, h23), hi = _mm256_hadd_epi32(h45, h67);
  return _mm256_add_epi32(_mm256_permute2x128_si256(lo, hi, 0x20), _mm256_permute2x128_si256(lo, hi, 0x31));
}

inline __m256 scales8(const Mat& W, const at::Half* s, int64_t b) {
  if (W.groups == 1) return _mm256_set1_ps(half_to_float(s[0]));
  if (W.shift == 0) return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + b)));
  if (W.shift == 1) {
    const __m256 four = _mm256_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(s + (b >> 1))));
    return _mm256_permutevar8x32_ps(four, _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3));
  }
  int32_t two;
  std::memcpy(&two, s + (b >> 2), sizeof(two));
  return _mm256_permutevar8x32_ps(_mm256_cvtph_ps(_mm_cvtsi32_si128(two)), _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1));
}

template <int BITS>
float dot_q8(const Mat& W, int64_t n, const QActivations& a, int64_t m, const float* x) {
  const uint8_t* w = W.q + n * W.row_bytes;
  const at::Half* s = W.s + n * W.groups;
  const int8_t* xq = a.q.data() + m * a.nb * kBlock;
  const float* xd = a.d.data() + m * a.nb;
  const int32_t* xs = a.sum.data() + m * a.nb;
  const int8_t* pairs = BITS == 4 ? a.pairs.data() + m * a.nb * kBlock : nullptr;
  constexpr int64_t chunk_bytes = 8 * kBlock * BITS / 8;
  __m256 acc = _mm256_setzero_ps();
  int64_t b = 0;
  for (; b + 8 <= W.nb; b += 8) {
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

inline float dot_f32(const Mat& W, int64_t n, const float* x) {
  const float* w = W.f + n * W.k;
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 16 <= W.k; j += 16) {
    _mm_prefetch(reinterpret_cast<const char*>(w + j) + kPrefetchBytes, _MM_HINT_T0);
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + j), _mm256_loadu_ps(x + j), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(w + j + 8), _mm256_loadu_ps(x + j + 8), acc1);
  }
  float t = hsum(_mm256_add_ps(acc0, acc1));
  for (; j < W.k; ++j) t += w[j] * x[j];
  return t;
}

#else  // portable scalar C++: the same integer arithmetic

template <int BITS>
float dot_q8(const Mat& W, int64_t n, const QActivations& a, int64_t m, const float* x) {
  const uint8_t* w = W.q + n * W.row_bytes;
  const at::Half* s = W.s + n * W.groups;
  const int8_t* xq = a.q.data() + m * a.nb * kBlock;
  float res = 0.f;
  for (int64_t b = 0; b < W.nb; ++b) {
    int32_t dot = 0;
    for (int64_t j = 0; j < kBlock; ++j) dot += weight_at<BITS>(w, b * kBlock + j) * xq[b * kBlock + j];
    res += half_to_float(s[b >> W.shift]) * a.d[m * a.nb + b] * static_cast<float>(dot);
  }
  if (W.nb * kBlock < W.k) res += tail_dot<BITS>(W, w, s[0], x);
  return res;
}

inline float dot_f32(const Mat& W, int64_t n, const float* x) {
  const float* w = W.f + n * W.k;
  float t = 0.f;
  for (int64_t j = 0; j < W.k; ++j) t += w[j] * x[j];
  return t;
}

#endif

// Row n of W against row m of the activations x (stride W.k; `a` its quantized form).
inline float dot(const Mat& W, int64_t n, const QActivations& a, int64_t m, const float* x) {
  const float* xm = x + m * W.k;
  if (W.bits == 4) return dot_q8<4>(W, n, a, m, xm);
  if (W.bits == 8) return dot_q8<8>(W, n, a, m, xm);
  return dot_f32(W, n, xm);
}

// ---------------------------------------------------------------------------------------------
// The operator

// Expert `e`'s matrix `what` from the lists, checked against the format every expert shares.
Mat expert_matrix(at::TensorList qs, at::TensorList ss, int64_t e, int64_t bits, int64_t group_size, int64_t n,
                  int64_t k, const char* what) {
  const at::Tensor q = lfm2_moe::expert_at(qs, e);
  Mat W;
  W.bits = static_cast<int>(bits);
  W.n = n;
  W.k = k;
  W.nb = k / kBlock;
  const auto dtype = bits == 32 ? at::kFloat : bits == 8 ? at::kChar : at::kByte;
  W.row_bytes = bits == 32 ? 4 * k : bits == 8 ? k : k / 2;
  TORCH_CHECK(q.device().is_cpu() && q.dim() == 2 && q.is_contiguous() && q.scalar_type() == dtype &&
                  q.size(0) == n && q.size(1) * (bits == 32 ? 4 : 1) == W.row_bytes,
              "lfm2 moe_experts: expert ", e, " ", what, " must be a contiguous ", dtype, " (", n, ", ",
              bits == 32 ? k : W.row_bytes, ") CPU tensor like expert 0's, got ", q.scalar_type(), " ", q.sizes());
  if (bits == 32) {
    W.f = q.data_ptr<float>();
    return W;
  }
  const at::Tensor s = lfm2_moe::expert_at(ss, e);
  W.groups = group_size == 0 ? 1 : k / group_size;
  W.shift = group_size == 0 ? 62 : group_size == 32 ? 0 : group_size == 64 ? 1 : 2;
  TORCH_CHECK(s.device().is_cpu() && s.dim() == 2 && s.is_contiguous() && s.scalar_type() == at::kHalf &&
                  s.size(0) == n && s.size(1) == W.groups,
              "lfm2 moe_experts: expert ", e, " ", what, " scales must be a contiguous float16 (", n, ", ", W.groups,
              ") CPU tensor, got ", s.scalar_type(), " ", s.sizes());
  W.q = static_cast<const uint8_t*>(q.data_ptr());
  W.s = s.data_ptr<at::Half>();
  return W;
}

at::Tensor moe_experts(const at::Tensor& x, const at::Tensor& chosen, const at::Tensor& weights, at::TensorList w1,
                       at::TensorList s1, at::TensorList w3, at::TensorList s3, at::TensorList w2,
                       at::TensorList s2, int64_t bits, int64_t group_size, bool x16) {
  TORCH_CHECK(bits == 4 || bits == 8 || bits == 32, "lfm2 moe_experts: bits must be 4, 8 (quantized) or 32 (float), got ",
              bits);
  TORCH_CHECK(group_size == 0 || group_size == 32 || group_size == 64 || group_size == 128,
              "lfm2 moe_experts: group_size must be 32, 64, 128 or 0 (one scale per row), got ", group_size);
  TORCH_CHECK(bits != 4 || group_size != 0, "lfm2 moe_experts: int4 needs a group size");
  lfm2_moe::check_routing(x, chosen, weights, "moe_experts");
  using lfm2_moe::num_experts;
  const int64_t M = x.size(0), D = x.size(1), E = num_experts(w1), K = chosen.size(1);
  const int64_t scales = bits == 32 ? 0 : E;
  const auto scales_of = [&](at::TensorList s) { return s.empty() ? 0 : num_experts(s); };
  TORCH_CHECK(E > 0 && num_experts(w3) == E && num_experts(w2) == E && scales_of(s1) == scales &&
                  scales_of(s3) == scales && scales_of(s2) == scales,
              "lfm2 moe_experts: w1, w3, w2 must hold the same number of experts (", E, "), with as many scales ",
              "(none for float32)");
  const int64_t H = lfm2_moe::expert_at(w1, 0).size(0);
  TORCH_CHECK(D % kBlock == 0 || bits == 32 || group_size == 0, "lfm2 moe_experts: D=", D, " is not a multiple of 32");
  TORCH_CHECK(H % kBlock == 0 || bits == 32 || group_size == 0, "lfm2 moe_experts: H=", H, " is not a multiple of 32");
  TORCH_CHECK(bits != 4 || (D % kBlock == 0 && H % kBlock == 0), "lfm2 moe_experts: int4 rows must be multiples of 32");
  TORCH_CHECK(group_size == 0 || (D % group_size == 0 && H % group_size == 0), "lfm2 moe_experts: group_size ",
              group_size, " does not divide D=", D, " and H=", H);
  if (x16) {  // w1 / w3 have H rows, w2 D
    lfm2_q4x16::check(bits, group_size, H, "moe_experts");
    lfm2_q4x16::check(bits, group_size, D, "moe_experts");
  }

  const lfm2_moe::ExpertSlots g = lfm2_moe::group_slots(chosen, E, "moe_experts");
  const int64_t U = g.count();
  // Mat points into the tensors; a stacked expert's weights and scales are its slices' (lfm2_moe::expert_matrices)
  const auto matrices = [&](at::TensorList qs, at::TensorList ss, int64_t n, int64_t k, const char* what) {
    return lfm2_moe::expert_matrices<Mat>(
        g, lfm2_moe::stacked(qs) && (ss.empty() || lfm2_moe::stacked(ss)),
        [&](int64_t e) { return expert_matrix(qs, ss, e, bits, group_size, n, k, what); },
        [&](Mat W, int64_t e) {
          if (bits == 32) {
            W.f += e * qs[0].stride(0);
          } else {
            W.q += e * qs[0].stride(0) * qs[0].element_size();
            W.s += e * ss[0].stride(0);
          }
          return W;
        });
  };
  const std::vector<Mat> W1 = matrices(w1, s1, H, D, "w1"), W3 = matrices(w3, s3, H, D, "w3"),
                         W2 = matrices(w2, s2, D, H, "w2");

  const float* xp = x.data_ptr<float>();
  QActivations xa, ha;
  if (x16) {  // whole tiles of 16 rows at a time, values in order (no pair layout), as qgemv's tiles
#if LFM2_MOE_AVX2
    using lfm2_q4x16::kRows;
    xa = quantize_activations(xp, M, D, 8);
    const auto tile = [](const Mat& W, int64_t n0, const QActivations& a, int64_t m, float* out) {
      lfm2_q4x16::rows<1>(W.q + n0 * W.row_bytes, W.s + n0 * W.groups, W.nb, a, m, out, 0);
    };
    return lfm2_moe::two_passes_units(
        x, weights, g, H, kRows, kRows, W1[0].row_bytes, W2[0].row_bytes,
        [&](int64_t u, int64_t n0, int64_t m, float* a, float* b) {
          tile(W1[u], n0, xa, m, a);
          tile(W3[u], n0, xa, m, b);
        },
        [&](const std::vector<float>& h) { ha = quantize_activations(h.data(), M * K, H, 8); },
        [&](int64_t u, int64_t n0, int64_t slot, const float*, float* out) { tile(W2[u], n0, ha, slot, out); });
#endif
  }
  if (bits != 32) xa = quantize_activations(xp, M, D, static_cast<int>(bits));
  return lfm2_moe::two_passes(
      x, weights, g, H, W1[0].row_bytes, W2[0].row_bytes,
      [&](int64_t u, int64_t n, int64_t m) {
        return std::make_pair(dot(W1[u], n, xa, m, xp), dot(W3[u], n, xa, m, xp));
      },
      [&](const std::vector<float>& h) {
        if (bits != 32) ha = quantize_activations(h.data(), M * K, H, static_cast<int>(bits));
      },
      [&](int64_t u, int64_t n, int64_t slot, const float* h) { return dot(W2[u], n, ha, slot, h); });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lfm2_quant, m) {
  m.def("moe_experts(Tensor x, Tensor chosen, Tensor weights, Tensor[] w1, Tensor[] s1, Tensor[] w3, Tensor[] s3, "
        "Tensor[] w2, Tensor[] s2, int bits, int group_size, bool x16=False) -> Tensor");
}

TORCH_LIBRARY_IMPL(lfm2_quant, CPU, m) { m.impl("moe_experts", &moe_experts); }
