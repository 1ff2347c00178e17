// A decode step of LFM2 (one new token per row) through all of the model's blocks in one call
// (see lfm2/step.py, which builds the plan this reads, and lfm2/models/lfm2.py for the blocks).
//
// At batch 1 a step of LFM2-350M is ~80 matrix-vector products around ~900 small operations
// (norms, views, RoPE, cache writes, residual adds); run from Python, each pays its interpreter
// and dispatcher round trip: 26 ms a token eagerly where the products take 14. `torch.compile`
// fuses them (18 ms), at the price of a compiler in the process (~250 MiB resident) and a minute's
// first compile. Here the blocks run in C++, calling the kernels the eager model calls
// (`fgemv`, `qgemv`, `kgemv`, `rms_norm`, `short_conv`, `swiglu_`, `decode_attention`,
// `moe_experts`, `kmoe_experts`, through the dispatcher) in the eager model's order, and the few
// element-wise steps between them (RoPE, the cache writes, residual adds) as plain loops with the
// eager operations' roundings: the step's results are the eager model's bits.
//
// The plan is three flat streams, read front to back a layer at a time: weights (Tensor[]), ints
// (int[]) and reals (float[]); the state (Tensor[]) holds per layer the conv state (B, d, L-1) of a
// conv layer, or the key and value caches (B, KV, S, hd) of an attention layer.
//   layer:     ints [kind: 0 conv, 1 attention], weights [operator_norm], reals [eps (both norms')],
//              the block, weights [ffn_norm], ints [feed-forward: 0 SwiGLU, 1 experts], the feed-forward
//   conv:      linear(in_proj), weights [conv weight (d, 1, L)], linear(out_proj)
//   attention: ints [heads, kv heads, head_dim], linear(q_proj), linear(k_proj), linear(v_proj),
//              weights [q_layernorm, k_layernorm], reals [scale], linear(out_proj)
//   SwiGLU:    linear(w1), linear(w3), linear(w2)
//   experts:   linear(router), ints [top_k, normalize, has bias, op: 0 moe_experts, 1 kmoe_experts],
//              weights [expert bias, if any], reals [scaling], then per tensor list of the op (6 or 3)
//              ints [its length] and weights [its tensors], then ints [the op's 3 integer arguments]
//   linear:    ints [kind]: 0 float32 GEMV, weights [w]; 1 F.linear, weights [w]; 2 lfm2 int8/int4,
//              weights [qweight, scales], ints [bits, group size, int8 activations, x16, GEMM from rows]; 3 GGUF
//              blocks, weights [blocks], ints [type, k]

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <vector>

namespace {

using TensorList = at::TensorList;

template <class Sig>
c10::TypedOperatorHandle<Sig> handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

// The kernels, as registered by the other sources of this library.
struct Kernels {
  c10::TypedOperatorHandle<at::Tensor(const at::Tensor&, const at::Tensor&)> fgemv =
      handle<at::Tensor(const at::Tensor&, const at::Tensor&)>("lfm2_quant::fgemv");
  c10::TypedOperatorHandle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, int64_t,
                                      bool, bool)>
      qgemv = handle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, int64_t, bool,
                                bool)>("lfm2_quant::qgemv");
  c10::TypedOperatorHandle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, int64_t,
                                      bool)>
      qgemm = handle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, int64_t, bool)>(
          "lfm2_quant::qgemm");
  c10::TypedOperatorHandle<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, int64_t)> kgemv =
      handle<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, int64_t)>("lfm2_quant::kgemv");
  c10::TypedOperatorHandle<at::Tensor(const at::Tensor&, const at::Tensor&, double)> rms_norm =
      handle<at::Tensor(const at::Tensor&, const at::Tensor&, double)>("lfm2_quant::rms_norm");
  c10::TypedOperatorHandle<at::Tensor(const at::Tensor&, at::Tensor&, const at::Tensor&,
                                      const std::optional<at::Tensor>&)>
      short_conv = handle<at::Tensor(const at::Tensor&, at::Tensor&, const at::Tensor&,
                                     const std::optional<at::Tensor>&)>("lfm2_quant::short_conv");
  c10::TypedOperatorHandle<at::Tensor(at::Tensor, const at::Tensor&)> swiglu_ =
      handle<at::Tensor(at::Tensor, const at::Tensor&)>("lfm2_quant::swiglu_");
  c10::TypedOperatorHandle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, double,
                                      const std::optional<at::Tensor>&)>
      attention = handle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, double,
                                    const std::optional<at::Tensor>&)>("lfm2_quant::decode_attention");
  c10::TypedOperatorHandle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, TensorList,
                                      TensorList, TensorList, TensorList, TensorList, TensorList, int64_t, int64_t,
                                      bool)>
      moe = handle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, TensorList, TensorList,
                              TensorList, TensorList, TensorList, TensorList, int64_t, int64_t, bool)>(
          "lfm2_quant::moe_experts");
  c10::TypedOperatorHandle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, TensorList,
                                      TensorList, TensorList, int64_t, int64_t, int64_t)>
      kmoe = handle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, TensorList, TensorList,
                               TensorList, int64_t, int64_t, int64_t)>("lfm2_quant::kmoe_experts");
};

const Kernels& kernels() {
  static const Kernels k;  // looked up once, on the first step (every source is registered by then)
  return k;
}

// The plan's streams, read front to back; a short stream is a plan that does not fit the model.
struct Plan {
  TensorList w;
  c10::IntArrayRef i;
  c10::ArrayRef<double> f;
  size_t wi = 0, ii = 0, fi = 0;

  const at::Tensor& tensor() {
    TORCH_CHECK(wi < w.size(), "lfm2 decode_layers: the plan's weights end early (", w.size(), ")");
    return w[wi++];
  }
  int64_t integer() {
    TORCH_CHECK(ii < i.size(), "lfm2 decode_layers: the plan's ints end early (", i.size(), ")");
    return i[ii++];
  }
  double real() {
    TORCH_CHECK(fi < f.size(), "lfm2 decode_layers: the plan's reals end early (", f.size(), ")");
    return f[fi++];
  }
  TensorList tensors(int64_t n) {
    TORCH_CHECK(n >= 0 && wi + n <= w.size(), "lfm2 decode_layers: the plan's weights end early");
    TensorList out = w.slice(wi, n);
    wi += n;
    return out;
  }
};

// y = x W^T for x (B, K) with the layer the plan describes next.
at::Tensor linear(Plan& p, const at::Tensor& x) {
  const Kernels& k = kernels();
  switch (p.integer()) {
    case 0:
      return k.fgemv.call(x, p.tensor());
    case 1:
      return at::linear(x, p.tensor());
    case 2: {
      const at::Tensor& q = p.tensor();
      const at::Tensor& s = p.tensor();
      const int64_t bits = p.integer(), group = p.integer();
      const bool int8 = p.integer() != 0, x16 = p.integer() != 0;
      const int64_t gemm_from = p.integer();  // rows from which `QuantLinear.forward` takes the GEMM
      if (x.size(0) >= gemm_from) return k.qgemm.call(x, q, s, bits, group, x16);
      return k.qgemv.call(x, q, s, bits, group, int8, x16);
    }
    case 3: {
      const at::Tensor& blocks = p.tensor();
      const int64_t type = p.integer(), kk = p.integer();
      return k.kgemv.call(x, blocks, type, kk);
    }
    default:
      TORCH_CHECK(false, "lfm2 decode_layers: unknown linear kind in the plan");
  }
}

// Rotate-half RoPE in place on x (B, H, D) with cos and the signed sin (B, D), as
// lfm2/models/lfm2.py's apply_rope: x*cos + roll(x, D/2)*signed_sin, each product rounded (GCC
// would otherwise fuse a product and the sum into one FMA: keys one rounding off the eager model's,
// which the next layer's int8 activations can turn into a visible difference).
__attribute__((optimize("fp-contract=off"))) void rope_(at::Tensor& x, const float* cos, const float* ssin) {
  const int64_t B = x.size(0), H = x.size(1), D = x.size(2), half = D / 2;
  float* xp = x.data_ptr<float>();
  std::vector<float> row(D);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h) {
      float* r = xp + (b * H + h) * D;
      const float* c = cos + b * D;
      const float* s = ssin + b * D;
      for (int64_t j = 0; j < D; ++j) row[j] = r[j];
      for (int64_t j = 0; j < D; ++j) {
        const float a = row[j] * c[j];
        const float t = row[j < half ? j + half : j - half] * s[j];
        r[j] = a + t;
      }
    }
}

// The k or v of this step (B, KV, D) into slot `slot` of a cache (B, KV, S, D), rows of D contiguous.
void write_slot(at::Tensor& cache, const at::Tensor& x, int64_t slot) {
  const int64_t B = x.size(0), KV = x.size(1), D = x.size(2);
  TORCH_CHECK(cache.dim() == 4 && cache.size(0) == B && cache.size(1) == KV && cache.size(3) == D &&
                  cache.stride(3) == 1 && slot < cache.size(2) && cache.scalar_type() == at::kFloat,
              "lfm2 decode_layers: a KV cache must be float32 (", B, ", ", KV, ", S > ", slot, ", ", D,
              ") with contiguous rows, got ", cache.sizes());
  const float* src = x.data_ptr<float>();
  float* dst = cache.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < KV; ++h)
      std::copy(src + (b * KV + h) * D, src + (b * KV + h + 1) * D,
                dst + b * cache.stride(0) + h * cache.stride(1) + slot * cache.stride(2));
}

at::Tensor conv_block(Plan& p, const at::Tensor& h, at::Tensor& state) {
  const int64_t B = h.size(0);
  const at::Tensor bch = linear(p, h);  // (B, 3d)
  const at::Tensor& weight = p.tensor();
  const at::Tensor y = kernels().short_conv.call(bch.view({B, 1, bch.size(1)}), state, weight, std::nullopt);
  return linear(p, y.view({B, y.size(2)}));
}

at::Tensor attention_block(Plan& p, const at::Tensor& h, at::Tensor& kc, at::Tensor& vc, const float* cos,
                           const float* ssin, const std::optional<at::Tensor>& valid, int64_t slot, double eps) {
  const Kernels& k = kernels();
  const int64_t B = h.size(0), H = p.integer(), KV = p.integer(), D = p.integer();
  // (B, H*D) -> (B, H, D), normed per head before RoPE
  at::Tensor q = linear(p, h);
  at::Tensor kk = linear(p, h);
  const at::Tensor v = linear(p, h).view({B, KV, D});
  const at::Tensor& q_norm = p.tensor();
  const at::Tensor& k_norm = p.tensor();
  q = k.rms_norm.call(q.view({B, H, D}), q_norm, eps);
  kk = k.rms_norm.call(kk.view({B, KV, D}), k_norm, eps);
  rope_(q, cos, ssin);
  rope_(kk, cos, ssin);
  write_slot(kc, kk, slot);
  write_slot(vc, v, slot);
  const double scale = p.real();
  // each kv head's group of queries against its cached keys: (B, H, D) -> (B, KV, H/KV, D)
  const at::Tensor out = k.attention.call(q.view({B, KV, H / KV, D}), kc.narrow(2, 0, slot + 1),
                                          vc.narrow(2, 0, slot + 1), scale, valid);
  return linear(p, out.view({B, H * D}));
}

at::Tensor swiglu_block(Plan& p, const at::Tensor& h) {
  at::Tensor gate = linear(p, h);
  const at::Tensor up = linear(p, h);
  return linear(p, kernels().swiglu_.call(gate, up));
}

// lfm2/models/lfm2_moe.py's SparseMoeBlock: sigmoid scores, the top k chosen by score + bias,
// weighted by score (normalized, scaled), and the chosen experts in one kernel call.
at::Tensor experts_block(Plan& p, const at::Tensor& h) {
  const Kernels& k = kernels();
  const at::Tensor scores = at::sigmoid(linear(p, h));  // (B, E)
  const int64_t top_k = p.integer();
  const bool normalize = p.integer() != 0, has_bias = p.integer() != 0;
  const int64_t op = p.integer();
  at::Tensor chosen, weights;
  if (has_bias) {
    chosen = std::get<1>(at::topk(scores + p.tensor(), top_k, -1));
    weights = scores.gather(1, chosen);
  } else {
    std::tie(weights, chosen) = at::topk(scores, top_k, -1);
  }
  if (normalize) weights = weights / (weights.sum(-1, true) + 1e-6);
  weights = weights * p.real();
  const int64_t lists = op == 0 ? 6 : 3;
  std::vector<TensorList> t;
  for (int64_t l = 0; l < lists; ++l) t.push_back(p.tensors(p.integer()));
  const int64_t a = p.integer(), b = p.integer(), c = p.integer();
  if (op == 0) return k.moe.call(h, chosen, weights, t[0], t[1], t[2], t[3], t[4], t[5], a, b, c != 0);
  return k.kmoe.call(h, chosen, weights, t[0], t[1], t[2], a, b, c);
}

// x (B, 1, d): the embedded tokens; state: per layer, its conv state or its key and value caches;
// cos, ssin (B, D): RoPE's factors at each row's position; valid (B, slot + 1): the slots each row
// attends (None: all); slot: the cache slot of this step. Returns the last block's output (B, 1, d).
at::Tensor decode_layers(const at::Tensor& x_in, TensorList weights, c10::IntArrayRef ints, c10::ArrayRef<double> reals,
                         TensorList state, const at::Tensor& cos_in, const at::Tensor& ssin_in,
                         const std::optional<at::Tensor>& valid, int64_t slot) {
  TORCH_CHECK(x_in.scalar_type() == at::kFloat && x_in.device().is_cpu() && x_in.dim() == 3 && x_in.size(1) == 1,
              "lfm2 decode_layers: x must be a float32 CPU (B, 1, d) tensor, got ", x_in.sizes());
  const int64_t B = x_in.size(0), d = x_in.size(2);
  const at::Tensor cos = cos_in.contiguous(), ssin = ssin_in.contiguous();
  TORCH_CHECK(cos.scalar_type() == at::kFloat && ssin.scalar_type() == at::kFloat && cos.size(0) == B &&
                  cos.sizes() == ssin.sizes(),
              "lfm2 decode_layers: cos and sin must be float32 (B, head_dim)");
  const float* cp = cos.data_ptr<float>();
  const float* sp = ssin.data_ptr<float>();
  const Kernels& k = kernels();
  Plan p{weights, ints, reals};
  at::Tensor x = x_in.reshape({B, d});
  size_t si = 0;
  auto next_state = [&]() -> at::Tensor {
    TORCH_CHECK(si < state.size(), "lfm2 decode_layers: fewer state tensors than the plan's layers need");
    return state[si++];
  };
  while (p.ii < p.i.size()) {
    const int64_t kind = p.integer();
    const at::Tensor& norm = p.tensor();
    const double eps = p.real();
    const at::Tensor h = k.rms_norm.call(x, norm, eps);
    if (kind == 0) {
      at::Tensor conv = next_state();
      x = x + conv_block(p, h, conv);
    } else {
      at::Tensor kc = next_state(), vc = next_state();
      TORCH_CHECK(cos.size(1) == kc.size(3), "lfm2 decode_layers: RoPE factors of ", cos.size(1),
                  " values for a head of ", kc.size(3));
      x = x + attention_block(p, h, kc, vc, cp, sp, valid, slot, eps);
    }
    const at::Tensor h2 = k.rms_norm.call(x, p.tensor(), eps);
    x = x + (p.integer() == 0 ? swiglu_block(p, h2) : experts_block(p, h2));
  }
  TORCH_CHECK(p.wi == p.w.size() && p.fi == p.f.size() && si == state.size(),
              "lfm2 decode_layers: the plan's streams and the state do not end together");
  return x.view({B, 1, d});
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lfm2_quant, m) {
  m.def("decode_layers(Tensor x, Tensor[] weights, int[] ints, float[] reals, Tensor(a!)[] state, Tensor cos, "
        "Tensor sin, Tensor? valid, int slot) -> Tensor");
}

TORCH_LIBRARY_IMPL(lfm2_quant, CPU, m) { m.impl("decode_layers", &decode_layers); }
