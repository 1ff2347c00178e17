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
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lfm2.config import ModelConfig
from lfm2.models.lfm2 import MLP, Lfm2ForCausalLM


class Router(nn.Linear):
    """The expert router; a Linear that always computes in float32."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
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
        out = torch.zeros_like(x)
        # Loop over the experts that received tokens; each runs once on its tokens.
        for e in torch.unique(chosen).tolist():
            token, slot = torch.where(chosen == e)
            y = self.experts[e](x[token]) * weights[token, slot, None].to(x.dtype)
            out.index_add_(0, token, y)
        return out.view(shape)


def moe_feed_forward(config: ModelConfig, layer_idx: int) -> nn.Module:
    if layer_idx < config.num_dense_layers:
        return MLP(config.hidden_size, config.intermediate_size)
    return SparseMoeBlock(config)


class Lfm2MoeForCausalLM(Lfm2ForCausalLM):
    """The dense model with mixture-of-experts feed-forwards."""

    make_feed_forward = staticmethod(moe_feed_forward)
