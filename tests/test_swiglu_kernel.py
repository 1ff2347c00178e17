"""The one-pass SwiGLU gate (`lfm2/kernels/swiglu.cpp`) against PyTorch's `silu(gate) * up`: ordinary values,
the ends of exp's range, infinities and NaN, lengths that leave a scalar tail, and the MLP that uses it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lfm2 import kernels
from lfm2.models.lfm2 import MLP


@pytest.fixture(scope="module")
def ops():
    loaded = kernels.ops()
    if loaded is None:
        pytest.skip("lfm2's kernels are not available here")
    return loaded


@pytest.mark.parametrize("n", [1, 8, 29, 4096 + 3, 70001])
def test_swiglu_equals_pytorchs(ops, n):
    g = torch.Generator().manual_seed(n)
    gate = torch.randn(n, generator=g) * 8
    up = torch.randn(n, generator=g)
    expected = F.silu(gate) * up
    out = ops.swiglu_(gate.clone(), up)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-38)


def test_the_ends_of_the_range(ops):
    """Where exp(-gate) overflows, underflows or is denormal, and non-finite gates, as PyTorch gives them."""
    edges = [0.0, -0.0, 1e-30, -1e-30, 20.0, -20.0, 87.0, -87.0, 87.4, -87.4, 88.6, -88.6, 88.8, -88.8, 100.0,
             -100.0, 1e30, -1e30, float("inf"), float("-inf"), float("nan")]
    gate = torch.tensor(edges * 3)  # 63 values: the vector loop and the scalar tail both see each
    up = torch.tensor([1.0] * len(edges) + [-2.5] * len(edges) + [3e-3] * len(edges))
    expected = F.silu(gate) * up
    out = ops.swiglu_(gate.clone(), up)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-38, equal_nan=True)


def test_in_place_and_refusals(ops):
    gate, up = torch.randn(3, 40), torch.randn(3, 40)
    expected = F.silu(gate) * up
    out = ops.swiglu_(gate, up)
    assert out.data_ptr() == gate.data_ptr()
    torch.testing.assert_close(gate, expected, rtol=1e-6, atol=1e-38)
    with pytest.raises(RuntimeError, match="of one shape"):
        ops.swiglu_(torch.zeros(3, 4), torch.zeros(4, 3))
    with pytest.raises(RuntimeError, match="float32"):
        ops.swiglu_(torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="contiguous"):
        ops.swiglu_(torch.zeros(4, 3).t(), torch.zeros(3, 4))


@torch.no_grad()
def test_a_wide_mlp_uses_it_at_inference(ops, monkeypatch):
    torch.manual_seed(0)
    mlp = MLP(1024, 96)
    assert mlp.kernel
    x = torch.randn(2, 5, 1024)
    with torch.enable_grad():
        expected = mlp(x)  # training: PyTorch's operations
    calls = []
    real = ops.swiglu_
    monkeypatch.setattr(kernels, "ops", lambda: type("Ops", (), {
        "__getattr__": lambda self, name: getattr(ops, name),
        "swiglu_": staticmethod(lambda g, u: calls.append(g.shape) or real(g, u))})())
    torch.testing.assert_close(mlp(x), expected, rtol=1e-5, atol=1e-6)
    assert calls == [torch.Size([2, 5, 96])]
    assert not MLP(64, 96).kernel  # narrow models keep PyTorch's operations
