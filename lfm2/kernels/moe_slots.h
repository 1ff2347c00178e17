// What lfm2's grouped MoE kernels share (moe.cpp's `moe_experts`, kquant.cpp's `kmoe_experts`): the
// checks of a call's routing arguments, and its token slots grouped by expert. A slot is m * k + j,
// token m's j-th chosen expert; each kernel reads every chosen expert's weights once for all its slots.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
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

}  // namespace lfm2_moe
