"""Shared fixtures: small random-weight LFM2 checkpoints written to disk in Hugging Face layout."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from lfm2.config import ModelConfig
from lfm2.models import build_model
from lfm2.weights import save_checkpoint

torch.set_num_threads(min(2, os.cpu_count() or 1))

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"


def tiny_config(**overrides) -> ModelConfig:
    """A small dense config; every architectural feature, tiny widths."""
    base = dict(
        vocab_size=512, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=96, layer_types=["conv", "full_attention", "conv", "full_attention"],
        max_position_embeddings=256,
    )
    return ModelConfig(**{**base, **overrides})


def random_model(config: ModelConfig, seed: int = 0):
    """A random model whose every weight matters: norms and expert biases are randomised too.

    The blocks' output projections are scaled up so that the prediction depends on the
    context, not only on the current token (see shared/notes/testing-random-models.md).
    """
    torch.manual_seed(seed)
    model = build_model(config, device="cpu")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif name.endswith(("out_proj.weight", "w2.weight")):
                p.mul_(4.0)
            elif name.endswith("conv.conv.weight"):
                p.copy_(torch.randn_like(p) * 0.5)
        for name, b in model.named_buffers():
            if name.endswith("expert_bias"):
                b.copy_(torch.randn_like(b) * 0.5)
    return model.eval()


def write_checkpoint(path: Path, config: ModelConfig, seed: int = 0) -> Path:
    save_checkpoint(random_model(config, seed), path)
    return path


@pytest.fixture
def tiny_checkpoint(tmp_path: Path) -> Path:
    return write_checkpoint(tmp_path / "tiny", tiny_config())
