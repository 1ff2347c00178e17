"""lfm2's decode attention kernel (`lfm2/kernels/attention.cpp`) against PyTorch's SDPA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("B,KV,G,S,D", [
    (1, 8, 4, 550, 64),   # LFM2-1.2B's decode step over a 550-token cache
    (1, 8, 2, 37, 64),    # LFM2-350M's
    (2, 2, 5, 19, 64),    # several rows; a group of 4 and a remainder of 1
    (3, 1, 3, 1, 64),     # a single key
    (1, 2, 8, 40, 128),
    (2, 2, 3, 9, 24),     # a head size the SIMD path does not take
])
def test_matches_sdpa_on_cache_views(ops, threads, B, KV, G, S, D):
    """The cache's filled slots are a strided view (slots beyond S exist); scores of very different
    sizes exercise the softmax's max subtraction and its exponentials."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(S * 31 + G)
        keys = torch.randn(B, KV, S + 13, D, generator=g)
        values = torch.randn(B, KV, S + 13, D, generator=g)
        q = torch.randn(B, KV, G, D, generator=g) * 4
        k, v = keys[:, :, :S], values[:, :, :S]
        got = ops.decode_attention(q, k, v, D**-0.5)
        torch.testing.assert_close(got, F.scaled_dot_product_attention(q, k, v), atol=2e-5, rtol=1e-5)
        half = ops.decode_attention(q, k, v, 0.5 * D**-0.5)  # the scale is applied, not assumed
        torch.testing.assert_close(half, F.scaled_dot_product_attention(q, k, v, scale=0.5 * D**-0.5),
                                   atol=2e-5, rtol=1e-5)
    finally:
        torch.set_num_threads(old)


def test_extreme_scores_stay_finite(ops):
    q = torch.full((1, 1, 2, 64), 30.0)
    k = torch.randn(1, 1, 300, 64) * 10
    v = torch.randn(1, 1, 300, 64)
    got = ops.decode_attention(q, k, v, 64**-0.5)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, F.scaled_dot_product_attention(q, k, v), atol=1e-4, rtol=1e-4)


def test_bad_inputs_are_refused(ops):
    q, k = torch.randn(1, 2, 2, 64), torch.randn(1, 2, 5, 64)
    with pytest.raises(RuntimeError, match="must be float32"):
        ops.decode_attention(q.double(), k.double(), k.double(), 0.125)
    with pytest.raises(RuntimeError, match=r"k and v must be \(B, KV, S, D\)"):
        ops.decode_attention(q, torch.randn(1, 3, 5, 64), torch.randn(1, 3, 5, 64), 0.125)
    with pytest.raises(RuntimeError, match="rows must be contiguous"):
        t = torch.randn(1, 2, 64, 5).transpose(2, 3)
        ops.decode_attention(q, t, t, 0.125)


@pytest.mark.parametrize("D", [64, 24])
def test_masked_slots_match_sdpa_and_get_no_weight(ops, D):
    """A continuous batch's rows attend only their valid slots: the kernel equals masked SDPA, and a
    masked slot's key or value (here huge, or NaN) has no effect at all."""
    g = torch.Generator().manual_seed(7)
    B, KV, G, S = 3, 2, 4, 41
    q, k, v = (torch.randn(B, KV, G if i == 0 else S, D, generator=g) for i in range(3))
    valid = torch.rand(B, S, generator=g) > 0.4
    valid[:, -1] = True  # a step always sees its own slot
    valid[2] = False
    valid[2, -1] = True  # a row that has only just joined
    got = ops.decode_attention(q, k, v, D**-0.5, valid)
    torch.testing.assert_close(got, F.scaled_dot_product_attention(q, k, v, attn_mask=valid[:, None, None]),
                               atol=2e-5, rtol=1e-5)
    k2, v2 = k.clone(), v.clone()
    k2[~valid[:, None, :, None].expand_as(k2)] = 1e30
    v2[~valid[:, None, :, None].expand_as(v2)] = float("nan")
    assert torch.equal(ops.decode_attention(q, k2, v2, D**-0.5, valid), got)
    with pytest.raises(RuntimeError, match=r"valid must be a bool \(B, S\)"):
        ops.decode_attention(q, k, v, D**-0.5, valid[:, :-1])
