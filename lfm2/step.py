"""The decode step in one C++ call (`kernels/step.cpp`): lfm2's default decode path on the CPU.

A decode step of LFM2-350M at batch 1 is ~80 matrix-vector products (our kernels: ~14 ms on 2 Zen 1
cores for a Q4_K_M file) around ~900 small operations (norms, views, RoPE, cache writes, residual adds).
From Python each of those costs an interpreter and dispatcher round trip: 26 ms a token eagerly.
`torch.compile` fuses them (18 ms), but puts a compiler in the process (dynamo and inductor: ~250 MiB
resident) and makes the first start wait a minute (several for the MoE models). Here the blocks run in
C++ instead, calling the kernels the eager model calls, in its order: the same bits as the eager model,
as fast as the compiled step, with no compiler and ~150-200 MiB less memory (docs/benchmarks.md). The
embedding, the final norm and the head stay Python calls of the model's own modules (three calls a step).

The plan (`plan`) is read off a loaded model once: flat lists of the weight tensors (the model's own,
no copies), integers and reals that `step.cpp`'s header describes. A model it does not fit (LoRA
adapters, biases, bfloat16, layers narrower than the kernels' threshold, experts no grouped kernel
takes) gets no plan: `lfm2.load` then compiles its step where it would have (`lfm2.compile.auto_compile`).
A step it cannot take (more rows than the kernels' GEMV range, a prefill's marks) runs the model
eagerly. Changing the model after `lfm2.load` (`apply_lora`, `merge_lora`, `quantize_model`) drops
its step (`drop_decode_step`), fused or compiled: the model then decodes eagerly until a new `fuse_decode`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from lfm2 import kernels, kquant, quant
from lfm2.cache import Cache
from lfm2.models.lfm2 import FAST_GEMV_MAX_ROWS, FAST_GEMV_MIN_IN, MLP, Lfm2ForCausalLM, Linear, rope, rope_factors
from lfm2.models.lfm2_moe import GROUPED_MAX_ROWS, Router, SparseMoeBlock


class Unfit(Exception):
    """A model the fused step does not take; the message says which part of it."""


@dataclass
class Plan:
    """`kernels/step.cpp`'s streams for one model, and the most rows a step may have."""

    weights: list[torch.Tensor] = field(default_factory=list)
    ints: list[int] = field(default_factory=list)
    reals: list[float] = field(default_factory=list)
    max_rows: int = FAST_GEMV_MAX_ROWS

    def linear(self, m: nn.Module, name: str) -> None:
        """A linear layer, as the eager model's module would compute it at decode."""
        if type(m) in (nn.Linear, Linear, Router):
            w = m.weight
            if m.bias is not None or w.dtype != torch.float32 or not w.is_contiguous():
                raise Unfit(f"{name}: a float layer with a bias, or not float32")
            gemv = isinstance(m, Linear) and m.in_features >= FAST_GEMV_MIN_IN  # `Linear.forward`'s choice
            self.ints.append(0 if gemv else 1)
            self.weights.append(w)
        elif type(m) is quant.QuantLinear:
            if m.bias is not None:
                raise Unfit(f"{name}: a quantized layer with a bias")
            self.ints += [2, m.bits, m.group_size or m.in_features, int(m._int8_activations), int(m.x16),
                          m.gemm_rows()]
            self.weights += [m.qweight, m.scales]
            self.max_rows = min(self.max_rows, quant.GEMV_MAX_ROWS)
        elif type(m) is kquant.KQuantLinear:
            self.ints += [3, m.kernel_type, m.in_features]
            self.weights.append(m.blocks)
            self.max_rows = min(self.max_rows, kquant.KGEMV_MAX_ROWS)
        else:
            raise Unfit(f"{name}: {type(m).__name__} layers are not in the fused step")

    def norm(self, m: nn.Module, name: str) -> float:
        if not getattr(m, "kernel", False) or m.weight.dtype != torch.float32:
            raise Unfit(f"{name}: a norm the kernels do not take (narrow, or not float32)")
        self.weights.append(m.weight)
        return m.eps


def plan(model: nn.Module) -> Plan:
    """The fused step's plan for `model`; raises `Unfit` (with what does not fit) where there is none."""
    if not isinstance(model, Lfm2ForCausalLM):
        raise Unfit(f"a {type(model).__name__}, not an LFM2 language model")
    if model.device.type != "cpu" or model.dtype != torch.float32 or kernels.ops() is None:
        raise Unfit("not a float32 model on the CPU with lfm2's kernels")
    if model.config.conv_bias:
        raise Unfit("conv layers with biases")
    p = Plan()
    for i, layer in enumerate(model.model.layers):
        name = f"model.layers.{i}"
        p.ints.append(1 if layer.is_attention else 0)
        eps = p.norm(layer.operator_norm, f"{name}.operator_norm")
        p.reals.append(eps)
        if layer.is_attention:
            a = layer.self_attn
            if a.n_heads * a.head_dim < FAST_GEMV_MIN_IN:
                raise Unfit(f"{name}: attention narrower than the decode attention kernel's threshold")
            p.ints += [a.n_heads, a.n_kv, a.head_dim]
            for proj in ("q_proj", "k_proj", "v_proj"):
                p.linear(getattr(a, proj), f"{name}.self_attn.{proj}")
            for norm in ("q_layernorm", "k_layernorm"):
                if p.norm(getattr(a, norm), f"{name}.self_attn.{norm}") != eps:
                    raise Unfit(f"{name}: norms of different eps")
            p.reals.append(a.head_dim**-0.5)
            p.linear(a.out_proj, f"{name}.self_attn.out_proj")
        else:
            c = layer.conv
            if c.conv.bias is not None or c.conv.weight.dtype != torch.float32:
                raise Unfit(f"{name}: a conv with a bias, or not float32")
            p.linear(c.in_proj, f"{name}.conv.in_proj")
            p.weights.append(c.conv.weight)
            p.linear(c.out_proj, f"{name}.conv.out_proj")
        if p.norm(layer.ffn_norm, f"{name}.ffn_norm") != eps:
            raise Unfit(f"{name}: norms of different eps")
        ff = layer.feed_forward
        if type(ff) is MLP:
            if not ff.kernel:
                raise Unfit(f"{name}: a feed-forward narrower than the SwiGLU kernel's threshold")
            p.ints.append(0)
            for w in ("w1", "w3", "w2"):
                p.linear(getattr(ff, w), f"{name}.feed_forward.{w}")
        elif type(ff) is SparseMoeBlock:
            _experts(p, ff, f"{name}.feed_forward")
        else:
            raise Unfit(f"{name}: a {type(ff).__name__} feed-forward")
    return p


def _experts(p: Plan, block: SparseMoeBlock, name: str) -> None:
    """A mixture-of-experts block: its router, routing and one grouped kernel call (what
    `SparseMoeBlock.forward` does at decode), the experts as one stacked tensor per kind where a
    loaded file's are (`SparseMoeBlock.stack_experts`), else one tensor per expert."""
    p.ints.append(1)
    p.linear(block.gate, f"{name}.gate")
    args = block._expert_args(kernels.ops())
    if args is None:
        raise Unfit(f"{name}: experts that no grouped kernel takes")
    kquant_experts = type(block.experts[0].w1) is kquant.KQuantLinear
    bias = block.use_expert_bias
    p.ints += [block.top_k, int(block.norm_topk_prob), int(bias), int(kquant_experts)]
    if bias:
        p.weights.append(block.expert_bias)
    p.reals.append(float(block.scaling))
    for tensors in block._stacked(args[1]):
        p.ints.append(len(tensors))
        p.weights += tensors
    p.ints += [int(v) for v in args[2]]
    p.max_rows = min(p.max_rows, GROUPED_MAX_ROWS)


class FusedDecode:
    """`step(input_ids (B, 1), cache) -> logits (B, 1, vocab)` with the blocks in one C++ call; the
    engine's `model.decode_step`, as `lfm2.compile.CompiledDecode` is for models without a plan."""

    failed: str | None = None  # as CompiledDecode's, for callers that report on either (`lfm2 bench`)
    compile_seconds: float | None = None

    def __init__(self, model: Lfm2ForCausalLM, plan: Plan) -> None:
        self.model, self.plan = model, plan
        self.eager = 0  # steps run by the eager model (more rows than the plan takes, kernels turned off)

    def __call__(self, input_ids: torch.Tensor, cache: Cache) -> torch.Tensor:
        B = input_ids.shape[0]
        ops = kernels.ops()  # None where `LFM2_NO_KERNELS` was set since the load
        if input_ids.shape[1] != 1 or B > self.plan.max_rows or cache.marks or ops is None:
            self.eager += 1
            return self.model(input_ids, cache)
        model, config = self.model, self.model.config
        start, positions = cache.reserve(torch.ones_like(input_ids, dtype=torch.bool), all_real=True)
        x = model.model.embed_tokens(input_ids)  # (B, 1, d)
        cos, sin = rope_factors(*rope(positions, config.head_dim, config.rope_theta, x.dtype))  # (B, 1, 1, hd)
        valid = None if cache.dense else cache.valid[:, : start + 1]
        state = []
        for i in range(len(model.model.layers)):
            state += [cache.conv[i]] if i in cache.conv else [cache.keys[i], cache.values[i]]
        x = ops.decode_layers(x, self.plan.weights, self.plan.ints, self.plan.reals, state, cos.view(B, -1),
                              sin.view(B, -1), valid, start)
        return model.lm_head(model.model.embedding_norm(x))


def fuse_decode(model: nn.Module) -> FusedDecode | None:
    """Make `model`'s decode steps (in `lfm2.engine`) run fused, where a plan fits it; returns the step,
    or None (the model is left as it was)."""
    try:
        p = plan(model)
    except Unfit:
        return None
    step = FusedDecode(model, p)
    model.decode_step = step
    return step
