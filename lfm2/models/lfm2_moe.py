"""LFM2-MoE: LFM2 whose feed-forwards past the first `num_dense_layers` are mixtures of experts.

Everything but the feed-forward is the dense model (`lfm2.models.lfm2`). The sparse block:
- router `gate` (d -> E, no bias), kept in float32 whatever the model dtype: routing decisions
  are discrete and bf16 rounding flips near-ties;
- scores = sigmoid(router logits);
- the top-k experts are CHOSEN by `scores + expert_bias` (a load-balancing bias learned during
  training), but WEIGHTED by the unbiased scores of the chosen experts: folding the bias into
  the weights, or using softmax, silently changes the model (a bug shipped elsewhere);
- weights divided by their sum (+1e-6, as the reference) if `norm_topk_prob`, then times
  `routed_scaling_factor`;
- output = sum over chosen experts of weight * SwiGLU_e(x), with `experts.{e}.w1/w2/w3`.

How the experts run (issue #30: a Python loop over experts made 8B-A1B decode 0.7x llama.cpp):
- a few tokens (decode, small batches; up to `GROUPED_MAX_ROWS`): one C++ call for all chosen
  experts of all tokens (`lfm2/kernels/moe.cpp`: w1/w3 with the SwiGLU fused, then w2 with the
  routing weights and the sum over experts), when every expert is a `QuantLinear` of one format
  or a float32 `Linear` (or, `kmoe_experts` in `lfm2/kernels/kquant.cpp`, a `KQuantLinear` of a
  GGUF K-quant file) and no gradient is needed. No Python loop, no host sync. A loaded file's experts
  go in as one stacked view per tensor kind (`stack_experts`), which keeps a compiled step's inputs few;
- otherwise (prefill, training, LoRA-wrapped experts, bf16, no kernels): the token slots sorted
  by expert once, each expert that got tokens runs its own module on its contiguous slice (a
  big matrix product at prefill), and the weighted results are added back with one index_add.
  One host sync (the per-expert counts) per call.
Both sum a token's experts in ascending expert order, as the per-expert loop they replace did.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lfm2 import kernels, kquant, quant  # quant imports lfm2.models.lfm2: use its names at call time
from lfm2.config import ModelConfig
from lfm2.models.lfm2 import MLP, Lfm2ForCausalLM, Linear, is_plain_linear

# Tokens up to which the grouped decode kernel runs the experts (as `lfm2.quant.GEMV_MAX_ROWS`:
# it streams each chosen expert's weights once for all its tokens, like a GEMV); more tokens are
# prefill, where each expert's slice is a matrix product.
GROUPED_MAX_ROWS = 16


class Router(Linear):
    """The expert router; a Linear that always computes in float32. At decode its float32 weight goes
    through `Linear`'s GEMV kernel: `F.linear` took 38 us a call for LFM2-8B-A1B's 2048 -> 32 router in
    the compiled step (22 calls a token, 0.8 ms of a 30 ms step)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.dtype == torch.float32:
            return super().forward(x.float())
        return F.linear(x.float(), self.weight.float())


class SparseMoeBlock(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.scaling = config.routed_scaling_factor
        self.use_expert_bias = config.use_expert_bias
        self.gate = Router(config.hidden_size, config.num_experts, bias=False)
        self.experts = nn.ModuleList(
            MLP(config.hidden_size, config.moe_intermediate_size) for _ in range(config.num_experts)
        )
        if self.use_expert_bias:
            self.register_buffer("expert_bias", torch.zeros(config.num_experts, dtype=torch.float32))

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert indices and weights (N, k) for tokens x (N, d)."""
        scores = torch.sigmoid(self.gate(x))  # (N, E), float32
        if self.use_expert_bias:
            chosen = torch.topk(scores + self.expert_bias.float(), self.top_k, dim=-1).indices
            weights = scores.gather(1, chosen)
        else:
            weights, chosen = torch.topk(scores, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-6)
        return chosen, weights * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (B, T, d) -> (N, d)
        chosen, weights = self.route(x)
        args = self._kernel_args(x) if x.shape[0] <= GROUPED_MAX_ROWS else None
        if args is not None:
            op, *tensors = args
            y = op(x.float().contiguous(), chosen, weights, *tensors)
            return y.to(x.dtype).view(shape)
        return self.grouped(x, chosen, weights).view(shape)

    def grouped(self, x: torch.Tensor, chosen: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The experts' weighted sum for tokens x (N, d), each expert's module on its tokens at once.

        The N * k (token, expert) slots are sorted by expert (stably, so a token's slots stay in
        ascending expert order), each expert with tokens runs on its contiguous slice, and one
        index_add puts the weighted outputs back. Works for any expert module (quantized, LoRA,
        any dtype, with autograd).
        """
        k = chosen.shape[1]
        flat = chosen.reshape(-1)  # (N * k,) slot -> expert
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=len(self.experts)).tolist()  # the one host sync
        token = order // k  # (N * k,) the token of each sorted slot
        xs = x.index_select(0, token).split(counts)
        ys = torch.cat([self.experts[e](xs[e]) for e, n in enumerate(counts) if n])
        ys = ys * weights.reshape(-1)[order, None].to(x.dtype)
        return torch.zeros_like(x).index_add_(0, token, ys)

    def _kernel_args(self, x: torch.Tensor) -> tuple | None:
        """(op, *arguments after x, chosen, weights) for one of the grouped kernels, or None.

        `moe_experts` (w1, s1, w3, s3, w2, s2, bits, group_size, x16) runs experts that are all
        `QuantLinear` of one format with int8 activations (what `lfm2.quant` makes, and GGUF Q8_0 /
        Q4_0 files), or all float32 `Linear`s, without biases; `kmoe_experts` (w1, w3, w2 and their
        GGML types) runs experts that are all `KQuantLinear` (GGUF K-quant files), a type per
        matrix. Both on the CPU, with no gradient wanted. Anything else (LoRA wrappers, bf16
        weights, training) takes `grouped`.
        Built on every call, so that no change to the experts (LoRA, reloading, `.to()`) is ever
        missed; it reads the modules' own dicts, as attribute access through nn.Module's
        `__getattr__` made it 0.55 ms a call for 32 experts against 0.05 ms this way (an 8B-A1B
        block, docs/benchmarks.md "MoE: a grouped expert kernel").
        """
        if not x.is_cpu or torch.is_grad_enabled():
            return None
        ops = kernels.ops()
        if ops is None:
            return None
        args = self._expert_args(ops)
        if args is None:
            return None
        op, cols, extra = args
        return op, *self._stacked(cols), *extra

    def _expert_args(self, ops) -> tuple | None:  # noqa: ANN001
        """(op, the experts' tensors per kind, the op's other arguments) for `_kernel_args`, or None."""
        first = self.experts._modules["0"]._modules["w1"]
        if type(first) is kquant.KQuantLinear:
            return self._kquant_args(ops)
        cols: tuple[list[torch.Tensor], ...] = ([], [], [], [], [], [])  # w1, s1, w3, s3, w2, s2
        fmt = None
        for expert in self.experts._modules.values():
            for i, name in enumerate(("w1", "w3", "w2")):
                m = expert._modules[name]
                if type(m) is quant.QuantLinear:
                    f = (m.bits, m.group_size, m._int8_activations, m._buffers["bias"] is None, m.x16)
                    cols[2 * i].append(m._buffers["qweight"])
                    cols[2 * i + 1].append(m._buffers["scales"])
                elif is_plain_linear(m):
                    w = m._parameters["weight"]
                    f = (32, None, w.dtype == torch.float32 and w.is_contiguous(), m._parameters["bias"] is None, False)
                    cols[2 * i].append(w)
                else:
                    return None
                if fmt is None:
                    fmt = f
                elif f != fmt:
                    return None
        if fmt is None or not (fmt[2] and fmt[3]) or not cols[0][0].is_cpu:
            return None
        return ops.moe_experts, cols, (fmt[0], fmt[1] or 0, fmt[4])

    def _kquant_args(self, ops) -> tuple | None:
        """`kmoe_experts` and its arguments where every expert matrix is a CPU `KQuantLinear`,
        each of w1, w3, w2 in one type across the experts (a GGUF file stores each as one tensor)."""
        cols: tuple[list[torch.Tensor], ...] = ([], [], [])  # w1, w3, w2 blocks
        types: list[int | None] = [None, None, None]
        for expert in self.experts._modules.values():
            for i, name in enumerate(("w1", "w3", "w2")):
                m = expert._modules[name]
                if type(m) is not kquant.KQuantLinear or types[i] not in (None, m.kernel_type):
                    return None
                types[i] = m.kernel_type
                cols[i].append(m._buffers["blocks"])
        if not cols[0][0].is_cpu:
            return None
        return ops.kmoe_experts, cols, tuple(types)

    def stack_experts(self) -> bool:
        """Note where each expert tensor kind (w1's weights, w1's scales, ...) lies as one (E, ...) view of
        equally spaced tensors in one storage: a loaded file's experts do (a GGUF file stores each kind as one
        tensor, lfm2's files expert by expert), and the kernels then take one tensor per kind, not one per
        expert. What that saves: LFM2-8B-A1B's compiled decode step had 4,516 inputs, 4,224 of them expert
        tensors, and gathering them and passing them on cost ~7 ms a step (a profile: 2 ms before the graph,
        5 ms in its wrapper) against ~30 ms for everything else. Eager only (it reads data pointers): the
        compiled step calls it before tracing, `_kernel_args` on its first eager call. Returns whether every
        kind stacked. `_apply` (`.to()`, dtype changes) forgets the views; so does replacing the modules.
        Assigning new tensors to the experts' modules in place of their own (not copying into them, as
        `load_state_dict` does) needs another call."""
        self.__dict__["_stacks"] = None
        ops = kernels.ops()
        args = None if ops is None else self._expert_args(ops)
        if args is None:
            return False
        views: list[torch.Tensor | None] = []
        for col in args[1]:
            if not col:  # float32 experts have no scales
                views.append(None)
                continue
            t0 = col[0]
            gap = col[1].data_ptr() - t0.data_ptr() if len(col) > 1 else t0.numel() * t0.element_size()
            size = t0.element_size()
            if (t0.dim() != 2 or not t0.is_contiguous() or gap < t0.numel() * size or gap % size
                    or any(t.shape != t0.shape or not t.is_contiguous() or t.data_ptr() - t0.data_ptr() != i * gap
                           or t.untyped_storage().data_ptr() != t0.untyped_storage().data_ptr()
                           for i, t in enumerate(col))):
                return False
            views.append(t0.as_strided((len(col), *t0.shape), (gap // size, t0.shape[1], 1)))
        self.__dict__["_stacks"] = (self.experts._modules["0"]._modules["w1"], tuple(views))
        return True

    def _stacked(self, cols: tuple[list[torch.Tensor], ...]) -> tuple[list[torch.Tensor], ...]:
        """`cols` (per kind, a tensor per expert), or per kind a list of its one (E, ...) view where
        `stack_experts` found one for these modules."""
        stacks = getattr(self, "_stacks", False)
        if stacks is False and not torch.compiler.is_compiling():
            self.stack_experts()
            stacks = self._stacks
        if not stacks or stacks[0] is not self.experts._modules["0"]._modules["w1"]:
            return cols
        return tuple([] if v is None else [v] for v in stacks[1])

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001, ANN202 - nn.Module's signature
        self.__dict__.pop("_stacks", None)  # the tensors may move: views of the old ones would be stale
        return super()._apply(fn, recurse)


def moe_feed_forward(config: ModelConfig, layer_idx: int) -> nn.Module:
    if layer_idx < config.num_dense_layers:
        return MLP(config.hidden_size, config.intermediate_size)
    return SparseMoeBlock(config)


class Lfm2MoeForCausalLM(Lfm2ForCausalLM):
    """The dense model with mixture-of-experts feed-forwards."""

    make_feed_forward = staticmethod(moe_feed_forward)
