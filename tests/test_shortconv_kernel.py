"""The fused decode step of the gated short convolution (`lfm2/kernels/shortconv.cpp`) against the
model's PyTorch path, on random weights, over several decode steps (the state must roll correctly)."""

from __future__ import annotations

import pytest
import torch

from lfm2 import kernels
from lfm2.config import ModelConfig
from lfm2.models.lfm2 import Lfm2ForCausalLM


def _tiny(conv_bias: bool) -> Lfm2ForCausalLM:
    torch.manual_seed(3)
    config = ModelConfig(vocab_size=97, hidden_size=48, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         layer_types=["conv", "full_attention", "conv"], conv_bias=conv_bias)
    model = Lfm2ForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


@pytest.mark.parametrize("conv_bias", [False, True])
def test_decode_steps_equal_the_pytorch_path(ops, conv_bias, monkeypatch):
    model = _tiny(conv_bias)
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(0))

    def run() -> torch.Tensor:
        cache = model.make_cache(2, 16)
        with torch.no_grad():
            out = [model(ids[:, :4], cache=cache)[:, -1]]
            out += [model(ids[:, t : t + 1], cache=cache)[:, -1] for t in range(4, 12)]
        return torch.stack(out)

    fused = run()
    monkeypatch.setattr(kernels, "ops", lambda: None)
    torch.testing.assert_close(fused, run(), atol=1e-5, rtol=1e-5)


def test_bad_state_is_refused(ops):
    with pytest.raises(RuntimeError, match=r"state must be \(2, 4, L-1\)"):
        ops.short_conv_step(torch.zeros(2, 1, 12), torch.zeros(2, 5, 2), torch.zeros(4, 1, 3), None)
    with pytest.raises(RuntimeError, match="must hold"):
        ops.short_conv_step(torch.zeros(2, 1, 12), torch.zeros(2, 4, 2), torch.zeros(4, 1, 2), None)
