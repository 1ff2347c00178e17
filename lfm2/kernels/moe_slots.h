// What lfm2's grouped MoE kernels share (moe.cpp's `moe_experts`, kquant.cpp's `kmoe_experts`): the
// checks of a call's routing arguments, its token slots grouped by expert, and the two passes over
// them, whatever the weights' format. A slot is m * k + j, token m's j-th chosen expert; each pass
// reads every chosen expert's weights once for all its slots.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <utility>
#include <vector>

namespace lfm2_moe {

// x (M, D) float32, chosen (M, k) int64 and weights (M, k) float32, as a kernel named `op` needs them.
inline void check_routing(const at::Tensor& x, const at::Tensor& chosen, const at::Tensor& weights, const char* op) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous() && x.device().is_cpu(), "lfm2 ", op,
              ": x must be a contiguous float32 (M, D) CPU tensor");
  TORCH_CHECK(chosen.dim() == 2 && chosen.size(0) == x.size(0) && chosen.scalar_type() == at::kLong &&
                  chosen.is_contiguous(),
              "lfm2 ", op, ": chosen must be a contiguous int64 (M, k) tensor with M = ", x.size(0), " rows");
  TORCH_CHECK(weights.dim() == 2 && weights.size(0) == x.size(0) && weights.size(1) == chosen.size(1) &&
                  weights.scalar_type() == at::kFloat && weights.is_contiguous(),
              "lfm2 ", op, ": weights must be a contiguous float32 (M, k) tensor like chosen");
}

// Expert e's tensor from a kernel's list argument: the list holds one tensor per expert, or one (E, ...)
// tensor whose first dimension is the expert (a view of stacked expert tensors: one graph input
// instead of E, see lfm2/models/lfm2_moe.py `stack_experts`).
inline bool stacked(at::TensorList list) { return list.size() == 1 && list[0].dim() == 3; }
inline int64_t num_experts(at::TensorList list) {
  return stacked(list) ? list[0].size(0) : static_cast<int64_t>(list.size());
}
inline at::Tensor expert_at(at::TensorList list, int64_t e) { return stacked(list) ? list[0].select(0, e) : list[e]; }

// The slots routed to each chosen expert: slots[begin[u] .. begin[u + 1]] (ascending) went to experts[u]
// (the distinct chosen experts, ascending).
struct ExpertSlots {
  std::vector<int64_t> experts, begin, slots;
  int64_t count() const { return static_cast<int64_t>(experts.size()); }
};

inline ExpertSlots group_slots(const at::Tensor& chosen, int64_t num_experts, const char* op) {
  const int64_t* cp = chosen.data_ptr<int64_t>();
  const int64_t n = chosen.numel();
  std::vector<int64_t> count(num_experts, 0), start(num_experts, 0);
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(cp[i] >= 0 && cp[i] < num_experts, "lfm2 ", op, ": chosen expert ", cp[i], " is out of range [0, ",
                num_experts, ")");
    ++count[cp[i]];
  }
  ExpertSlots g;
  int64_t offset = 0;
  for (int64_t e = 0; e < num_experts; ++e) {
    if (!count[e]) continue;
    g.experts.push_back(e);
    g.begin.push_back(offset);
    start[e] = offset;
    offset += count[e];
  }
  g.begin.push_back(offset);
  g.slots.resize(n);
  for (int64_t i = 0; i < n; ++i) g.slots[start[cp[i]]++] = i;
  return g;
}

// Each chosen expert's matrix (g.experts[u], in the format's own struct M). From stacked tensors, expert 0's,
// made and checked once by make(0), then moved e slices on by advance(first, e) (every slice shares shape and
// strides): a call makes no tensor view per chosen expert (12-24 a decode step's block, ~1 us each). From
// lists of tensors, make(e) for each.
template <typename M, typename Make, typename Advance>
std::vector<M> expert_matrices(const ExpertSlots& g, bool is_stacked, Make make, Advance advance) {
  std::vector<M> W(g.experts.size());
  const M first = is_stacked ? make(0) : M{};
  for (size_t u = 0; u < W.size(); ++u) W[u] = is_stacked ? advance(first, g.experts[u]) : make(g.experts[u]);
  return W;
}

// y (M, D): for each token m, the sum over its chosen experts (ascending) of weight * W2 (silu(W1 x) * W3 x).
// 1. h[slot] = silu(a) * b with rows n0 .. n0 + unit13 of (a, b) from gate_up(u, n0, m, a, b), parallel over
//    (expert, unit of rows) pairs of every chosen expert; then prepare_down(h) (the format's activations of h);
// 2. y[m, n] += weight[slot] * out[n - n0] with down(u, n0, slot, h, out) writing unit2 rows, a thread owning
//    a range of columns n, so no two threads write one value and each token's sum runs in one order
//    whatever else is in the batch.
// A unit is one row, or a tile of rows that a format's weights are stored in (kquant.cpp's Q4_K tiles);
// H must be a multiple of unit13 and D of unit2. Each task gets about 32 KiB of weights (rows of
// row_bytes13 bytes of W1 and of W3, then of row_bytes2 bytes of W2 per chosen expert): enough that
// waking a thread is worth it.
template <typename GateUp, typename PrepareDown, typename Down>
at::Tensor two_passes_units(const at::Tensor& x, const at::Tensor& weights, const ExpertSlots& g, int64_t H,
                            int64_t unit13, int64_t unit2, int64_t row_bytes13, int64_t row_bytes2, GateUp gate_up,
                            PrepareDown prepare_down, Down down) {
  const int64_t M = x.size(0), D = x.size(1), K = weights.size(1), U = g.count();
  const auto grain = [](int64_t bytes) { return std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(1, bytes)); };
  std::vector<float> h(M * K * H);
  const int64_t units13 = H / unit13;
  at::parallel_for(0, U * units13, grain(2 * row_bytes13 * unit13), [&](int64_t i0, int64_t i1) {
    std::vector<float> a(unit13), b(unit13);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t u = i / units13, n0 = i % units13 * unit13;
      for (int64_t p = g.begin[u]; p < g.begin[u + 1]; ++p) {
        const int64_t slot = g.slots[p];
        gate_up(u, n0, slot / K, a.data(), b.data());
        for (int64_t l = 0; l < unit13; ++l) h[slot * H + n0 + l] = a[l] / (1.f + std::exp(-a[l])) * b[l];
      }
    }
  });
  prepare_down(h);
  at::Tensor y = at::zeros({M, D}, x.options());
  float* yp = y.data_ptr<float>();
  const float* wp = weights.data_ptr<float>();
  at::parallel_for(0, D / unit2, grain(U * row_bytes2 * unit2), [&](int64_t b0, int64_t b1) {
    std::vector<float> out(unit2);
    for (int64_t u = 0; u < U; ++u)
      for (int64_t nb = b0; nb < b1; ++nb)
        for (int64_t p = g.begin[u]; p < g.begin[u + 1]; ++p) {
          const int64_t slot = g.slots[p];
          down(u, nb * unit2, slot, h.data(), out.data());
          for (int64_t l = 0; l < unit2; ++l) yp[(slot / K) * D + nb * unit2 + l] += wp[slot] * out[l];
        }
  });
  return y;
}

// two_passes_units a row at a time: gate_up(u, n, m) returns the pair (a, b), down(u, n, slot, h) the value.
template <typename GateUp, typename PrepareDown, typename Down>
at::Tensor two_passes(const at::Tensor& x, const at::Tensor& weights, const ExpertSlots& g, int64_t H,
                      int64_t row_bytes13, int64_t row_bytes2, GateUp gate_up, PrepareDown prepare_down, Down down) {
  return two_passes_units(
      x, weights, g, H, 1, 1, row_bytes13, row_bytes2,
      [&](int64_t u, int64_t n, int64_t m, float* a, float* b) {
        const std::pair<float, float> ab = gate_up(u, n, m);
        a[0] = ab.first;
        b[0] = ab.second;
      },
      prepare_down, [&](int64_t u, int64_t n, int64_t slot, const float* h, float* out) { out[0] = down(u, n, slot, h); });
}

}  // namespace lfm2_moe
