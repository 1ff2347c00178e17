// Decode attention for lfm2 (see lfm2/models/lfm2.py, Attention): the few query rows of one KV
// head (its GQA group of a single-token step, G = heads / kv_heads) against that head's cached
// keys and values: every filled slot, or those a per-row mask marks valid (a continuous batch,
// whose rows joined at different times).
//
// Why: at decode the work is reading the cache, 2 x S x head_dim floats per KV head, once. PyTorch's
// CPU flash attention, made for long query blocks, runs G query rows through blocked GEMM calls
// and reads the cache at 12-32 GB/s on a 2-core machine; this kernel at 20-54 GB/s, 1.3-2.5x
// faster (`python benchmarks/kernels.py --attention`). Each (batch row, KV head) is one task: one
// pass over the keys computes the G scores of each key (four dot products per key load), a
// softmax per query row (exponentials 8 at a time), one pass over the values accumulates the G
// outputs in registers. Exact float32 arithmetic, the usual max-subtracted softmax; results equal
// SDPA's up to float rounding.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

#include "simd.h"
#define LFM2_ATTN_AVX2 1
#else
#define LFM2_ATTN_AVX2 0
#endif

namespace {

#if LFM2_ATTN_AVX2

using lfm2_simd::hsum;

// exp(x) for x <= 0 (max-subtracted scores), 8 at a time: Cephes' expf (`lfm2_simd::exp_reduced`);
// relative error about 1e-7. Below -87 it returns about 1e-38 (those weights are far below float32
// resolution next to the maximum's 1).
inline __m256 exp8(__m256 x) {
  __m256i n;
  const __m256 e = lfm2_simd::exp_reduced(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), &n);
  return _mm256_mul_ps(e, lfm2_simd::pow2(n));
}

#endif

inline float dot(const float* a, const float* b, int64_t d) {
  int64_t j = 0;
  float sum = 0.f;
#if LFM2_ATTN_AVX2
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  for (; j + 16 <= d; j += 16) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + j), _mm256_loadu_ps(b + j), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + j + 8), _mm256_loadu_ps(b + j + 8), acc1);
  }
  sum = hsum(_mm256_add_ps(acc0, acc1));
#endif
  for (; j < d; ++j) sum += a[j] * b[j];
  return sum;
}

// y += p * x over d values.
inline void axpy(float* y, float p, const float* x, int64_t d) {
  int64_t j = 0;
#if LFM2_ATTN_AVX2
  const __m256 pv = _mm256_set1_ps(p);
  for (; j + 8 <= d; j += 8) _mm256_storeu_ps(y + j, _mm256_fmadd_ps(pv, _mm256_loadu_ps(x + j), _mm256_loadu_ps(y + j)));
#endif
  for (; j < d; ++j) y[j] += p * x[j];
}

// Softmax of s[0:n] in place; returns 1 / (sum of the exponentials), the caller's normalizer.
inline float softmax_unnormalized(float* s, int64_t n) {
  float m = -std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < n; ++i) m = std::max(m, s[i]);
  int64_t i = 0;
  float sum = 0.f;
#if LFM2_ATTN_AVX2
  const __m256 mv = _mm256_set1_ps(m);
  __m256 acc = _mm256_setzero_ps();
  for (; i + 8 <= n; i += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + i), mv));
    _mm256_storeu_ps(s + i, e);
    acc = _mm256_add_ps(acc, e);
  }
  sum = hsum(acc);
#endif
  for (; i < n; ++i) {
    s[i] = std::exp(s[i] - m);
    sum += s[i];
  }
  return 1.f / sum;
}

#if LFM2_ATTN_AVX2

// Scores of one key row k against query rows q[0..3] (stride D; D a multiple of 8): four dot
// products from one pass over the key, reduced together.
inline __m128 dot4(const float* q, int64_t D, const float* k) {
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
  for (int64_t j = 0; j < D; j += 8) {
    const __m256 kv = _mm256_loadu_ps(k + j);
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + j), kv, a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(q + D + j), kv, a1);
    a2 = _mm256_fmadd_ps(_mm256_loadu_ps(q + 2 * D + j), kv, a2);
    a3 = _mm256_fmadd_ps(_mm256_loadu_ps(q + 3 * D + j), kv, a3);
  }
  const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

// out[g][d0:d0+16] = inv[g] * sum_s p[g][s] v[s][d0:d0+16] for GN query rows: the accumulators
// stay in registers over the whole pass (each value row's 64 bytes at d0 read once per pass).
template <int GN>
inline void weighted_values(const float* p, int64_t S, const float* v, int64_t vs, int64_t d0, const float* inv,
                            const bool* valid, float* out, int64_t D) {
  __m256 acc[GN][2];
  for (int i = 0; i < GN; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
  for (int64_t s = 0; s < S; ++s) {
    if (valid && !valid[s]) continue;  // never read: a masked slot's stale value cannot leak in
    const __m256 v0 = _mm256_loadu_ps(v + s * vs + d0), v1 = _mm256_loadu_ps(v + s * vs + d0 + 8);
    for (int i = 0; i < GN; ++i) {
      const __m256 w = _mm256_set1_ps(p[i * S + s]);
      acc[i][0] = _mm256_fmadd_ps(w, v0, acc[i][0]);
      acc[i][1] = _mm256_fmadd_ps(w, v1, acc[i][1]);
    }
  }
  for (int i = 0; i < GN; ++i) {
    const __m256 sc = _mm256_set1_ps(inv[i]);
    _mm256_storeu_ps(out + i * D + d0, _mm256_mul_ps(acc[i][0], sc));
    _mm256_storeu_ps(out + i * D + d0 + 8, _mm256_mul_ps(acc[i][1], sc));
  }
}

#endif

// One (batch row, KV head): q (G, D) contiguous, keys and values S rows of D at strides ks, vs.
// `valid` (S flags, or null for all): slots to attend; the others get weight 0 exactly.
void attend_head(const float* q, int64_t G, int64_t D, const float* k, int64_t ks, const float* v, int64_t vs,
                 int64_t S, float scale, const bool* valid, float* out, std::vector<float>& scores,
                 std::vector<float>& inv) {
  scores.resize(G * S);
  inv.resize(G);
  float* p = scores.data();
#if LFM2_ATTN_AVX2
  const bool simd = D % 16 == 0;
#else
  const bool simd = false;
#endif
  for (int64_t s = 0; s < S; ++s) {  // each key read once, for all G query rows
    if (valid && !valid[s]) {
      for (int64_t g = 0; g < G; ++g) p[g * S + s] = -std::numeric_limits<float>::infinity();
      continue;
    }
    const float* kr = k + s * ks;
    int64_t g = 0;
#if LFM2_ATTN_AVX2
    if (simd) {
      alignas(16) float four[4];
      for (; g + 4 <= G; g += 4) {
        _mm_store_ps(four, _mm_mul_ps(dot4(q + g * D, D, kr), _mm_set1_ps(scale)));
        for (int i = 0; i < 4; ++i) p[(g + i) * S + s] = four[i];
      }
    }
#endif
    for (; g < G; ++g) p[g * S + s] = scale * dot(q + g * D, kr, D);
  }
  for (int64_t g = 0; g < G; ++g) inv[g] = softmax_unnormalized(p + g * S, S);
  if (valid)  // exp of -inf clamps to about 1e-38 in exp8: make the masked weights exact zeros
    for (int64_t s = 0; s < S; ++s)
      if (!valid[s])
        for (int64_t g = 0; g < G; ++g) p[g * S + s] = 0.f;
#if LFM2_ATTN_AVX2
  if (simd) {
    for (int64_t g0 = 0; g0 < G; g0 += 4) {
      const float* pg = p + g0 * S;
      float* og = out + g0 * D;
      for (int64_t d0 = 0; d0 < D; d0 += 16) {
        switch (std::min<int64_t>(4, G - g0)) {
          case 1: weighted_values<1>(pg, S, v, vs, d0, inv.data() + g0, valid, og, D); break;
          case 2: weighted_values<2>(pg, S, v, vs, d0, inv.data() + g0, valid, og, D); break;
          case 3: weighted_values<3>(pg, S, v, vs, d0, inv.data() + g0, valid, og, D); break;
          default: weighted_values<4>(pg, S, v, vs, d0, inv.data() + g0, valid, og, D); break;
        }
      }
    }
    return;
  }
#endif
  std::fill(out, out + G * D, 0.f);
  for (int64_t s = 0; s < S; ++s)  // each value read once
    if (!valid || valid[s])
      for (int64_t g = 0; g < G; ++g) axpy(out + g * D, p[g * S + s], v + s * vs, D);
  for (int64_t g = 0; g < G; ++g)
    for (int64_t j = 0; j < D; ++j) out[g * D + j] *= inv[g];
}

// q (B, KV, G, D); k, v (B, KV, S, D) with rows of D contiguous (a cache's filled slots: any
// strides over batch, head and slot); returns (B, KV, G, D).
// `valid_in` (B, S) bool, optional: the slots each row attends (at least one per row).
at::Tensor decode_attention(const at::Tensor& q_in, const at::Tensor& k, const at::Tensor& v, double scale,
                            const std::optional<at::Tensor>& valid_in) {
  TORCH_CHECK(q_in.dim() == 4 && k.dim() == 4 && v.dim() == 4, "lfm2 decode_attention: q, k, v must be 4-D");
  TORCH_CHECK(q_in.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat,
              "lfm2 decode_attention: q, k, v must be float32");
  TORCH_CHECK(q_in.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(),
              "lfm2 decode_attention: tensors must be on the CPU");
  const at::Tensor q = q_in.contiguous();
  const int64_t B = q.size(0), KV = q.size(1), G = q.size(2), D = q.size(3), S = k.size(2);
  TORCH_CHECK(k.size(0) == B && k.size(1) == KV && k.size(3) == D && v.sizes() == k.sizes(),
              "lfm2 decode_attention: k and v must be (B, KV, S, D) matching q (B, KV, G, D), got q ",
              q.sizes(), ", k ", k.sizes(), ", v ", v.sizes());
  TORCH_CHECK(S > 0, "lfm2 decode_attention: no keys");
  TORCH_CHECK(k.stride(3) == 1 && v.stride(3) == 1, "lfm2 decode_attention: k and v rows must be contiguous");
  at::Tensor valid;
  if (valid_in.has_value()) {
    valid = valid_in->contiguous();
    TORCH_CHECK(valid.scalar_type() == at::kBool && valid.dim() == 2 && valid.size(0) == B && valid.size(1) == S,
                "lfm2 decode_attention: valid must be a bool (B, S) = (", B, ", ", S, ") tensor, got ",
                valid.scalar_type(), " ", valid.sizes());
  }
  const bool* vmask = valid.defined() ? valid.data_ptr<bool>() : nullptr;
  at::Tensor out = at::empty({B, KV, G, D}, q.options());
  const float* qp = q.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t kb = k.stride(0), kh = k.stride(1), ks = k.stride(2);
  const int64_t vb = v.stride(0), vh = v.stride(1), vs = v.stride(2);
  const float sc = static_cast<float>(scale);
  at::parallel_for(0, B * KV, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> scores, inv;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / KV, h = t % KV;
      attend_head(qp + t * G * D, G, D, kp + b * kb + h * kh, ks, vp + b * vb + h * vh, vs, S, sc,
                  vmask ? vmask + b * S : nullptr, op + t * G * D, scores, inv);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lfm2_quant, m) {
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, float scale, Tensor? valid=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(lfm2_quant, CPU, m) { m.impl("decode_attention", &decode_attention); }
