"""Model classes by `model_type`, and building one without allocating its weights."""

from __future__ import annotations

import torch
from torch import nn

from lfm2.config import ModelConfig
from lfm2.models.lfm2 import Lfm2ForCausalLM
from lfm2.models.lfm2_moe import Lfm2MoeForCausalLM, SparseMoeBlock

MODEL_CLASSES: dict[str, type[Lfm2ForCausalLM]] = {
    "lfm2": Lfm2ForCausalLM,
    "lfm2_moe": Lfm2MoeForCausalLM,
}


def build_model(config: ModelConfig, device: str | torch.device = "meta") -> Lfm2ForCausalLM:
    """The model for `config`, on `device` ("meta": shapes only, for loading or counting)."""
    with torch.device(device):
        return MODEL_CLASSES[config.model_type](config)


def cast_model(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """`model.to(dtype)`, keeping MoE routers and expert biases in float32."""
    model.to(dtype)
    for m in model.modules():
        if isinstance(m, SparseMoeBlock):
            m.gate.float()
            if m.use_expert_bias:
                m.expert_bias.data = m.expert_bias.data.float()
    return model


def count_parameters(model: nn.Module, active: bool = False) -> int:
    """Parameters (tied weights once) plus the expert-bias buffers, as the model cards count them.

    With `active`, experts count only `num_experts_per_tok` of `num_experts` each: the
    parameters one token goes through.
    """
    total = sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once
    total += sum(b.numel() for name, b in model.named_buffers() if name.endswith("expert_bias"))
    if active:
        for m in model.modules():
            if isinstance(m, SparseMoeBlock):
                per_expert = sum(p.numel() for p in m.experts[0].parameters())
                total -= per_expert * (len(m.experts) - m.top_k)
    return total
