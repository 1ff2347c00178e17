"""The K-quant kernels (`lfm2/kernels/kquant.cpp`) and layers (`lfm2.kquant`) on random blocks.

Dequantization must equal gguf-py's (`gguf.quants.dequantize`, the reference reader of the format)
exactly; the SIMD products (AVX2, AVX-512) must equal the scalar one (same integer sums) to float
rounding, and the
float product within the rounding of int8 activations. GGUF files with K-quant layers are tested
in tests/test_gguf.py.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from lfm2 import kernels
from lfm2.errors import CheckpointError
from lfm2.kquant import Q4_K_X16, KQuantEmbedding, KQuantLinear, tiles_faster

T = gguf.GGMLQuantizationType
TYPES = [T.Q4_K, T.Q5_K, T.Q6_K]

pytestmark = pytest.mark.skipif(kernels.ops() is None, reason="the C++ kernels did not build")


def random_blocks(rows: int, cols: int, qtype: T, seed: int = 0) -> torch.Tensor:
    """Random `qtype` blocks (rows, bytes per row) with float16 super-block scales of varied size and sign
    (random bytes there could be NaN or huge)."""
    rng = np.random.default_rng(seed)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(rows * cols // block, size), dtype=np.uint8)
    for off in {T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,)}[qtype]:
        d = rng.uniform(0.5e-3, 4e-3, size=len(raw)) * rng.choice([-1, 1], size=len(raw))
        raw[:, off : off + 2] = d.astype(np.float16).view(np.uint8).reshape(-1, 2)
    return torch.from_numpy(raw.reshape(rows, cols // block * size))


def reference(blocks: torch.Tensor, qtype: T, cols: int) -> torch.Tensor:
    return torch.from_numpy(gguf.quants.dequantize(blocks.numpy(), qtype)).reshape(blocks.shape[0], cols)


@pytest.mark.parametrize("qtype", TYPES)
def test_dequantize_equals_gguf_py(qtype):
    blocks = random_blocks(37, 512, qtype)
    assert torch.equal(kernels.ops().kdequantize(blocks, int(qtype), 512), reference(blocks, qtype, 512))
    # bfloat16 (the AMX prefill's tiles): the float values rounded as torch rounds them
    assert torch.equal(kernels.ops().kdequantize(blocks, int(qtype), 512, True),
                       reference(blocks, qtype, 512).to(torch.bfloat16))


@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("rows", [1, 3, 7])
def test_gemv_equals_the_scalar_code_and_the_float_product(qtype, rows):
    ops = kernels.ops()
    blocks = random_blocks(301, 768, qtype, seed=1)  # a row count that no thread split divides evenly
    x = torch.randn(rows, 768, generator=torch.Generator().manual_seed(2))
    x[:, 5] = 9.0  # an outlier, as real activations have: it sets its super-block's int8 step
    y = ops.kgemv(x, blocks, int(qtype), 768)
    scalar = ops.kgemv_isa(x, blocks, int(qtype), 768, 0)
    for isa in range(1, ops.kgemv_best_isa() + 1):  # AVX2, AVX-512: the same integer sums as the scalar code
        assert torch.allclose(ops.kgemv_isa(x, blocks, int(qtype), 768, isa), scalar, rtol=1e-5,
                              atol=1e-5 * scalar.abs().max())
    assert torch.equal(y, ops.kgemv_isa(x, blocks, int(qtype), 768, ops.kgemv_best_isa()))
    exact = x @ reference(blocks, qtype, 768).T
    assert (y - exact).norm() <= 0.02 * exact.norm()
    # a row's result does not depend on the other rows of the call
    assert torch.equal(y[-1:], ops.kgemv(x[-1:].contiguous(), blocks, int(qtype), 768))


def test_gemv_of_zero_activations_is_zero():
    blocks = random_blocks(16, 256, T.Q4_K)
    assert torch.equal(kernels.ops().kgemv(torch.zeros(1, 256), blocks, int(T.Q4_K), 256), torch.zeros(1, 16))


def test_bad_input_is_refused_clearly():
    ops = kernels.ops()
    blocks = random_blocks(4, 256, T.Q4_K)
    with pytest.raises(RuntimeError, match="multiple of 256"):
        ops.kgemv(torch.zeros(1, 128), blocks[:, :72].contiguous(), int(T.Q4_K), 128)
    with pytest.raises(RuntimeError, match="take 288 bytes"):
        ops.kgemv(torch.zeros(1, 512), blocks, int(T.Q4_K), 512)
    with pytest.raises(RuntimeError, match="does not run here"):
        ops.kgemv_isa(torch.zeros(1, 256), blocks, int(T.Q4_K), 256, 3)
    with pytest.raises(RuntimeError, match="K-quant id"):
        ops.kdequantize(blocks, int(T.Q8_0), 256)
    with pytest.raises(CheckpointError, match="multiple of 256"):
        KQuantLinear(300, 4, int(T.Q4_K))
    with pytest.raises(CheckpointError, match=r"uint8 \(N, 144\)"):
        KQuantLinear.from_blocks(blocks[:, :100].contiguous(), int(T.Q4_K), 256)


def rounded_activations(x: torch.Tensor) -> torch.Tensor:
    """x (M, K) rounded to int8 per 256 values as the K-quant kernels round it (kernels/kquant.cpp):
    scale max|x| / 127, x times its float32 inverse rounded to nearest even."""
    blocks = x.reshape(x.shape[0], -1, 256)
    d = blocks.abs().amax(-1, keepdim=True) / 127.0
    inverse = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
    return ((blocks * inverse).round() * d).reshape(x.shape)


@pytest.mark.skipif(kernels.ops() is None or not kernels.has_int8_gemm(), reason="kgemm needs the SIMD build")
@pytest.mark.parametrize("qtype", TYPES)
def test_gemm_is_rounded_activations_times_the_dequantized_weights(qtype):
    """`kgemm`'s integer block sums are exact: its result is the int8-rounded activations times the
    weights gguf-py dequantizes, to float rounding (near the float product, and `kgemv`'s result)."""
    ops = kernels.ops()
    blocks = random_blocks(301, 768, qtype, seed=1)  # a last tile of 13 rows
    x = torch.randn(37, 768, generator=torch.Generator().manual_seed(2))  # 9 passes of 4 rows, then 1
    x[:, 5] = 9.0
    w = reference(blocks, qtype, 768)
    y = ops.kgemm(x, blocks, int(qtype), 768)
    ref = rounded_activations(x) @ w.T
    assert (y - ref).norm() <= 1e-6 * ref.norm()
    exact = x @ w.T
    assert (y - exact).norm() <= 0.02 * exact.norm()
    assert torch.equal(y[-1:], ops.kgemm(x[-1:].contiguous(), blocks, int(qtype), 768))
    gemv = ops.kgemv(x[:7].contiguous(), blocks, int(qtype), 768)
    assert torch.allclose(y[:7], gemv, rtol=1e-5, atol=1e-5 * gemv.abs().max())


@pytest.mark.parametrize("qtype", TYPES)
def test_layer_paths_agree(qtype, monkeypatch):
    """The GEMV (few rows), the many-row paths (`kgemm` on VNNI CPUs without AMX; else tiles, bfloat16
    on AMX CPUs, else float32) and the pure-PyTorch fallback give the product with the dequantized weight."""
    import lfm2.kquant as kquant

    blocks = random_blocks(96, 512, qtype, seed=3)
    layer = KQuantLinear.from_blocks(blocks, int(qtype), 512)
    w = reference(blocks, qtype, 512)
    x = torch.randn(2, 9, 512, generator=torch.Generator().manual_seed(4))
    exact = x @ w.T
    many = layer(x)  # 18 rows: kgemm on VNNI CPUs without AMX, else the tiled path
    assert many.shape == (2, 9, 96) and many.dtype == torch.float32
    if kernels.has_int8_gemm() and not kernels.has_amx_bf16():
        assert torch.allclose(many.reshape(18, 96), rounded_activations(x.reshape(18, 512)) @ w.T, rtol=1e-5,
                              atol=1e-4)
    monkeypatch.setattr(kernels, "has_int8_gemm", lambda: False)
    many = layer(x)  # the tiled path
    assert (many - exact).norm() <= (5e-3 if kernels.has_amx_bf16() else 1e-6) * exact.norm()
    monkeypatch.setattr(kernels, "has_amx_bf16", lambda: False)
    assert torch.allclose(layer(x), exact, rtol=1e-5, atol=1e-4)
    monkeypatch.setattr(kquant, "TILE_BYTES", 4 * 512 * 10)  # several tiles, the last one short
    assert torch.allclose(layer(x), exact, rtol=1e-5, atol=1e-4)
    few = layer(x[0, :2])  # the GEMV
    assert (few - exact[0, :2]).norm() <= 0.02 * exact[0, :2].norm()
    assert layer(x.to(torch.bfloat16)).dtype == torch.bfloat16
    monkeypatch.setenv("LFM2_NO_KERNELS", "1")
    assert torch.allclose(layer(x[0, :2]), exact[0, :2], rtol=1e-5, atol=1e-4)
    assert torch.equal(layer.dequantize(), w)


needs_tiles = pytest.mark.skipif(kernels.ops() is None or not kernels.has_int8_gemm(),
                                 reason="Q4_K tiles and kgemm need the SIMD kernels (AVX2)")


@needs_tiles
def test_q4_k_tiles_compute_what_the_file_layout_computes():
    """Q4_K rearranged into 16-row tiles (the decode kernel's layout) holds the same bytes, dequantizes to
    the same values, and its products are the file layout's: the same integer sums (kgemv, to float
    rounding) or the same packed tile (kgemm, exactly). The tiles' AVX2 code (any CPU with the SIMD
    kernels: `kgemv_isa` 1) gives the VNNI code's bits where that runs."""
    ops = kernels.ops()
    blocks = random_blocks(96, 768, T.Q4_K, seed=6)
    tiles = blocks.clone()
    ops.kpack_(tiles, int(T.Q4_K), 768)
    assert not torch.equal(tiles, blocks)
    assert torch.equal(ops.kunpack(tiles, Q4_K_X16, 768), blocks)
    assert torch.equal(ops.kdequantize(tiles, Q4_K_X16, 768), reference(blocks, T.Q4_K, 768))
    assert torch.equal(ops.kdequantize(tiles, Q4_K_X16, 768, True), reference(blocks, T.Q4_K, 768).to(torch.bfloat16))
    x = torch.randn(37, 768, generator=torch.Generator().manual_seed(7))
    x[:, 5] = 9.0
    for rows in (1, 2, 3, 7, 16):  # 4, 2 and 1 rows at a time
        xs = x[:rows].contiguous()
        y, ref = ops.kgemv(xs, tiles, Q4_K_X16, 768), ops.kgemv(xs, blocks, int(T.Q4_K), 768)
        assert torch.allclose(y, ref, rtol=1e-5, atol=1e-5 * ref.abs().max())
        assert torch.equal(y[-1:], ops.kgemv(xs[-1:].contiguous(), tiles, Q4_K_X16, 768))
        assert torch.equal(ops.kgemv_isa(xs, tiles, Q4_K_X16, 768, 1), y if not kernels.has_vnni() else
                           ops.kgemv_isa(xs, tiles, Q4_K_X16, 768, 2))
    assert torch.equal(ops.kgemm(x, tiles, Q4_K_X16, 768), ops.kgemm(x, blocks, int(T.Q4_K), 768))
    with pytest.raises(RuntimeError, match="multiples of 16"):
        ops.kgemv(x[:1].contiguous(), tiles[:40].contiguous(), Q4_K_X16, 768)
    with pytest.raises(RuntimeError, match="file's Q4_K layout"):
        ops.kpack_(tiles, Q4_K_X16, 768)
    with pytest.raises(RuntimeError, match="16-row tiles"):
        ops.kunpack(blocks, int(T.Q4_K), 768)
    with pytest.raises(RuntimeError, match="12 \\(Q4_K\\) or 112"):
        ops.kpack_(random_blocks(16, 256, T.Q6_K), int(T.Q6_K), 256)


@pytest.mark.skipif(kernels.ops() is None or not tiles_faster(),
                    reason="Q4_K stays in the file's layout on this CPU")
def test_layer_tiles_its_q4_k_blocks_in_place(monkeypatch):
    """`pack_tiles` rearranges a Q4_K layer's blocks in their own storage (stacked experts stay one view);
    every path of the layer computes what it did before; other types, row counts and embeddings stay."""
    import lfm2.kquant as kquant

    blocks = random_blocks(96, 512, T.Q4_K, seed=8)
    layer = KQuantLinear.from_blocks(blocks.clone(), int(T.Q4_K), 512)
    x = torch.randn(18, 512, generator=torch.Generator().manual_seed(9))
    few, many = layer(x[:3]), layer(x)
    storage = layer.blocks.data_ptr()
    assert layer.pack_tiles() and layer.kernel_type == Q4_K_X16 and layer.blocks.data_ptr() == storage
    assert not layer.pack_tiles()  # once
    assert torch.allclose(layer(x[:3]), few, rtol=1e-5, atol=1e-5 * few.abs().max())
    assert torch.equal(layer(x), many)
    assert torch.equal(layer.dequantize(), reference(blocks, T.Q4_K, 512))
    exact = x @ reference(blocks, T.Q4_K, 512).T
    monkeypatch.setattr(kernels, "has_int8_gemm", lambda: False)
    monkeypatch.setattr(kernels, "has_amx_bf16", lambda: False)
    monkeypatch.setattr(kquant, "TILE_BYTES", 4 * 512 * 10)  # 10 rows a tile: rounded up to whole 16-row tiles
    assert torch.allclose(layer(x), exact, rtol=1e-5, atol=1e-4)
    monkeypatch.undo()
    assert layer.format_repr() == "q4_k"
    layer.to("meta")  # off the CPU: back to the file's layout first
    assert layer.kernel_type == T.Q4_K and layer.blocks.is_meta
    assert not KQuantLinear.from_blocks(random_blocks(40, 256, T.Q4_K), int(T.Q4_K), 256).pack_tiles()
    assert not KQuantLinear.from_blocks(random_blocks(32, 256, T.Q6_K), int(T.Q6_K), 256).pack_tiles()
    assert not KQuantEmbedding.from_blocks(random_blocks(32, 256, T.Q4_K), int(T.Q4_K), 256).pack_tiles()


def test_embedding_rows_and_tied_head():
    from lfm2.quant import TiedQuantHead

    blocks = random_blocks(50, 256, T.Q6_K, seed=5)
    emb = KQuantEmbedding.from_blocks(blocks, int(T.Q6_K), 256)
    w = reference(blocks, T.Q6_K, 256)
    ids = torch.tensor([[3, 0, 49], [7, 7, 1]])
    assert torch.equal(emb(ids), w[ids])
    head = TiedQuantHead(emb)
    x = torch.randn(1, 256)
    assert (head(x) - x @ w.T).norm() <= 0.02 * (x @ w.T).norm()
    assert emb.to(torch.bfloat16)(ids).dtype == torch.bfloat16 and emb.blocks.dtype == torch.uint8


@pytest.mark.skipif(kernels.ops() is None or not kernels.has_int8_gemm(), reason="no SIMD kernels here")
@pytest.mark.parametrize("isa", ["avx2", "avx2-128"])
def test_the_avx2_gemms_whatever_the_cpu(isa):
    """On a VNNI CPU the tests above exercise the VNNI GEMMs, and on an AVX2 CPU one of the AVX2 GEMMs' two
    shapes (`lfm2_simd::avx2_halved`: fewer rows a pass where 256-bit operations run as two halves, as on
    Zen 1, and Q8_0 widened to int16). `LFM2_KERNEL_ISA` runs them again on each AVX2 shape, in a process of
    its own since the kernels read the variable once."""
    import os
    import subprocess
    import sys

    tests = ["tests/test_kquant.py::test_gemm_is_rounded_activations_times_the_dequantized_weights",
             "tests/test_kquant.py::test_layer_paths_agree",
             "tests/test_kquant.py::test_q4_k_tiles_compute_what_the_file_layout_computes",
             "tests/test_kquant.py::test_layer_tiles_its_q4_k_blocks_in_place",
             "tests/test_quant.py::test_int8_gemm_matches_the_gemv_numerics"]
    probe = "from lfm2 import kernels; print(kernels.has_vnni(), kernels.has_int8_gemm())"
    env = {**os.environ, "LFM2_KERNEL_ISA": isa}
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "True"]
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests], env=env,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:]
    assert "skipped" not in run.stdout.splitlines()[-1]


@pytest.mark.skipif(kernels.ops() is None or not kernels.has_int8_gemm(), reason="no SIMD kernels here")
def test_the_two_avx2_shapes_give_the_same_bits(tmp_path):
    """Where 256-bit operations are split (`avx2-128`), Q8_0's prefill GEMM multiplies int16 values instead of
    signed bytes, and the K-quant GEMMs sum longer in int16: exact integer block sums either way, then the same
    float steps, so the outputs are the same bits (a ragged tile and a row count that 2 and 3 do not divide)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = """
import sys, torch
from lfm2 import kernels
import gguf
sys.path.insert(0, sys.argv[2])
from test_kquant import random_blocks
T = gguf.GGMLQuantizationType
ops = kernels.ops()
g = torch.Generator().manual_seed(0)
out = []
for bits in (8, 4):
    x = torch.randn(37, 320, generator=g)
    q = torch.randint(-127, 128, (50, 320), dtype=torch.int8, generator=g)
    if bits == 4:
        q = torch.randint(0, 256, (50, 160), dtype=torch.uint8, generator=g)
    s = (torch.rand(50, 10, generator=g) * 0.01).half()
    out.append(ops.qgemm(x, q, s, bits, 32))
for t in (T.Q4_K, T.Q6_K):
    x = torch.randn(37, 512, generator=g)
    out.append(ops.kgemm(x, random_blocks(50, 512, t, seed=3), int(t), 512))
torch.save(out, sys.argv[1])
"""
    results = []
    for isa in ("avx2", "avx2-128"):
        path = tmp_path / f"{isa}.pt"
        subprocess.run([sys.executable, "-c", script, str(path), str(Path(__file__).parent)],
                       env={**os.environ, "LFM2_KERNEL_ISA": isa}, check=True, capture_output=True)
        results.append(torch.load(path))
    assert len(results[0]) == 4
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)
