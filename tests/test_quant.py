"""Weight-only quantization (`lfm2.quant`) and its C++ kernels (`lfm2.kernels`).

Every compute path is held against the others on the same quantized weights: the C++ GEMV with
float activations and with int8 activations, the C++ dequantize + float GEMM (prefill), and the
pure-PyTorch fallback; and all of them against the float layer they came from. The kernel
tests are skipped, with the build error as the reason, where no compiler is available.
"""

from __future__ import annotations

import copy
import json
import types
import warnings

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lfm2
from lfm2 import kernels, quant
from lfm2.config import ModelConfig
from lfm2.errors import CheckpointError, ConfigError
from lfm2.gguf import GGUFFile
from lfm2.models import build_model, cast_model
from lfm2.models.lfm2_moe import Router
from lfm2.quant import (
    QuantEmbedding,
    QuantLinear,
    TiedQuantHead,
    dequantize_weight,
    from_gguf_q4_0,
    from_gguf_q8_0,
    load_quantized_into,
    pack_int4,
    quantize_checkpoint,
    quantize_model,
    quantize_weight,
    read_quantization,
    save_quantized,
    unpack_int4,
)
from tests.conftest import random_model, tiny_config, write_checkpoint, write_gguf_tensor

FORMATS = [("int8", 32), ("int8", 64), ("int8", 128), ("int8", None), ("int4", 32), ("int4", 64), ("int4", 128)]


@pytest.fixture(autouse=True)
def one_thread():
    """These tests check numerics, not speed: one thread keeps them quick on a loaded machine,
    where every parallel region can wait milliseconds for a core. `test_threads_*` checks the split."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _ops():
    ops = kernels.ops()
    if ops is None:
        pytest.skip(f"the C++ kernels are not available here: {kernels.build_error() or 'disabled'}")
    return ops


@pytest.fixture(params=["kernels", "fallback"])
def path(request, monkeypatch) -> str:
    """Run a test once with the C++ kernels and once with the pure-PyTorch fallback."""
    if request.param == "kernels":
        _ops()
    else:
        monkeypatch.setenv(kernels.DISABLE_ENV, "1")
    return request.param


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _moe_config(**overrides) -> ModelConfig:
    return tiny_config(model_type="lfm2_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                       num_dense_layers=1, **overrides)


# -- the format ------------------------------------------------------------------------------------


def test_int4_packing_round_trip_and_nibble_order():
    q = torch.randint(-8, 8, (5, 96), dtype=torch.int8)
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (5, 48)
    assert torch.equal(unpack_int4(packed), q)
    # GGUF Q4_0 order: byte j of a block holds values j (low nibble) and j + 16 (high), plus 8.
    assert packed[2, 16 + 3].item() == (q[2, 32 + 3].item() + 8) | ((q[2, 32 + 19].item() + 8) << 4)


@pytest.mark.parametrize("kind,group", FORMATS)
def test_quantize_weight_error_within_half_a_step(kind, group):
    """Half a step, except int4's +7, which also takes values up to +8 steps (Q4_0's rule)."""
    torch.manual_seed(0)
    w = torch.randn(24, 128) * torch.rand(24, 1)  # rows of different magnitude
    w[5] *= 1e-4  # float16 scales of these rows are subnormal
    w[3] = 0.0  # an all-zero row must not divide by zero
    qweight, scales = quantize_weight(w, kind, group)
    assert scales.dtype == torch.float16 and scales.shape == (24, 1 if group is None else 128 // group)
    back = dequantize_weight(qweight, scales, quant.KINDS[kind])
    g = 128 if group is None else group
    step = scales.float().abs().repeat_interleave(g, dim=1)
    bound = step * 0.5
    if kind == "int4":
        values = unpack_int4(qweight)
        bound = torch.where(values == 7, step, bound)
        # The value of largest magnitude in each group is exactly -8 steps.
        assert (values.reshape(24, -1, g).min(-1).values == -8)[torch.arange(24) != 3].all()
    assert ((back - w).abs() <= bound * 1.001 + 1e-7).all()
    assert torch.equal(back[3], torch.zeros(128))


def _gguf_tensor(tmp_path, data: np.ndarray, qtype) -> tuple[GGUFFile, str]:
    """A GGUF file holding one quantized tensor, read back by lfm2's own reader."""
    raw = gguf.quants.quantize(data, qtype)
    return GGUFFile(write_gguf_tensor(tmp_path / f"{qtype.name}.gguf", raw, qtype)), "t"


@pytest.mark.parametrize("qtype,convert,bits", [
    (gguf.GGMLQuantizationType.Q8_0, from_gguf_q8_0, 8),
    (gguf.GGMLQuantizationType.Q4_0, from_gguf_q4_0, 4),
])
@pytest.mark.parametrize("shape", [(40, 96), (3, 16, 64)])  # a matrix, and stacked experts
def test_gguf_blocks_map_to_our_format_exactly(tmp_path, qtype, convert, bits, shape):
    data = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    f, name = _gguf_tensor(tmp_path, data, qtype)
    info = f.tensors[name]
    qweight, scales = convert(f.raw(name), info.shape)
    assert qweight.shape == (*shape[:-1], shape[-1] * bits // 8) and scales.shape == (*shape[:-1], shape[-1] // 32)
    expected = f.tensor(name)  # lfm2.gguf's dequantization of the same bytes
    ours = dequantize_weight(qweight.reshape(-1, qweight.shape[-1]), scales.reshape(-1, scales.shape[-1]), bits)
    assert torch.equal(ours.reshape(shape), expected)
    layer = QuantLinear.from_packed(qweight.reshape(-1, qweight.shape[-1]), scales.reshape(-1, scales.shape[-1]))
    assert layer.bits == bits and layer.group_size == 32 and layer.in_features == shape[-1]
    assert torch.equal(layer.dequantize().reshape(shape), expected)
    if len(shape) == 2:
        emb = QuantEmbedding.from_packed(qweight, scales)
        assert (emb.num_embeddings, emb.embedding_dim) == shape and torch.equal(emb(torch.tensor([3])), expected[3:4])
    # Our quantizer picks GGUF's scales, or the next float16 away from zero where GGUF's rounds
    # down; values are then within a step of GGUF's.
    ours_q, ours_s = quantize_weight(torch.from_numpy(data).reshape(-1, shape[-1]), "int8" if bits == 8 else "int4", 32)
    theirs = scales.reshape(ours_s.shape)
    bumped = torch.nextafter(theirs, torch.where(theirs < 0, -torch.inf, torch.inf).half())
    assert ((ours_s == theirs) | (ours_s == bumped)).all() and (ours_s == theirs).float().mean() > 0.3
    step = ours_s.float().abs().repeat_interleave(32, dim=1)
    assert ((dequantize_weight(ours_q, ours_s, bits) - ours.reshape(step.shape)).abs() <= step * 1.001).all()


def test_gguf_blocks_of_the_wrong_size():
    with pytest.raises(CheckpointError, match="needs 340 bytes"):
        from_gguf_q8_0(bytes(339), (10, 32))
    with pytest.raises(CheckpointError, match="multiple of 32"):
        from_gguf_q4_0(bytes(18), (1, 20))


def test_bad_formats_are_refused():
    with pytest.raises(ConfigError, match="unknown quantization kind 'int3'"):
        quantize_weight(torch.randn(4, 64), "int3", 32)
    with pytest.raises(ConfigError, match="input width 96 is not a multiple of the group size 64"):
        QuantLinear.from_linear(nn.Linear(96, 8), "int4", 64)
    with pytest.raises(ConfigError, match="group size 48 is not supported"):
        quantize_weight(torch.randn(4, 96), "int8", 48)
    with pytest.raises(ConfigError, match="int4 needs a group size"):
        quantize_weight(torch.randn(4, 64), "int4", None)
    model = random_model(tiny_config())
    with pytest.raises(ConfigError, match="unknown quantization kind"):
        quantize_model(model, "fp8")
    with pytest.raises(ConfigError, match="layer 'model.layers.0.feed_forward.w2': input width 96 is not a multiple "
                                          "of the group size 64"):
        quantize_model(model, "int8", 64)
    assert not any(isinstance(m, QuantLinear) for m in model.modules())  # nothing was replaced


# -- layers ----------------------------------------------------------------------------------------


# Shapes with K not a multiple of 64, a ragged per-channel tail, and rows of fewer and more than
# the kernel's chunks of 8 blocks (256 values), for every group size.
@pytest.mark.parametrize("kind,group,K", [
    ("int8", 32, 288), ("int8", 64, 320), ("int8", 128, 384), ("int8", None, 300), ("int8", None, 64),
    ("int4", 32, 160), ("int4", 32, 544), ("int4", 64, 320), ("int4", 128, 384),
])
@pytest.mark.parametrize("lead", [(1,), (2,), (5,), (64,), (2, 3)])
def test_linear_paths_agree(kind, group, K, lead):
    """C++ GEMV (float and int8 activations), C++ dequantize + GEMM, and the fallback, on odd shapes."""
    ops = _ops()
    torch.manual_seed(K)
    N = 37
    linear = nn.Linear(K, N, bias=True)
    layer = QuantLinear.from_linear(linear, kind, group)
    x = torch.randn(*lead, K)
    exact = F.linear(x, layer.dequantize(), layer.bias)  # float math on the quantized weight
    fallback = F.linear(x, dequantize_weight(layer.qweight, layer.scales, layer.bits), layer.bias)
    assert torch.equal(layer.dequantize(), dequantize_weight(layer.qweight, layer.scales, layer.bits))
    M = x.reshape(-1, K).shape[0]
    g = group or K
    gemv_f32 = ops.qgemv(x.reshape(-1, K), layer.qweight, layer.scales, layer.bits, g, False) + layer.bias
    gemv_a8 = ops.qgemv(x.reshape(-1, K), layer.qweight, layer.scales, layer.bits, g, True) + layer.bias
    torch.testing.assert_close(gemv_f32.reshape(exact.shape), exact, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fallback, exact, rtol=1e-5, atol=1e-5)
    # int8 activations: each block of 32 is rounded to 1/254 of its largest value.
    assert _rel(gemv_a8.reshape(exact.shape), exact) < 0.02
    y = layer(x)  # whatever path forward picks for this M
    assert y.shape == (*lead, N) and y.dtype == torch.float32
    # Many rows: the int8 GEMM (same numerics as the int8-activation GEMV) where the CPU has it, else float tiles.
    a8 = M <= quant.GEMV_MAX_ROWS or (kernels.has_int8_gemm() and K % 32 == 0)
    torch.testing.assert_close(y, gemv_a8.reshape(y.shape) if a8 else exact, rtol=1e-5, atol=1e-5)
    reference = linear(x)  # the float layer: the weight quantization error on top
    assert _rel(y, reference) < (0.02 if kind == "int8" else 0.15)


def _a8_reference(x: torch.Tensor, layer: QuantLinear) -> torch.Tensor:
    """x @ W^T with x rounded as the kernels round it (blocks of 32 to int8, nearest even), in float64."""
    blocks = x.reshape(x.shape[0], -1, 32)
    d = blocks.abs().amax(-1, keepdim=True) / 127
    q = torch.round(blocks * torch.where(d > 0, 1 / d, torch.zeros_like(d)))
    return (q * d).reshape(x.shape).double() @ layer.dequantize().double().t()


@pytest.mark.parametrize("kind,group", FORMATS)
@pytest.mark.parametrize("M", [1, 5, 17, 70])
def test_int8_gemm_matches_the_gemv_numerics(kind, group, M):
    """The prefill GEMM (AVX-512 VNNI, or its AVX2 code) rounds activations exactly as the decode GEMV does."""
    ops = _ops()
    if not kernels.has_int8_gemm():
        pytest.skip("the int8 GEMM needs the SIMD build (AVX2)")
    torch.manual_seed(M)
    K, N = 384, 37  # 37 rows: two whole tiles of 16 and a ragged one
    layer = QuantLinear.from_linear(nn.Linear(K, N), kind, group)
    x = torch.randn(M, K)
    x[:, 7] *= 30  # an outlier: its block gets a coarser scale
    g = group or K
    y = ops.qgemm(x, layer.qweight, layer.scales, layer.bits, g)
    torch.testing.assert_close(y.double(), _a8_reference(x, layer), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(y, ops.qgemv(x, layer.qweight, layer.scales, layer.bits, g, True),
                               rtol=1e-5, atol=1e-5)
    if M > quant.GEMV_MAX_ROWS:
        torch.testing.assert_close(layer(x), y + layer.bias)  # what forward picks for many rows
    with pytest.raises(RuntimeError, match="multiple of 32"):
        ops.qgemm(torch.randn(3, 40), torch.zeros(4, 40, dtype=torch.int8), torch.ones(4, 1, dtype=torch.half), 8, 40)


def _tiled(layer: QuantLinear) -> QuantLinear:
    """A copy of an int4 layer (groups of 32) in 16-row tiles; skips where the tiles' code does not run."""
    _ops()
    if not kernels.has_vnni():
        pytest.skip("16-row int4 tiles are made on CPUs with AVX-512 VNNI only")
    tiled = copy.deepcopy(layer)
    assert tiled.pack_tiles() and tiled.x16
    assert not torch.equal(tiled.qweight, layer.qweight)  # the bytes moved...
    assert torch.equal(tiled.qweight.flatten().sort().values, layer.qweight.flatten().sort().values)  # none changed
    return tiled


@pytest.mark.parametrize("M", [1, 3, 5, 16, 17, 70])
@torch.no_grad()
def test_int4_tiles_compute_what_the_rows_compute(M):
    """Q4_0 in the decode kernel's 16-row tiles: the same integer block sums as the file's layout, added in
    another order (GEMV); the prefill GEMM packs the same tiles from them, so its results are the same bits."""
    torch.manual_seed(M)
    layer = QuantLinear.from_linear(nn.Linear(320, 48), "int4", 32)  # 10 blocks: a tile's loop runs past 8
    tiled = _tiled(layer)
    x = torch.randn(M, 320)
    x[:, 7] *= 30
    rows, tiles = layer(x), tiled(x)
    if M >= quant.QGEMM_MIN_ROWS:
        assert torch.equal(tiles, rows)
    else:
        torch.testing.assert_close(tiles, rows, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(tiles.double(), _a8_reference(x, layer) + layer.bias.double(), rtol=1e-5, atol=1e-4)
    torch.set_num_threads(2)
    assert torch.equal(tiled(x), tiles)  # threads split whole tiles


@torch.no_grad()
def test_int4_tiles_save_load_and_move_in_the_file_layout():
    torch.manual_seed(0)
    layer = QuantLinear.from_linear(nn.Linear(256, 32, bias=False), "int4", 32)
    tiled = _tiled(layer)
    x = torch.randn(2, 256)
    saved = tiled.state_dict()
    assert torch.equal(saved["qweight"], layer.qweight) and torch.equal(saved["scales"], layer.scales)
    assert torch.equal(tiled.dequantize(), layer.dequantize())
    other = QuantLinear.from_linear(nn.Linear(256, 32, bias=False), "int4", 32)
    assert other.pack_tiles()
    other.load_state_dict(saved)  # the file's layout in, tiles again
    assert other.x16 and torch.equal(other(x), tiled(x))
    assert torch.equal(other.state_dict()["qweight"], layer.qweight)
    y = tiled(x)
    tiled.int8_activations = False  # float activations: the file's layout, which that kernel reads
    assert not tiled.x16 and torch.equal(tiled.qweight, layer.qweight)
    torch.testing.assert_close(tiled(x), y, rtol=0.02, atol=0.02)
    moved = copy.deepcopy(other).to("meta")  # another device: the file's layout
    assert not moved.x16 and moved.qweight.is_meta


def test_only_int4_with_groups_of_32_goes_into_tiles():
    ops = _ops()
    for kind, group, n in (("int8", 32, 32), ("int4", 64, 32), ("int4", 32, 40)):
        layer = QuantLinear.from_linear(nn.Linear(256, n), kind, group)
        assert not layer.pack_tiles() and not layer.x16
    emb = QuantEmbedding.from_embedding(nn.Embedding(64, 256), "int4", 32)
    assert not emb.pack_tiles()  # looked up by rows
    if kernels.has_vnni():
        q, s = quantize_weight(torch.randn(40, 256), "int4", 32)
        with pytest.raises(RuntimeError, match="rows in multiples of 16"):
            ops.qgemv(torch.randn(1, 256), q, s, 4, 32, True, True)


@pytest.mark.parametrize("act", [True, False])
def test_threads_split_rows_identically(act):
    """Rows are split between threads, each output computed whole by one thread: same bits."""
    ops = _ops()
    q, s = quantize_weight(torch.randn(2048, 512), "int4", 64)
    x = torch.randn(3, 512)
    one = ops.qgemv(x, q, s, 4, 64, act)
    torch.set_num_threads(2)
    assert torch.equal(ops.qgemv(x, q, s, 4, 64, act), one)


def test_prefill_tiles_cover_every_row(monkeypatch):
    _ops()
    layer = QuantLinear.from_linear(nn.Linear(64, 301, bias=False), "int4", 32)
    layer.int8_activations = False  # the tiled float path (the int8 GEMM would take these rows on a VNNI CPU)
    x = torch.randn(20, 64)
    whole = F.linear(x, layer.dequantize())
    monkeypatch.setattr(quant, "TILE_BYTES", 64 * 4 * 50)  # tiles of 50 rows: 7 tiles, the last one short
    torch.testing.assert_close(layer(x), whole, rtol=1e-5, atol=1e-5)


def test_layer_forward_matches_between_paths(path):
    torch.manual_seed(0)
    layer = QuantLinear.from_linear(nn.Linear(96, 33), "int8", 32)
    layer.int8_activations = False
    for M in (1, 3, 40):
        x = torch.randn(M, 96)
        expected = F.linear(x, dequantize_weight(layer.qweight, layer.scales, 8), layer.bias)
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_failed_build_warns_once_and_falls_back(monkeypatch):
    def broken():
        raise OSError("no compiler here")

    monkeypatch.delenv(kernels.DISABLE_ENV, raising=False)
    monkeypatch.setattr(kernels, "_state", {})
    monkeypatch.setattr(kernels, "_build", broken)
    with pytest.warns(RuntimeWarning, match="could not build the matmul kernels .OSError: no compiler"):
        assert kernels.ops() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning
        layer = QuantLinear.from_linear(nn.Linear(64, 8, bias=False), "int8", 32)
        x = torch.randn(1, 64)
        assert torch.equal(layer(x), F.linear(x, dequantize_weight(layer.qweight, layer.scales, 8)))
    assert "no compiler here" in kernels.build_error()


def test_an_unknown_kernel_isa_setting_is_named(monkeypatch):
    """`LFM2_KERNEL_ISA` knows two values, "avx2" and "avx2-128" (the kernels' AVX2 code on an AVX-512 CPU);
    any other is named in a warning when the kernels load, not ignored silently."""
    monkeypatch.delenv(kernels.DISABLE_ENV, raising=False)
    monkeypatch.setattr(kernels, "_state", {})
    built = types.SimpleNamespace(vnni=lambda: False, simd=lambda: True)  # what a load asks of the kernels
    monkeypatch.setattr(kernels, "_build", lambda: built)
    monkeypatch.setenv(kernels.ISA_ENV, "avx512")
    with pytest.warns(RuntimeWarning, match="LFM2_KERNEL_ISA='avx512' is not a setting the kernels know"):
        assert kernels.ops() is built
    for known in ("avx2", "avx2-128"):
        monkeypatch.setattr(kernels, "_state", {})
        monkeypatch.setenv(kernels.ISA_ENV, known)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert kernels.ops() is built


def test_embedding_and_tied_head(path):
    emb = nn.Embedding(100, 64)
    q = QuantEmbedding.from_embedding(emb, "int4", 32)
    ids = torch.tensor([[3, 99, 0], [7, 7, 42]])
    rows = q(ids)
    full = q.dequantize()
    assert rows.shape == (2, 3, 64) and torch.equal(rows, full[ids])
    assert q.dtype == torch.float32 and not hasattr(q, "weight")  # nothing passes for a float matrix
    head = TiedQuantHead(q)
    x = torch.randn(2, 64)
    assert head.state_dict() == {} and list(head.parameters()) == []
    assert _rel(head(x), F.linear(x, full)) < 0.02


def test_to_dtype_keeps_quantized_storage():
    layer = QuantLinear.from_linear(nn.Linear(64, 16), "int4", 32)
    scales = layer.scales.clone()
    layer.to(torch.bfloat16)
    assert layer.scales.dtype == torch.float16 and torch.equal(layer.scales, scales)
    assert layer.qweight.dtype == torch.uint8 and layer.dtype == torch.bfloat16
    y = layer(torch.randn(2, 64, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16


# -- whole models ----------------------------------------------------------------------------------


def test_quantize_model_replaces_the_right_layers():
    model = quantize_model(random_model(_moe_config()), "int4", 32)
    names = {n for n, m in model.named_modules() if type(m) is QuantLinear}
    assert "model.layers.1.feed_forward.experts.3.w2" in names
    assert "model.layers.0.conv.in_proj" in names and "model.layers.1.self_attn.k_proj" in names
    routers = [m for m in model.modules() if isinstance(m, Router)]
    assert routers and all(type(r) is Router and r.weight.dtype == torch.float32 for r in routers)
    assert not any(type(m) is nn.Linear for m in model.modules())
    assert isinstance(model.model.embed_tokens, QuantEmbedding) and model.model.embed_tokens.kind == "int8"
    assert isinstance(model.lm_head, TiedQuantHead) and model.lm_head.embedding is model.model.embed_tokens
    assert model.model.layers[0].conv.conv.weight.dtype == torch.float32
    assert model.quantization == {"type": "int4", "group_size": 32, "embedding": {"type": "int8", "group_size": 32}}


@pytest.mark.parametrize("kind,bound", [("int8", 0.03), ("int4", 0.25)])
def test_quantized_model_close_to_float(path, kind, bound):
    """Untied random models (whose predictions depend on the context), dense and MoE, batch of 2."""
    for config in (tiny_config(tie_word_embeddings=False), _moe_config(tie_word_embeddings=False)):
        model = random_model(config, seed=1)
        ids = torch.randint(0, config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            ref = model(ids)
            quantize_model(model, kind, 32)
            out = model(ids)
        assert ref.argmax(-1).unique().numel() > 10  # the reference is not degenerate
        assert _rel(out, ref) < bound
        agree = (out.argmax(-1) == ref.argmax(-1)).float().mean().item()
        # Random weights have small top-1 margins (docs/testing.md): measured
        # 0.90 (int8) and 0.6-0.7 (int4) on these fixtures.
        assert agree >= (0.85 if kind == "int8" else 0.5), agree


# int4 (group 32) moves this model's logits by up to 4.5-10: flipped top-1 choices measured at float margins
# of up to 2.7, 3.5 and 4.6 on three successive bundled models (three sets of conversations each).
@pytest.mark.parametrize("kind,agree,clear", [("int8", 0.95, 0.5), ("int4", 0.85, 6.0)])
def test_bundled_model_top1_agreement(kind, agree, clear):
    """On trained weights (the bundled model), teacher-forced top-1 agreement with float, decoding token
    by token and in one pass, over conversations and prose (660 tokens). Where float32's top choice
    leads by little, quantization noise may flip it (the old 67-token prose check failed at margins of
    0.01-0.12 logits on a retrained model); where it leads by `clear` logits or more, it must not."""
    from lfm2.tools import render_chat
    from lfm2.train.synth import conversations

    _ops()
    llm = lfm2.load()
    convs = conversations(6, seed=5, split="heldout", tool_fraction=0.5)
    text = "".join(render_chat(llm.tokenizer, c["messages"], c.get("tools")) for c in convs)
    text += ("The quick brown fox jumps over the lazy dog. A hacker is a person who enjoys exploring the details "
             "of programmable systems and how to stretch their capabilities.")
    ids = torch.tensor([llm.tokenizer.encode(text)])
    model = copy.deepcopy(llm.model)
    quantize_model(model, kind, 32)
    with torch.no_grad():
        ref = llm.model(ids)
        cache = model.make_cache(1, ids.shape[1])
        decoded = torch.cat([model(ids[:, i : i + 1], cache) for i in range(ids.shape[1])], dim=1)  # GEMV path
        prefill = model(ids)  # the many-row path: int8 GEMM or dequantize + GEMM
    top2 = ref[0].topk(2, dim=-1).values
    margin = top2[:, 0] - top2[:, 1]
    for out in (decoded, prefill):
        same = out[0].argmax(-1) == ref[0].argmax(-1)
        assert same.float().mean().item() >= agree
        assert same[margin >= clear].all(), margin[~same].tolist()
    # Decoding rounds activations to int8 (the GEMV); so does prefill with the int8 GEMM (AVX-512 VNNI),
    # but without it prefill multiplies dequantized weights in float, and the activations' rounding then
    # separates the two paths: int8 measured 0.023 apart on an AVX2-only CPU (weights' rounding alone 0.013).
    bound = 0.05 if kind == "int4" else 0.02 if kernels.has_int8_gemm() else 0.04
    assert _rel(decoded, prefill) < bound


def test_kernel_and_fallback_models_agree(monkeypatch):
    """The same quantized model through the C++ kernels and through pure PyTorch."""
    _ops()
    config = tiny_config(tie_word_embeddings=False, intermediate_size=128)
    model = quantize_model(random_model(config, seed=2), "int4", 64)
    ids = torch.randint(0, 512, (1, 28), generator=torch.Generator().manual_seed(1))
    P = quant.GEMV_MAX_ROWS + 4  # a prefill long enough for the dequantize + GEMM path

    def run() -> torch.Tensor:
        cache = model.make_cache(1, 28)
        return torch.cat([model(ids[:, :P], cache), *(model(ids[:, i : i + 1], cache) for i in range(P, 28))], 1)

    a8_prefill = kernels.has_int8_gemm()  # the int8 GEMM (AVX-512 VNNI) rounds activations as decode does
    with torch.no_grad():
        fast = run()
        monkeypatch.setenv(kernels.DISABLE_ENV, "1")
        slow = run()
    if a8_prefill:
        assert _rel(fast[:, :P], slow[:, :P]) < 0.02
    else:
        torch.testing.assert_close(fast[:, :P], slow[:, :P], rtol=1e-4, atol=1e-4)  # prefill: the same float math
    assert _rel(fast[:, P:], slow[:, P:]) < 0.02  # decode: int8 activations in the kernel
    assert (fast.argmax(-1) == slow.argmax(-1)).float().mean().item() >= 0.9


# -- checkpoints -----------------------------------------------------------------------------------


def _load_quantized(ckpt) -> nn.Module:
    config = ModelConfig.from_json(ckpt / "config.json")
    model = build_model(config, device="meta")
    cast_model(model, torch.float32)
    return load_quantized_into(model, ckpt).eval()


@pytest.mark.parametrize("config", [tiny_config(), _moe_config(tie_word_embeddings=False)], ids=["tied", "moe"])
def test_save_load_round_trip_identical(tmp_path, config):
    model = quantize_model(random_model(config), "int4", 32)
    out = save_quantized(model, tmp_path / "q")
    raw = json.loads((out / "config.json").read_text())
    assert raw["quantization"] == read_quantization(out) == model.quantization
    assert ModelConfig.from_dict(raw) == config  # the entry does not disturb the config
    loaded = _load_quantized(out)
    ids = torch.randint(0, config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))
        assert torch.equal(loaded(ids[:, :1]), model(ids[:, :1]))  # GEMV path too
    state = loaded.state_dict()
    assert "lm_head.weight" not in state and "model.embed_tokens.weight" not in state
    assert state["model.embed_tokens.qweight"].dtype == torch.int8
    assert all(t.dtype != torch.float32 for n, t in state.items() if n.endswith(("w1.qweight", "scales")))
    routers = [m for m in loaded.modules() if isinstance(m, Router)]
    assert all(r.weight.dtype == torch.float32 for r in routers) and len(routers) == config.is_moe * 3
    if config.tie_word_embeddings:
        assert loaded.lm_head.embedding is loaded.model.embed_tokens


def test_quantize_checkpoint(tmp_path):
    src = write_checkpoint(tmp_path / "src", tiny_config(), seed=4)
    (src / "tokenizer_config.json").write_text("{}\n")
    out = quantize_checkpoint(src, tmp_path / "q8", "int8", None)
    assert (out / "tokenizer_config.json").read_text() == "{}\n"
    assert read_quantization(out) == {"type": "int8", "group_size": None,
                                      "embedding": {"type": "int8", "group_size": None}}
    loaded = _load_quantized(out)
    expected = quantize_model(random_model(tiny_config(), seed=4), "int8", None)
    ids = torch.randint(0, 512, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(ids), expected(ids))
    assert read_quantization(src) is None
    with pytest.raises(CheckpointError, match="already quantized"):
        quantize_checkpoint(out, tmp_path / "again", "int4")


def test_load_refuses_a_damaged_quantized_checkpoint(tmp_path):
    from safetensors.torch import load_file, save_file

    out = save_quantized(quantize_model(random_model(tiny_config()), "int8", 32), tmp_path / "q")
    good = load_file(out / "model.safetensors")
    name = "model.layers.0.conv.in_proj"

    def damaged(**changes) -> nn.Module:
        state = {k: v for k, v in {**good, **changes}.items() if v is not None}
        save_file(state, out / "model.safetensors")
        return _load_quantized(out)

    with pytest.raises(CheckpointError, match=r"in_proj.scales. has shape \[192, 3\], expected \[192, 2\]"):
        damaged(**{f"{name}.scales": torch.ones(192, 3, dtype=torch.float16)})
    with pytest.raises(CheckpointError, match=r"in_proj.qweight. is U8, expected torch.int8"):
        damaged(**{f"{name}.qweight": good[f"{name}.qweight"].view(torch.uint8)})
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\) model.layers.0.conv.in_proj.scales"):
        damaged(**{f"{name}.scales": None})
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "quantization": {"type": "int4", "group_size": 96}}))
    with pytest.raises(ConfigError, match="'quantization': group size 96 is not supported"):
        _load_quantized(out)
