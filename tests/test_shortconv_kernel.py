"""The fused gated short convolution (`lfm2/kernels/shortconv.cpp`) and one-pass RMSNorm
(`lfm2/kernels/norm.cpp`) against the model's PyTorch path, on random weights: decode steps (the state
must roll correctly), prefill chunks longer and shorter than the kernel, the states kept after marked
tokens, and a forward pass without a cache."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lfm2 import kernels
from lfm2.config import ModelConfig
from lfm2.models.lfm2 import Lfm2ForCausalLM, RMSNorm, ShortConv


def _tiny(conv_bias: bool) -> Lfm2ForCausalLM:
    torch.manual_seed(3)
    config = ModelConfig(vocab_size=97, hidden_size=48, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         layer_types=["conv", "full_attention", "conv"], conv_bias=conv_bias)
    model = Lfm2ForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    for m in model.modules():  # as wide models have them (narrow ones keep PyTorch's operations)
        if isinstance(m, ShortConv):
            m.wide = True
        if isinstance(m, RMSNorm):
            m.kernel = True
    return model


class _Counting:
    """`kernels.ops()` that counts the fused calls, so a test knows the kernels ran."""

    def __init__(self, ops) -> None:  # noqa: ANN001
        self.ops, self.calls = ops, {"short_conv": 0, "rms_norm": 0}

    def __getattr__(self, name: str):  # noqa: ANN204
        fn = getattr(self.ops, name)
        if name not in self.calls:
            return fn

        def counted(*args):  # noqa: ANN002, ANN202
            self.calls[name] += 1
            return fn(*args)

        return counted


def _both(ops, monkeypatch, run):  # noqa: ANN001, ANN202
    counting = _Counting(ops)
    monkeypatch.setattr(kernels, "ops", lambda: counting)
    fused = run()
    assert counting.calls["short_conv"] > 0 and counting.calls["rms_norm"] > 0
    monkeypatch.setattr(kernels, "ops", lambda: None)
    return fused, run()


@pytest.mark.parametrize("conv_bias", [False, True])
def test_prefill_chunks_and_decode_steps_equal_the_pytorch_path(ops, conv_bias, monkeypatch):
    model = _tiny(conv_bias)
    ids = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(0))

    def run() -> torch.Tensor:
        cache = model.make_cache(2, 20)
        out = []
        with torch.no_grad():
            # chunks of 4, 1 and 2 tokens (a chunk shorter than the kernel reads the state for all its taps)
            for a, b in ((0, 4), (4, 5), (5, 7), (7, 12)):
                out.append(model(ids[:, a:b], cache=cache))
            out += [model(ids[:, t : t + 1], cache=cache) for t in range(12, 16)]
        return torch.cat(out, dim=1), torch.stack(list(cache.conv.values()))

    (fused, fused_state), (plain, plain_state) = _both(ops, monkeypatch, run)
    torch.testing.assert_close(fused, plain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused_state, plain_state, atol=1e-6, rtol=1e-6)


def test_marked_states_and_a_pass_without_cache_equal_the_pytorch_path(ops, monkeypatch):
    model = _tiny(False)
    ids = torch.randint(0, 97, (1, 9), generator=torch.Generator().manual_seed(1))

    def run():  # noqa: ANN202
        cache = model.make_cache(1, 16)
        with torch.no_grad():
            model(ids[:, :3], cache=cache)
            cache.marks = (0, 1, 4, 6)  # at the chunk's start, inside the old state's reach, and later
            model(ids[:, 3:], cache=cache)
            marked = {layer: torch.stack(states) for layer, states in cache.marked.items()}
            return model(ids), marked

    (fused, fused_marked), (plain, plain_marked) = _both(ops, monkeypatch, run)
    torch.testing.assert_close(fused, plain, atol=1e-5, rtol=1e-5)
    assert sorted(fused_marked) == sorted(plain_marked) == [0, 2]
    for layer in plain_marked:
        torch.testing.assert_close(fused_marked[layer], plain_marked[layer], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("D", [37, 64, 1024])
def test_rms_norm_equals_pytorchs(ops, D):
    g = torch.Generator().manual_seed(D)
    x = torch.randn(5, 3, D, generator=g) * 3
    w = torch.randn(D, generator=g)
    torch.testing.assert_close(ops.rms_norm(x, w, 1e-5), F.rms_norm(x, (D,), w, 1e-5), atol=2e-6, rtol=2e-6)


def test_bad_input_is_refused(ops):
    with pytest.raises(RuntimeError, match=r"state must be \(2, 4, L-1\)"):
        ops.short_conv(torch.zeros(2, 1, 12), torch.zeros(2, 5, 2), torch.zeros(4, 1, 3), None)
    with pytest.raises(RuntimeError, match="must hold"):
        ops.short_conv(torch.zeros(2, 1, 12), torch.zeros(2, 4, 2), torch.zeros(4, 1, 2), None)
    with pytest.raises(RuntimeError, match=r"bch must be contiguous \(B, T, 3d\)"):
        ops.short_conv(torch.zeros(2, 12), torch.zeros(2, 4, 2), torch.zeros(4, 1, 3), None)
    with pytest.raises(RuntimeError, match=r"weight \(D\)"):
        ops.rms_norm(torch.zeros(2, 8), torch.zeros(7), 1e-5)
