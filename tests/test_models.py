"""The models against Hugging Face transformers on the same random weights, and every cache path."""

from __future__ import annotations

import pytest
import torch

import lfm2
from lfm2.config import ModelConfig
from tests.conftest import tiny_config, write_checkpoint

transformers = pytest.importorskip("transformers")

MOE = dict(
    model_type="lfm2_moe", num_experts=6, num_experts_per_tok=2, moe_intermediate_size=32,
    num_dense_layers=1, intermediate_size=80,
)
CONFIGS = {
    "dense": tiny_config(),
    "attention-first-mqa": tiny_config(
        num_hidden_layers=5, num_key_value_heads=1,
        layer_types=["full_attention", "conv", "conv", "full_attention", "conv"],
    ),
    "mha-conv-bias-kernel4": tiny_config(
        num_key_value_heads=4, conv_bias=True, conv_L_cache=4,
        layer_types=["conv", "conv", "full_attention", "full_attention"],
    ),
    "untied-head-dim": tiny_config(tie_word_embeddings=False, num_attention_heads=2, num_key_value_heads=2,
                                   head_dim=16),
    "moe": tiny_config(**MOE),
    "moe-unnormed-scaled": tiny_config(**MOE, norm_topk_prob=False, routed_scaling_factor=2.5,
                                       layer_types=["full_attention", "conv", "full_attention", "conv"]),
    "moe-no-bias": tiny_config(**{**MOE, "num_dense_layers": 0}, use_expert_bias=False),
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory):
    """(ours, transformers') loaded from one random checkpoint on disk."""
    cfg: ModelConfig = CONFIGS[request.param]
    path = write_checkpoint(tmp_path_factory.mktemp(request.param), cfg, seed=1)
    ours = lfm2.load(path).model
    theirs = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return ours, theirs


def ids(batch: int, length: int, vocab: int = 512, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_full_sequence_matches_transformers(pair):
    ours, theirs = pair
    x = ids(2, 40)
    ref = theirs(x).logits
    got = ours(x)
    assert got.shape == ref.shape == (2, 40, ours.config.vocab_size)
    assert (got - ref).abs().max() <= 1e-4
    assert ref.argmax(-1)[0].unique().numel() > 10  # the fixture's predictions depend on context


@torch.no_grad()
def test_prefill_then_decode_matches_full_sequence(pair):
    ours, _ = pair
    x = ids(2, 48, seed=1)
    full = ours(x)
    cache = ours.make_cache(batch_size=2, max_len=64)
    steps = [ours(x[:, :16], cache)]
    for t in range(16, 48):
        steps.append(ours(x[:, t : t + 1], cache))
    assert cache.length == 48
    assert (torch.cat(steps, dim=1) - full).abs().max() <= 1e-4


@torch.no_grad()
def test_chunked_prefill_matches_full_sequence(pair):
    ours, _ = pair
    x = ids(1, 30, seed=2)
    cache = ours.make_cache(1, 30)
    chunks = [ours(x[:, a:b], cache) for a, b in ((0, 1), (1, 8), (8, 9), (9, 30))]
    assert (torch.cat(chunks, dim=1) - ours(x)).abs().max() <= 1e-4


@torch.no_grad()
def test_left_padded_batch_rows_equal_rows_alone(pair):
    ours, _ = pair
    lengths = [5, 19, 12]
    T, pad = max(lengths), 0
    prompts = [ids(1, n, seed=10 + n)[0] for n in lengths]
    batch = torch.full((3, T), pad, dtype=torch.long)
    mask = torch.zeros(3, T, dtype=torch.long)
    for r, p in enumerate(prompts):
        batch[r, T - len(p) :] = p
        mask[r, T - len(p) :] = 1
    # Without a cache: each row's real positions equal the row alone.
    out = ours(batch, attention_mask=mask)
    for r, p in enumerate(prompts):
        alone = ours(p[None])
        assert (out[r, T - len(p) :] - alone[0]).abs().max() <= 1e-4
    # With a cache: prefill the padded batch, then decode 8 tokens per row.
    cache = ours.make_cache(3, T + 8)
    first = ours(batch, cache, attention_mask=mask, last_only=True)
    nxt = ids(3, 8, seed=99)
    decoded = [first] + [ours(nxt[:, i : i + 1], cache) for i in range(8)]
    decoded = torch.cat(decoded, dim=1)
    for r, p in enumerate(prompts):
        alone = ours(torch.cat([p, nxt[r]])[None])[0, len(p) - 1 :]
        assert (decoded[r] - alone).abs().max() <= 1e-4


@torch.no_grad()
def test_snapshot_restore_rolls_back(pair):
    ours, _ = pair
    x = ids(1, 20, seed=3)
    cache = ours.make_cache(1, 32)
    ours(x[:, :12], cache)
    snap = cache.snapshot()
    a = ours(x[:, 12:16], cache)
    ours(ids(1, 5, seed=4), cache)  # speculative tokens, rejected
    cache.restore(snap)
    b = ours(x[:, 12:16], cache)
    assert torch.equal(a, b)


@torch.no_grad()
def test_bfloat16_agreement(pair, tmp_path):
    """bf16 cannot match to 1e-4; we hold it to what bf16 rounding allows, relative to the logit scale."""
    ours32, theirs = pair
    ours = lfm2.load(_path_of(theirs, tmp_path), dtype="bfloat16").model
    theirs16 = theirs.to(torch.bfloat16)
    try:
        x = ids(2, 32, seed=5)
        ref32 = ours32(x)
        a, b = ours(x).float(), theirs16(x).logits.float()
        scale = ref32.abs().amax(-1)
        # Per position, the worst logit error relative to that position's logit scale. MoE
        # routing is discrete: a near-tie that bf16 flips sends a token to another expert, so
        # we bound most positions tightly and all of them loosely.
        err_fp32 = (a - ref32).abs().amax(-1) / scale
        err_hf = (a - b).abs().amax(-1) / scale
        assert err_fp32.quantile(0.9) < 0.05 and err_hf.quantile(0.9) < 0.05
        assert err_hf.max() < 0.5
        assert (a.argmax(-1) == ref32.argmax(-1)).float().mean() > 0.85
    finally:
        theirs.to(torch.float32)


def _path_of(model, tmp_path):
    model.save_pretrained(tmp_path / "hf")
    return tmp_path / "hf"


def test_bfloat16_moe_keeps_router_in_float32(tmp_path):
    path = write_checkpoint(tmp_path / "moe", CONFIGS["moe"], seed=2)
    model = lfm2.load(path, dtype="bfloat16").model
    moe = model.model.layers[1].feed_forward
    assert moe.gate.weight.dtype == torch.float32 and moe.expert_bias.dtype == torch.float32
    assert moe.experts[0].w1.weight.dtype == torch.bfloat16
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
