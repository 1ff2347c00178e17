"""Weight-only quantization: int8 and int4 linear layers, a quantized tied embedding, and checkpoints.

The format (one layout for both widths, shared with the C++ kernels in `lfm2/kernels/qgemv.cpp`):
- a weight (N out, K in) is cut along K into groups of `group_size` values (32, 64 or 128; for
  int8 also None: one group per output channel, any K); each group has one scale `d`;
- int8: `qweight` int8 (N, K), values -127..127 (-128 read from GGUF works too), w = q * d;
- int4: `qweight` uint8 (N, K/2), values -8..7 stored as q + 8, two per byte: in each block of
  32 values of a row (16 bytes), byte j holds value j in its low nibble and value j + 16 in its
  high nibble, w = (nibble - 8) * d;
- `scales` float16 (N, K / group_size).
On CPUs with AVX-512 VNNI a loaded int4 layer with groups of 32 (GGUF Q4_0) is rearranged in place
into tiles of 16 rows for the decode GEMV (`QuantLinear.pack_tiles`, the same bytes moved,
`lfm2/kernels/q4_tiles.h`): over LFM2-8B-A1B's decode matrices 1.85x the per-row code's speed on weights
in cache and 1.27x from memory (`benchmarks/kernels.py --q4-tiles`, docs/benchmarks.md). `state_dict()`,
`dequantize()` and a move to another device see the layout above.

This is GGUF's Q8_0 and Q4_0 at group size 32, byte for byte, so `from_gguf_q8_0` and
`from_gguf_q4_0` build layers from a file's blocks by splitting off the scales, without
going through float32. Scales are float16 for the same reason, and because at group size 32
a float32 scale would cost another 0.5 bit per weight (1/8 more bytes to stream per token for
int4); float16's 11-bit precision is far below the quantization error itself.

Rounding: int8 uses d = max|w| / 127; int4 uses GGUF Q4_0's rule, d = -(the value of largest
magnitude) / 8, so that value maps to -8 exactly and the step is max|w| / 8 rather than / 7.
Values are rounded with the float16 scale actually stored, which is rounded away from zero so that
no value clips.

Compute paths of `QuantLinear` (measured with `benchmarks/kernels.py` on the project's 2-core
AMD EPYC, 1 thread, LFM2-350M decode-step shapes):
- up to `GEMV_MAX_ROWS` rows of input (decode, small batches): the C++ GEMV, which streams the
  quantized weights once per call. Its default numerics quantize each block of 32 activations
  to int8 (A8W8 / A8W4, as llama.cpp does for Q8_0 / Q4_0) and use exact integer block dot
  products: 1.5x (int8) to 2.5x (int4) faster than widening the weights to float32 against
  float activations, for a relative logit error on the bundled model of 0.75% instead of
  0.4% (int8); for int4 the weight error (~5%) dominates either way. `int8_activations = False`
  on a layer selects the float-activation kernel (weight-only numerics);
- more rows (prefill): the C++ int8 GEMM, with the GEMV's int8-activation numerics (so prefill and
  decode agree); with AVX-512 VNNI `vpdpbusd` integer dot products, 2.5-3x faster than float32
  `F.linear` at 512 rows (`benchmarks/kernels.py`); on AVX2-only CPUs `vpmaddubsw` + `vpmaddwd`
  (`lfm2_simd::avx2_block`), 1.3x (int8) to 1.9x (int4) faster than the float32 tiles below
  (docs/benchmarks.md);
- more rows otherwise (float activations): the weight is dequantized to float32 in
  tiles of `TILE_BYTES` and multiplied with torch's float GEMM, as fast as float32 `F.linear`;
- without the kernels (no compiler, `LFM2_NO_KERNELS=1`, or a non-CPU device): pure PyTorch,
  the same tiles dequantized by torch ops, with weight-only numerics. Correct, but slower than
  float32 at decode (every weight is widened to float per call): quantization then only saves
  memory.

The MoE router (`feed_forward.gate`) stays float32: routing decisions are discrete, and the
router is tiny. Norms, convolution kernels and biases stay float.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lfm2 import kernels
from lfm2.errors import CheckpointError, ConfigError
from lfm2.kquant import KQuantEmbedding, KQuantLinear
from lfm2.models.lfm2 import drop_decode_step, is_plain_linear

KINDS = {"int8": 8, "int4": 4}
GROUP_SIZES = (32, 64, 128)
# Input rows up to which the GEMV kernel is used rather than dequantize + float GEMM. Measured
# (benchmarks/kernels.py --rows, 4608x1024 and 1024x4608, int8 and int4): GEMV is 4-6x faster at
# 1 row, 1.5x at 16, still 1.1-1.2x at 32, even at 64. 16 leaves margin for CPUs whose float
# GEMM is faster relative to this AVX2 GEMV (AVX-512).
GEMV_MAX_ROWS = 16
# On CPUs with AVX-512 VNNI, input rows from which the int8 GEMM takes over from the GEMV.
# Kernels alone (benchmarks/kernels.py --rows, 2 threads, 4608x1024 and 1024x4608): at 2 rows the
# GEMV is 1.4-1.8x faster, at 4 the GEMM 1.1-1.3x (int4 and int8), at 8 1.4-1.7x, at 16 1.5-2.5x.
# Whole decode steps of a batch (the engine on LFM2-350M Q4_0 / Q8_0 files, aggregate tokens/s,
# 2026-12-03): even at 4 rows, ahead from 6, 1.4x at 8 and 1.2-1.9x at 16 rows (the server's batches).
QGEMM_MIN_ROWS = 6
# Rows of an int4 tile (`QuantLinear.pack_tiles`, lfm2/kernels/q4_tiles.h).
TILE_ROWS = 16
# Bytes of float32 weight dequantized at once on the many-row path: big enough for an efficient
# GEMM call, small enough to stay in cache instead of round-tripping through memory. Measured at
# 512 rows: 4 MiB tiles match or beat float32 F.linear; 16 and 64 MiB tiles are 5-15% slower.
TILE_BYTES = 4 * 2**20
_GGUF_BLOCK = 32


# -- formats ---------------------------------------------------------------------------------------


def check_format(kind: str, group_size: int | None, in_features: int | None = None, what: str = "the weight") -> int:
    """The bit width of `kind`, after checking that `group_size` is valid for it (and splits `in_features`)."""
    if kind not in KINDS:
        raise ConfigError(f"unknown quantization kind {kind!r}; use one of {', '.join(map(repr, KINDS))}")
    bits = KINDS[kind]
    if group_size is None:
        if bits == 4:
            raise ConfigError(f"int4 needs a group size ({', '.join(map(str, GROUP_SIZES))}); per-channel "
                              "scales are for int8 only")
    elif group_size not in GROUP_SIZES:
        raise ConfigError(f"group size {group_size!r} is not supported; use one of "
                          f"{', '.join(map(str, GROUP_SIZES))} (or None for per-channel int8)")
    elif in_features is not None and in_features % group_size:
        raise ConfigError(f"{what}: input width {in_features} is not a multiple of the group size {group_size}; "
                          f"use a group size that divides it{' or per-channel int8' if bits == 8 else ''}")
    return bits


def _groups(in_features: int, group_size: int | None) -> int:
    return 1 if group_size is None else in_features // group_size


def quantize_weight(w: torch.Tensor, kind: str, group_size: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(qweight, scales) of a float weight (N, K) in the layout of this module's docstring."""
    bits = check_format(kind, group_size, w.shape[-1])
    N, K = w.shape
    g = K if group_size is None else group_size
    blocks = w.detach().float().reshape(N, K // g, g)  # (N, K) -> (N, groups, g)
    if bits == 8:
        d = blocks.abs().amax(-1) / 127
    else:
        # The value of largest magnitude, with its sign, maps to -8 (GGUF Q4_0's rule).
        idx = blocks.abs().argmax(-1, keepdim=True)
        d = -blocks.gather(-1, idx).squeeze(-1) / 8
    scales = d.to(torch.float16)
    # A scale rounded down in float16 would push the largest values past the range and clip
    # them (badly so for tiny, subnormal scales): take the next float16 away from zero instead.
    low = scales.float().abs() < d.abs()
    away = torch.where(d < 0, -torch.inf, torch.inf).to(torch.float16)
    scales = torch.where(low, torch.nextafter(scales, away), scales)
    d = scales.float()
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    lo, hi = (-127, 127) if bits == 8 else (-8, 7)
    q = torch.round(blocks * inv[..., None]).clamp_(lo, hi).to(torch.int8).reshape(N, K)
    return (q if bits == 8 else pack_int4(q)), scales.contiguous()


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 values -8..7 (N, K) -> uint8 (N, K/2), GGUF Q4_0 nibble order within each block of 32."""
    N, K = q.shape
    if K % _GGUF_BLOCK:
        raise ConfigError(f"int4 rows must be a multiple of {_GGUF_BLOCK} values, got {K}")
    u = (q.to(torch.int16) + 8).to(torch.uint8).reshape(N, K // _GGUF_BLOCK, 2, 16)
    return (u[:, :, 0] | (u[:, :, 1] << 4)).reshape(N, K // 2)  # (N, blocks, 16) bytes


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 (N, K/2) -> int8 values -8..7 (N, K); the inverse of `pack_int4`."""
    N, half = packed.shape
    b = packed.reshape(N, half // 16, 1, 16)
    u = torch.cat((b & 15, b >> 4), dim=2)  # (N, blocks, 2, 16): low nibbles are values 0..15
    return (u.to(torch.int8) - 8).reshape(N, 2 * half)


def dequantize_weight(qweight: torch.Tensor, scales: torch.Tensor, bits: int) -> torch.Tensor:
    """float32 (N, K) of a quantized weight, in pure PyTorch (the reference and fallback path)."""
    q = qweight if bits == 8 else unpack_int4(qweight)
    N, K = q.shape
    groups = scales.shape[-1]
    w = q.float().reshape(N, groups, K // groups) * scales.float()[..., None]
    return w.reshape(N, K)


def from_gguf_q8_0(raw: np.ndarray | bytes, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """(qweight int8 (..., K), scales float16 (..., K/32)) from GGUF Q8_0 blocks, without float32.

    A Q8_0 block is 34 bytes: the float16 scale, then 32 int8 values. `shape` is the tensor's
    shape in torch order (outermost first), e.g. `GGUFFile.tensors[name].shape`; `raw` its bytes
    (`GGUFFile.raw(name)`). Leading dimensions (stacked experts) are kept.
    """
    blocks = _gguf_blocks(raw, shape, 34, "Q8_0")
    scales = np.ascontiguousarray(blocks[:, :2]).view(np.float16).reshape(*shape[:-1], shape[-1] // 32)
    q = np.ascontiguousarray(blocks[:, 2:]).view(np.int8).reshape(shape)
    return torch.from_numpy(q), torch.from_numpy(scales)


def from_gguf_q4_0(raw: np.ndarray | bytes, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """(qweight uint8 (..., K/2), scales float16 (..., K/32)) from GGUF Q4_0 blocks, without float32.

    A Q4_0 block is 18 bytes: the float16 scale, then 16 bytes of nibbles already in our order.
    """
    blocks = _gguf_blocks(raw, shape, 18, "Q4_0")
    scales = np.ascontiguousarray(blocks[:, :2]).view(np.float16).reshape(*shape[:-1], shape[-1] // 32)
    q = np.ascontiguousarray(blocks[:, 2:]).reshape(*shape[:-1], shape[-1] // 2)
    return torch.from_numpy(q), torch.from_numpy(scales)


def _gguf_blocks(raw: np.ndarray | bytes, shape: tuple[int, ...], block_bytes: int, name: str) -> np.ndarray:
    data = np.frombuffer(raw, dtype=np.uint8) if isinstance(raw, bytes | bytearray | memoryview) else raw
    data = data.reshape(-1).view(np.uint8)
    if not shape or shape[-1] % _GGUF_BLOCK:
        raise CheckpointError(f"a {name} tensor's rows must be a multiple of {_GGUF_BLOCK} values, got shape {shape}")
    n_blocks = int(np.prod(shape, dtype=np.int64)) // _GGUF_BLOCK
    if data.size != n_blocks * block_bytes:
        raise CheckpointError(f"{name} tensor of shape {list(shape)} needs {n_blocks * block_bytes} bytes "
                              f"({n_blocks} blocks of {block_bytes}), got {data.size}")
    return data.reshape(n_blocks, block_bytes)


# -- modules ---------------------------------------------------------------------------------------


class QuantLinear(nn.Module):
    """A linear layer y = x W^T (+ b) whose weight is stored quantized (see the module docstring).

    `forward` accepts any leading shape and returns the input's dtype; the arithmetic is float32.
    `.to(dtype)` (as `cast_model` does) changes only that compute dtype: the quantized weights
    and their float16 scales keep their types, and only move between devices.
    """

    def __init__(self, in_features: int, out_features: int, kind: str, group_size: int | None,
                 bias: bool = False, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.bits = check_format(kind, group_size, in_features)
        kernels.ops()  # build the kernels now, at quantize or load time: never inside a (compiled) forward
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.dtype = torch.float32
        self.x16 = False  # int4 in 16-row tiles (pack_tiles), else the layout of the module docstring
        self._int8_activations = True
        row = in_features if self.bits == 8 else in_features // 2
        qdtype = torch.int8 if self.bits == 8 else torch.uint8
        self.register_buffer("qweight", torch.empty(out_features, row, dtype=qdtype, device=device))
        groups = _groups(in_features, group_size)
        self.register_buffer("scales", torch.empty(out_features, groups, dtype=torch.float16, device=device))
        self.register_buffer("bias", torch.empty(out_features, device=device) if bias else None)

    @property
    def kind(self) -> str:
        return "int8" if self.bits == 8 else "int4"

    @classmethod
    def from_linear(cls, linear: nn.Linear, kind: str, group_size: int | None) -> QuantLinear:
        """A quantized copy of a float `nn.Linear`."""
        m = cls(linear.in_features, linear.out_features, kind, group_size, linear.bias is not None,
                device=linear.weight.device)
        m.qweight, m.scales = quantize_weight(linear.weight, kind, group_size)
        if linear.bias is not None:
            m.bias = linear.bias.detach().float().clone()
        m.dtype = linear.weight.dtype
        return m

    @classmethod
    def from_packed(cls, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None) -> QuantLinear:
        """A layer around already-quantized tensors (e.g. from `from_gguf_q8_0`), kept as they are."""
        bits = 8 if qweight.dtype == torch.int8 else 4 if qweight.dtype == torch.uint8 else 0
        if not bits or qweight.dim() != 2 or scales.dim() != 2 or scales.dtype != torch.float16:
            raise CheckpointError(
                f"quantized weight must be int8 or uint8 (N, K or K/2) with float16 (N, groups) scales; got "
                f"{qweight.dtype} {list(qweight.shape)} and {scales.dtype} {list(scales.shape)}"
            )
        N, K = qweight.shape[0], qweight.shape[1] * (8 // bits)
        group_size = _group_size_of(K, scales.shape[1], bits, "quantized weight")
        m = cls(K, N, "int8" if bits == 8 else "int4", group_size, bias is not None, device="meta")
        if scales.shape[0] != N:
            raise CheckpointError(f"quantized weight has {N} rows but its scales {scales.shape[0]}")
        m.qweight, m.scales = qweight.contiguous(), scales.contiguous()
        if bias is not None:
            m.bias = bias.float()
        return m

    @property
    def int8_activations(self) -> bool:
        """Whether the kernels quantize activations to int8 (the default); False: float activations,
        which the 16-row tiles do not take, so setting it restores the file's layout first."""
        return self._int8_activations

    @int8_activations.setter
    def int8_activations(self, value: bool) -> None:
        if not value:
            self.unpack_tiles()
        self._int8_activations = value

    def pack_tiles(self) -> bool:
        """Rearrange int4 weights with groups of 32 (GGUF Q4_0) into 16-row tiles in place, where that is the
        faster layout (CPUs with AVX-512 VNNI; see the module docstring); returns whether the layer is in
        tiles. The tensors keep their shapes and storage, so stacked MoE experts stay one view."""
        if self.x16:
            return True
        if (self.bits != 4 or self.group_size != 32 or self.out_features % TILE_ROWS or not self.qweight.is_cpu
                or not self._int8_activations or not kernels.has_vnni()):
            return False
        kernels.ops().qpack_(self.qweight, self.scales)
        self.x16 = True
        return True

    def unpack_tiles(self) -> None:
        """Back to the layout of the module docstring (new tensors), if in tiles."""
        if self.x16:
            self.qweight, self.scales = kernels.ops().qunpack(self.qweight, self.scales)
            self.x16 = False

    def dequantize(self) -> torch.Tensor:
        """The float32 weight (out, in)."""
        return _dequantize(self.qweight, self.scales, self.bits, self.group_size, self.x16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Kept lean: at decode this runs ~80 times per token around a ~50-200 us kernel call, so
        # the kernels take x (..., K) as it is and no reshape is dispatched around them.
        xf = x if x.dtype == torch.float32 else x.float()
        ops = kernels.ops() if xf.is_cpu else None
        m = xf.numel() // self.in_features
        gemm = ops is not None and m >= self.gemm_rows()
        if ops is not None and m <= GEMV_MAX_ROWS and not gemm:
            y = ops.qgemv(xf.contiguous(), self.qweight, self.scales, self.bits,
                          self.group_size or self.in_features, self._int8_activations, self.x16)
        elif gemm:
            y = ops.qgemm(xf.contiguous(), self.qweight, self.scales, self.bits, self.group_size or self.in_features,
                          self.x16)
        else:  # (..., K) -> (M, K) -> (..., N)
            y = self._tiled_matmul(xf.reshape(-1, self.in_features)).view(*x.shape[:-1], self.out_features)
        if self.bias is not None:
            y = y + self.bias
        return y if y.dtype == x.dtype else y.to(x.dtype)

    def gemm_rows(self) -> int:
        """The rows from which `forward` multiplies by the int8 GEMM: QGEMM_MIN_ROWS with VNNI, its AVX2 code
        (2-2.8x slower) only past the GEMV's rows, never (sys.maxsize) where the GEMM cannot take the layer.
        The fused decode step (`lfm2.step`) makes the same choice from it."""
        if not self._int8_gemm():
            return sys.maxsize
        return QGEMM_MIN_ROWS if kernels.has_vnni() else GEMV_MAX_ROWS + 1

    def _int8_gemm(self) -> bool:
        """Whether the int8 GEMM can take this layer's products (the SIMD build, int8 activations)."""
        return self._int8_activations and self.in_features % 32 == 0 and kernels.has_int8_gemm()

    def _tiled_matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x (M, K) @ W^T, dequantizing W in row tiles that stay in cache (with or without the kernels).

        Each tile's product fills a contiguous block of rows of y^T (N, M), so no tile's output
        is scattered into strided columns; one transposing copy at the end. Tiles also spare
        the allocator a fresh multi-megabyte float matrix (and its page faults) per call.
        """
        rows = max(1, TILE_BYTES // (4 * self.in_features))
        rows = -(-rows // TILE_ROWS) * TILE_ROWS if self.x16 else rows  # whole 16-row tiles
        if self.out_features <= rows:
            return F.linear(x, self.dequantize())
        out_t = x.new_empty(self.out_features, x.shape[0])  # (N, M)
        x_t = x.t()
        for n0 in range(0, self.out_features, rows):
            q, s = self.qweight[n0 : n0 + rows], self.scales[n0 : n0 + rows]
            torch.mm(_dequantize(q, s, self.bits, self.group_size, self.x16), x_t, out=out_t[n0 : n0 + rows])
        return out_t.t().contiguous()

    def _apply(self, fn: Any, recurse: bool = True) -> QuantLinear:
        """Move buffers between devices but never change their dtypes; a float dtype becomes the compute dtype.

        `nn.Module.to(torch.bfloat16)` would otherwise round the float16 scales through bfloat16.
        """
        probe = fn(torch.empty(0, dtype=torch.float32, device=self.qweight.device))
        self.dtype = probe.dtype if probe.is_floating_point() else self.dtype
        if probe.device != self.qweight.device:  # the tiles are a CPU kernel's layout
            self.unpack_tiles()
        self.qweight = self.qweight.to(probe.device)
        self.scales = self.scales.to(probe.device)
        if self.bias is not None:
            self.bias = self.bias.to(probe.device)
        return self

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        """A layer in tiles saves the layout of the module docstring, which is what checkpoints hold."""
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.x16:
            q, s = kernels.ops().qunpack(self.qweight, self.scales)
            destination[prefix + "qweight"], destination[prefix + "scales"] = q, s

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any) -> None:
        """Loads the layout of the module docstring, into tiles again if the layer was in tiles."""
        tiled = self.x16
        self.unpack_tiles()
        super()._load_from_state_dict(state_dict, prefix, *args)
        if tiled:
            self.pack_tiles()

    def format_repr(self) -> str:
        return f"{self.kind}, " + ("per-channel" if self.group_size is None else f"group_size={self.group_size}")

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, {self.format_repr()}, "
                f"bias={self.bias is not None}")


class QuantEmbedding(QuantLinear):
    """A quantized (vocab, hidden) matrix serving as the token embedding and, through `linear`, the output head.

    Stored once: the tied head of LFM2 is a `TiedQuantHead` that calls `linear` on this module.
    `forward(ids)` gathers the rows of the ids and dequantizes only those, in `.dtype`, which is
    what the model's `dtype` reads. It has no `weight`: nothing here is a float matrix
    (`dequantize()` makes one).
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, kind: str, group_size: int | None,
                 device: torch.device | str | None = None) -> None:
        super().__init__(embedding_dim, num_embeddings, kind, group_size, bias=False, device=device)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, kind: str, group_size: int | None) -> QuantEmbedding:
        m = cls(embedding.num_embeddings, embedding.embedding_dim, kind, group_size, device=embedding.weight.device)
        m.qweight, m.scales = quantize_weight(embedding.weight, kind, group_size)
        m.dtype = embedding.weight.dtype
        return m

    @classmethod
    def from_packed(cls, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None
                    ) -> QuantEmbedding:
        """An embedding around already-quantized (vocab, ...) tensors, e.g. GGUF's `token_embd.weight`."""
        if bias is not None:
            raise CheckpointError("an embedding has no bias")
        layer = QuantLinear.from_packed(qweight, scales)
        m = cls(layer.out_features, layer.in_features, layer.kind, layer.group_size, device="meta")
        m.qweight, m.scales = layer.qweight, layer.scales
        return m

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        q, s = self.qweight.index_select(0, flat), self.scales.index_select(0, flat)
        rows = _dequantize(q, s, self.bits, self.group_size)
        return rows.to(self.dtype).reshape(*ids.shape, self.embedding_dim)

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """x @ E^T: the tied output head."""
        return QuantLinear.forward(self, x)

    def pack_tiles(self) -> bool:
        """Never: an embedding's rows are looked up one by one, in the layout of the module docstring."""
        return False

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.format_repr()}"


class TiedQuantHead(nn.Module):
    """The output head tied to a `QuantEmbedding`: no tensors of its own, so nothing is stored twice.

    The embedding is held outside the module tree (not a submodule) so that `state_dict()`,
    `.to()` and `parameters()` see the shared matrix once, under `model.embed_tokens`.
    """

    def __init__(self, embedding: QuantEmbedding) -> None:
        super().__init__()
        self.__dict__["embedding"] = embedding  # bypasses nn.Module registration on purpose
        self.in_features, self.out_features = embedding.embedding_dim, embedding.num_embeddings

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embedding.linear(x)

    def extra_repr(self) -> str:
        return "tied to model.embed_tokens"


def pack_tiles(model: nn.Module) -> int:
    """Put the model's int4 layers with groups of 32 into 16-row tiles where that is faster
    (`QuantLinear.pack_tiles`); returns how many are in tiles. For a loaded model, before it runs."""
    return sum(1 for m in model.modules() if isinstance(m, QuantLinear) and m.pack_tiles())


def _dequantize(qweight: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int | None,
                x16: bool = False) -> torch.Tensor:
    ops = kernels.ops() if qweight.device.type == "cpu" and qweight.shape[0] > 0 else None
    if x16:  # 16-row tiles (QuantLinear.pack_tiles) exist only where the kernels run
        qweight, scales = ops.qunpack(qweight, scales)
    if ops is None:
        return dequantize_weight(qweight, scales, bits)
    return ops.dequantize(qweight, scales, bits, group_size or qweight.shape[1] * (8 // bits))


def _group_size_of(K: int, groups: int, bits: int, what: str) -> int | None:
    """The group size that `groups` scales per row of K values mean, checked against the supported ones."""
    if groups == 1 and bits == 8 and K not in GROUP_SIZES:
        return None
    if groups <= 0 or K % groups or K // groups not in GROUP_SIZES:
        raise CheckpointError(f"{what}: {groups} scales per row of {K} values is not a supported group size "
                              f"({', '.join(map(str, GROUP_SIZES))}{' or per-channel' if bits == 8 else ''})")
    return K // groups


# -- whole models ----------------------------------------------------------------------------------


def _quantizable(model: nn.Module) -> Iterator[tuple[str, nn.Linear]]:
    """(name, module) of every plain `nn.Linear` below the model: not the MoE router (a `Router`
    subclass that must stay float32), nor the output head, which `quantize_model` handles with the embedding."""
    for name, m in model.named_modules():
        if is_plain_linear(m) and name != "lm_head":
            yield name, m


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, module)


def _language(model: nn.Module) -> nn.Module:
    """The text model whose layers are quantized: the model itself, or a vision model's `language`
    (`lfm2.models.lfm2_vl`), so that its vision tower and projector stay float."""
    return getattr(model, "language", model)


def _share_head(model: nn.Module, text: nn.Module) -> None:
    """A vision model registers its language model's head under its own name too (its state dict's
    `lm_head.*`): point it at the text model's new head."""
    if text is not model:
        model.lm_head = text.lm_head


def quantize_model(model: nn.Module, kind: str, group_size: int | None = 32,
                   embedding_kind: str | None = None) -> nn.Module:
    """Replace the model's linear layers, embedding and head by quantized ones, in place; returns the model.

    Quantized: attention q/k/v/out_proj, conv in_proj/out_proj, the feed-forwards' w1/w2/w3
    (every expert of an MoE), the embedding and the output head (once when they are tied).
    Left float: the MoE router, norms, convolution kernels, biases, the expert bias, and the whole
    vision side of an LFM2-VL model (tower and projector: a fifth of LFM2-VL-450M's weights, run once
    per image rather than once per token, so they save little time quantized and cost image quality).
    `embedding_kind` is the format of the embedding and head, default int8 when `kind` is int4:
    the output head is the layer most sensitive to quantization, and llama.cpp's Q4_0 files
    keep it at higher precision too; on LFM2-350M an int8 head makes int4 decode read 233 MB per
    token instead of 199 MB.
    `group_size` None means per-channel scales (int8 only).
    """
    embedding_kind = embedding_kind or ("int8" if kind == "int4" else kind)
    text = _language(model)
    layers = list(_quantizable(text))
    # Every layer is checked before any is replaced: an error leaves the model as it was.
    for name, linear in layers:
        check_format(kind, group_size, linear.in_features, what=f"layer {name!r}")
    check_format(embedding_kind, group_size, text.config.hidden_size, what="the embedding")
    drop_decode_step(model)
    for name, linear in layers:
        _set_module(text, name, QuantLinear.from_linear(linear, kind, group_size))
    backbone = text.model
    if not isinstance(backbone.embed_tokens, QuantEmbedding | KQuantEmbedding):  # a K-quant one stays as it is
        backbone.embed_tokens = QuantEmbedding.from_embedding(backbone.embed_tokens, embedding_kind, group_size)
    if text.config.tie_word_embeddings:
        text.lm_head = TiedQuantHead(backbone.embed_tokens)
    elif is_plain_linear(text.lm_head):
        text.lm_head = QuantLinear.from_linear(text.lm_head, embedding_kind, group_size)
    _share_head(model, text)
    model.quantization = text.quantization = quantization_info(text)
    return model


def quantization_info(model: nn.Module) -> dict[str, Any]:
    """The `quantization` entry of config.json for a quantized model: format of the blocks and of the embedding."""
    model = _language(model)
    emb = model.model.embed_tokens
    kquants = sorted({m.kind for m in model.modules() if isinstance(m, KQuantLinear)})
    if kquants:  # a GGUF file's K-quant blocks (lfm2.kquant): described, but `save_quantized` refuses them
        return {"type": "gguf", "blocks": kquants}
    if not isinstance(emb, QuantEmbedding):
        raise ConfigError("the model is not quantized (its embedding is a float nn.Embedding); call quantize_model")
    blocks = {(m.kind, m.group_size) for name, m in model.named_modules()
              if type(m) is QuantLinear and name != "lm_head"}
    head = model.lm_head if isinstance(model.lm_head, QuantLinear) else emb
    if len(blocks) > 1 or (head.kind, head.group_size) != (emb.kind, emb.group_size):
        raise ConfigError(f"the model mixes quantization formats {sorted(blocks, key=str)}; lfm2 saves one format "
                          "for the blocks and one for the embedding and head")
    kind, group = next(iter(blocks)) if blocks else (emb.kind, emb.group_size)
    return {"type": kind, "group_size": group, "embedding": {"type": emb.kind, "group_size": emb.group_size}}


def save_quantized(model: nn.Module, out_dir: str | os.PathLike, extra_files: dict[str, str] | None = None,
                   config: dict[str, Any] | None = None) -> Path:
    """Write a quantized model as `config.json` (with a `quantization` entry) and `model.safetensors`.

    The safetensors file holds `<module>.qweight` and `<module>.scales` for quantized layers and
    the usual names for float tensors; a tied head is stored once, as the embedding. Each file
    is written atomically (`lfm2.weights.save_checkpoint`). `config` is the config.json to write
    the entry into (default: the model's own config); an LFM2-VL model passes its source's, whose
    other fields (image processing settings) the loader reads too.
    """
    from lfm2.weights import save_checkpoint

    info = quantization_info(model)
    if info["type"] not in KINDS:
        raise CheckpointError(
            f"this model keeps a GGUF file's K-quant blocks ({', '.join(info['blocks'])}), which an lfm2 checkpoint "
            "cannot hold (int8 and int4 only); load the file with quantize='int8' or 'int4' to save it as one, or "
            "write GGUF with `lfm2 convert`"
        )
    config = {**(model.config.to_dict() if config is None else config), "quantization": info}
    files = {**(extra_files or {}), "config.json": json.dumps(config, indent=2) + "\n"}
    return save_checkpoint(model, out_dir, extra_files=files)


def read_quantization(ckpt: str | os.PathLike) -> dict[str, Any] | None:
    """The `quantization` entry of a checkpoint's config.json, or None for a float checkpoint."""
    path = Path(ckpt) / "config.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read ({e})") from None
    q = raw.get("quantization") if isinstance(raw, dict) else None
    if q is None:
        return None
    if not isinstance(q, dict) or q.get("type") not in KINDS:
        raise ConfigError(f"{path}: 'quantization' is {q!r}; expected {{'type': 'int8' or 'int4', 'group_size': ...}}")
    return q


def load_quantized_into(model: nn.Module, ckpt: str | os.PathLike, device: torch.device | str = "cpu") -> nn.Module:
    """Fill a model built on the meta device from a quantized checkpoint, without float32 weights.

    The `quantization` entry of config.json says the format; the linear layers, the embedding
    and an untied head become quantized modules of that format (a tied head shares the
    embedding), then every tensor is checked (name, shape, and the exact dtype of quantized
    ones) before the model is touched, as `lfm2.weights.load_into` does. Float tensors take the
    dtype of the meta model's parameters (`cast_model`: float32 routers stay float32). An LFM2-VL
    model's language model is the quantized part; its vision tower and projector load as float.
    """
    from lfm2.weights import SAFETENSORS_DTYPES, read_state, tensor_table

    ckpt = Path(ckpt)
    q = read_quantization(ckpt)
    if q is None:
        raise CheckpointError(f"{ckpt}: config.json has no 'quantization' entry; this is a float checkpoint")
    where = f"{ckpt / 'config.json'}: 'quantization'"
    kind, group = q["type"], q.get("group_size")
    emb = q.get("embedding") or {"type": kind, "group_size": group}
    emb_kind, emb_group = emb.get("type"), emb.get("group_size")
    try:
        check_format(kind, group)
        check_format(emb_kind, emb_group)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    table = tensor_table(ckpt)
    text = _language(model)
    quantized_layout(model, kind, group, emb_kind, emb_group, where)
    expected = dict(model.state_dict(keep_vars=True))
    missing = [n for n in expected if n not in table]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CheckpointError(f"{ckpt}: missing tensor(s) {shown}; the checkpoint does not match config.json")
    unexpected = [n for n in table if n not in expected]
    if unexpected:
        raise CheckpointError(f"{ckpt}: unexpected tensor(s) {', '.join(unexpected[:5])}: the checkpoint is not a "
                              f"quantized {model.config.model_type} model of this config")
    for name, t in expected.items():
        path, info = table[name]
        if tuple(info["shape"]) != tuple(t.shape):
            raise CheckpointError(f"{path}: tensor {name!r} has shape {info['shape']}, expected {list(t.shape)} "
                                  f"from config.json (quantization {q})")
        if name.endswith((".qweight", ".scales")) and SAFETENSORS_DTYPES.get(info["dtype"]) != t.dtype:
            raise CheckpointError(f"{path}: tensor {name!r} is {info['dtype']}, expected {t.dtype} for the "
                                  f"quantization in config.json ({q})")
    # Quantized tensors' dtypes were checked above to equal the expected ones, so one cast fits all.
    state = read_state(table, expected, device)
    model.load_state_dict(state, strict=True, assign=True)
    model.quantization = text.quantization = quantization_info(text)
    return model


def quantized_layout(model: nn.Module, kind: str, group: int | None, emb_kind: str, emb_group: int | None,
                     where: str = "quantization") -> None:
    """Swap a meta-device model's linear layers, embedding and head for empty quantized modules, in place.

    What `quantize_model` would make of them, without any weights: the layout a quantized checkpoint
    of this model holds (its `state_dict()` names, shapes and dtypes), for loading one or writing one
    tensor by tensor. Quantized modules compute in the dtype of the model's float weights."""
    text = _language(model)
    compute = text.model.embedding_norm.weight.dtype
    for name, linear in list(_quantizable(text)):
        _set_module(text, name, _meta_linear(linear, kind, group, compute, where, name))
    backbone = text.model
    old = backbone.embed_tokens
    backbone.embed_tokens = QuantEmbedding(old.num_embeddings, old.embedding_dim, emb_kind, emb_group, device="meta")
    backbone.embed_tokens.dtype = compute
    if text.config.tie_word_embeddings:
        text.lm_head = TiedQuantHead(backbone.embed_tokens)
    else:
        text.lm_head = _meta_linear(text.lm_head, emb_kind, emb_group, compute, where, "lm_head")
    _share_head(model, text)


def _meta_linear(linear: nn.Linear, kind: str, group: int | None, compute: torch.dtype, where: str,
                 name: str) -> QuantLinear:
    """An empty quantized layer on the meta device in place of `linear`."""
    try:
        m = QuantLinear(linear.in_features, linear.out_features, kind, group, linear.bias is not None, device="meta")
    except ConfigError as e:
        raise ConfigError(f"{where}: layer {name!r}: {e}") from None
    m.dtype = compute
    return m


def quantize_checkpoint(src: str | os.PathLike, out: str | os.PathLike, kind: str, group_size: int | None = 32,
                        embedding_kind: str | None = None) -> Path:
    """Quantize a float checkpoint directory into `out` (weights, config and the other files, such as the tokenizer).

    Streamed (`stream_quantized`): each tensor is read from the source files, quantized and written
    before the next is read, so memory holds one tensor, never the model (a bfloat16 LFM2-8B-A1B,
    16.6 GB, quantizes to int4 on a machine with less free memory than its 4.7 GB int4 size). The
    output is one `model.safetensors`, or Hugging Face shards with an index past `lfm2.shards.SHARD_BYTES`.
    Float tensors that stay float (norms, convolution kernels) keep the file's dtype; the MoE router
    stays float32. An LFM2-VL checkpoint keeps its vision tower and projector float (`quantize_model`),
    and its config.json every field it had. The source directory is never modified. What `lfm2 quantize` runs.
    """
    from lfm2.config import ModelConfig
    from lfm2.files import atomic_write
    from lfm2.models import build_model, cast_model
    from lfm2.models.lfm2_vl import Lfm2VlForConditionalGeneration, VlConfig, is_vl_config
    from lfm2.shards import write_sharded
    from lfm2.weights import copy_checkpoint_files, resolve_checkpoint, tensor_table

    check_format(kind, group_size)
    src = resolve_checkpoint(src)
    out = Path(out)
    if out.resolve() == src.resolve():
        raise CheckpointError(f"{out}: the output directory must differ from the source checkpoint")
    if read_quantization(src) is not None:
        raise CheckpointError(f"{src}: already quantized ({read_quantization(src)}); quantize the float checkpoint")
    raw = _read_config(src)
    if is_vl_config(raw):
        with torch.device("meta"):
            model = Lfm2VlForConditionalGeneration(VlConfig.from_dict(raw, source=str(src / "config.json")))
        model.to(_file_dtype(tensor_table(src), src, model.embedding_key))
    else:
        raw = None  # written from the parsed config, as before
        model = build_model(ModelConfig.from_json(src / "config.json"), device="meta")
        cast_model(model, _file_dtype(tensor_table(src), src))
    expected, produce = stream_quantized(model, src, kind, group_size, embedding_kind)
    out.mkdir(parents=True, exist_ok=True)
    copy_checkpoint_files(src, out)
    write_sharded(out, [(name, tuple(t.shape), t.dtype) for name, t in expected.items()], produce)
    config = {**(model.config.to_dict() if raw is None else raw), "quantization": quantization_info(model)}
    atomic_write(out / "config.json", json.dumps(config, indent=2) + "\n")
    return out


def load_quantizing(model: nn.Module, ckpt: str | os.PathLike, kind: str, group_size: int | None = 32,
                    device: torch.device | str = "cpu") -> nn.Module:
    """Fill a meta-device model from a float checkpoint, quantizing each weight as it is read.

    The same result as `load_into` then `quantize_model`, but memory holds the quantized model and
    one float tensor (`stream_quantized`), never the float model: what `lfm2.load(ckpt, quantize=...)`
    does, so that a bfloat16 LFM2-8B-A1B loads as int4 where its float32 copy (33 GB) would not fit."""
    from lfm2.weights import WeightArena

    expected, produce = stream_quantized(model, Path(ckpt), kind, group_size)
    if torch.device(device).type == "cpu":
        # Each tensor goes straight into its slot of one huge-page arena (what `move_to_huge_pages` would
        # copy it to after): moving the model afterwards would need it twice, as freed small tensors stay
        # in the allocator's heap rather than going back to the system (measured: 2.2x the int4 size).
        arena = WeightArena([(tuple(t.shape), t.dtype) for t in expected.values()])
        state = {name: arena.take(tuple(t.shape), t.dtype).copy_(produce(name)) for name, t in expected.items()}
    else:
        state = {name: produce(name).to(device) for name in expected}
    model.load_state_dict(state, strict=True, assign=True)
    model.quantization = _language(model).quantization = quantization_info(model)
    return model


def stream_quantized(model: nn.Module, ckpt: Path, kind: str, group_size: int | None,
                     embedding_kind: str | None = None) -> tuple[dict[str, torch.Tensor], Any]:
    """The tensors of `model` quantized from float checkpoint `ckpt`, made one at a time.

    `model` is on the meta device, in the dtypes its float tensors should have; it is swapped in place
    to its quantized layout (`quantized_layout`). Returns (the expected tensors as meta tensors, in
    state-dict order; `produce(name)`, which reads that tensor's source from the files with plain
    reads, quantizes it in blocks of rows and returns it). Every source tensor is checked (present,
    of the right shape, none left over) before anything is read. A layer's `scales` are made with its
    `qweight`, and must be asked for after it, as the state-dict order has them.
    """
    from lfm2.shards import read_tensor
    from lfm2.weights import model_table

    embedding_kind = embedding_kind or ("int8" if kind == "int4" else kind)
    text = _language(model)
    check_format(embedding_kind, group_size, text.config.hidden_size, what="the embedding")
    table = model_table(model, ckpt)
    quantized_layout(model, kind, group_size, embedding_kind, group_size, where=f"quantizing {ckpt}")
    expected = dict(model.state_dict(keep_vars=True))
    sources: dict[str, tuple[str, tuple[int, ...]]] = {}  # our tensor -> (its source tensor, the source's shape)
    for name, t in expected.items():
        prefix, _, leaf = name.rpartition(".")
        layer = model.get_submodule(prefix) if leaf in ("qweight", "scales") else None
        if isinstance(layer, QuantLinear):
            sources[name] = (f"{prefix}.weight", (layer.out_features, layer.in_features))
        else:
            sources[name] = (name, tuple(t.shape))
    for source, shape in sources.values():
        if source not in table:
            raise CheckpointError(f"{ckpt}: missing tensor {source!r}; the checkpoint does not match config.json")
        found = tuple(table[source][1]["shape"])
        if found != shape:
            raise CheckpointError(f"{table[source][0]}: tensor {source!r} has shape {list(found)}, expected "
                                  f"{list(shape)} from config.json")
    used = {source for source, _ in sources.values()}
    unexpected = [n for n in table if n not in used and not (text.config.tie_word_embeddings and n == "lm_head.weight")]
    if unexpected:
        raise CheckpointError(f"{ckpt}: unexpected tensor(s) {', '.join(unexpected[:5])}: the checkpoint is not a "
                              f"{model.config.model_type} model of this config")
    pending: dict[str, torch.Tensor] = {}  # a layer's scales, made with its qweight

    def produce(name: str) -> torch.Tensor:
        prefix, _, leaf = name.rpartition(".")
        if leaf == "scales" and prefix in pending:
            return pending.pop(prefix)
        source = sources[name][0]
        path, info = table[source]
        if leaf != "qweight" or source == name:
            return read_tensor(path, info, source).to(expected[name].dtype)
        layer = model.get_submodule(prefix)
        qweight, pending[prefix] = quantize_rows(lambda r0, r1: read_tensor(path, info, source, (r0, r1)),
                                                 layer.out_features, layer.in_features, layer.kind, layer.group_size)
        return qweight

    return expected, produce


def quantize_rows(read: Any, N: int, K: int, kind: str, group_size: int | None, rows: int = 1024
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize_weight` of an (N, K) matrix read a block of `rows` rows at a time (`read(start, stop)`): the
    same result (rows are quantized independently), with the source and its float32 temporaries held
    for one block only (the embedding of an 8B model is 256 MB of bfloat16 read whole)."""
    bits = check_format(kind, group_size, K)
    qweight = torch.empty(N, K if bits == 8 else K // 2, dtype=torch.int8 if bits == 8 else torch.uint8)
    scales = torch.empty(N, _groups(K, group_size), dtype=torch.float16)
    for r in range(0, N, rows):
        qweight[r : r + rows], scales[r : r + rows] = quantize_weight(read(r, min(N, r + rows)), kind, group_size)
    return qweight, scales


def _read_config(ckpt: Path) -> dict[str, Any]:
    path = ckpt / "config.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read ({e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return raw


_SAFETENSORS_FLOATS = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _file_dtype(table: dict[str, tuple[Path, dict]], ckpt: Path, name: str = "model.embed_tokens.weight"
                ) -> torch.dtype:
    """The float dtype of a checkpoint's embedding (tensor `name`), which is the dtype of its weights."""
    dtype = table[name][1]["dtype"] if name in table else None
    if dtype not in _SAFETENSORS_FLOATS:
        raise CheckpointError(f"{ckpt}: tensor {name!r} is {dtype or 'missing'}; expected F32, F16 or BF16 weights")
    return _SAFETENSORS_FLOATS[dtype]

