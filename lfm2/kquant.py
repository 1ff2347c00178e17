"""GGUF K-quant layers: Q4_K, Q5_K and Q6_K matrices run as the file stores them.

These are the block types of the files Liquid AI publishes and users download (Q4_K_M, Q5_K_M,
Q6_K). A layer keeps the file's bytes (`blocks`, uint8 (N, K / 256 x bytes per super-block)), so a
model takes the memory of the file, and computes with kernels of our own
(`lfm2/kernels/kquant.cpp`, which also documents the layouts):
- up to `KGEMV_MAX_ROWS` rows of input (decode, small batches): `kgemv`, a matrix-vector product
  that streams the blocks once, with int8 activations per 256 values as llama.cpp computes K-quant
  products (exact integer sums inside a super-block). A loaded Q4_K matrix is first rearranged into
  tiles of 16 rows (`pack_tiles`, the same bytes moved; the kernel file documents the layout), where
  one instruction multiplies 4 values of 16 rows (VNNI) or 8 rows (AVX2): with AVX-512 VNNI over
  LFM2-350M's decode matrices 2.1x the per-row code on weights in cache and 1.2x from memory, where it
  reads as fast as the memory gives (2 Zen 4 cores, `benchmarks/kernels.py --kquants`); with AVX2 alone
  1.8x in cache and 1.56x from memory (2 Zen 1 cores; docs/benchmarks.md);
- more rows (prefill), on CPUs without AMX: `kgemm`, exact integer block products of the weights'
  values with `kgemv`'s int8 activations (so a token's prefill logits are its decode logits); with
  AVX-512 VNNI 32 multiply-adds an instruction, 2-3.6x the float32 tiles below on LFM2-350M's
  matrices (Zen 4, 2 threads), and 1.8-2.2x with AVX2 alone (`vpmaddubsw` + `vpmaddwd`, measured on
  the same CPU under `LFM2_KERNEL_ISA=avx2`; docs/benchmarks.md);
- more rows elsewhere: row tiles dequantized (`kdequantize`, exact: the values `gguf.quants.dequantize`
  gives) and multiplied by torch's GEMM, like `lfm2.quant`'s tiled path. On CPUs with AMX the tiles
  and activations are rounded to bfloat16 (relative error 2^-9, far below the 4-6 bit weights' own),
  which oneDNN multiplies in AMX tiles 4-6x faster than float32 (`kernels.has_amx_bf16`); else float32;
- without the kernels (no compiler, `LFM2_NO_KERNELS=1`): the same tiles dequantized by
  `gguf.quants` (numpy). Correct and slow; K-quant files load as int8 layers instead when the
  kernels are missing at load time (`lfm2.gguf.load_model`).

A K-quant model cannot be saved as an lfm2 quantized checkpoint (its format has int8/int4 only):
`lfm2 convert` writes GGUF, and `lfm2.load(file, quantize="int8")` gives a model that saves.
"""

from __future__ import annotations

from typing import Any

import gguf
import numpy as np
import torch
from torch import nn

from lfm2 import kernels
from lfm2.errors import CheckpointError

GGMLType = gguf.GGMLQuantizationType
# The K-quant block types with kernels here, by name; each super-block holds 256 values of a row.
TYPES = {"q4_k": GGMLType.Q4_K, "q5_k": GGMLType.Q5_K, "q6_k": GGMLType.Q6_K}
SUPER_BLOCK = 256
# lfm2's own type id for Q4_K in tiles of TILE_ROWS rows (`kernels/kquant.cpp`, "Q4_K in tiles of 16 rows").
Q4_K_X16 = 112
TILE_ROWS = 16
# Input rows up to which `kgemv` is used: a server's decoding batch. Its cost grows with the rows (the
# AVX-512 code and the VNNI tiles unpack the weights once per four rows, the AVX2 tiles once per two, the
# AVX2 per-row code once per row), while dequantized tiles cost a pass over every weight whatever the
# rows: 16 rows of kgemv took 2-12 ms on a 4608x1024 Q4_K matrix against 50-170 ms tiled (2 threads, on a
# busy machine).
KGEMV_MAX_ROWS = 16
# Bytes of dequantized weight (float32 or bfloat16) made at once on the many-row path (as lfm2.quant.TILE_BYTES).
TILE_BYTES = 4 * 2**20


def row_bytes(ggml_type: int, in_features: int) -> int:
    """Bytes of one row of `in_features` values in a K-quant type."""
    block, size = gguf.GGML_QUANT_SIZES[GGMLType(ggml_type)]
    return in_features // block * size


def supports(ggml_type: int, in_features: int) -> bool:
    """Whether a matrix of this block type and row length runs as a K-quant layer."""
    return ggml_type in TYPES.values() and in_features % SUPER_BLOCK == 0


def tiles_faster() -> bool:
    """Whether Q4_K runs faster in 16-row tiles here: with AVX-512 VNNI, or with AVX2 alone (the AVX2 code
    of the tiles against the file layout's: docs/benchmarks.md). Not on AVX-512 CPUs without VNNI, whose
    per-row code (`rows_avx512`) was not measured against the AVX2 tiles."""
    ops = kernels.ops()
    return ops is not None and (kernels.has_vnni() or ops.kgemv_best_isa() == 1)


def dequantize_blocks(blocks: torch.Tensor, ggml_type: int, in_features: int,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Rows of K-quant blocks (N, bytes) as float32 (or bfloat16) (N, K): the kernel, else `gguf.quants`."""
    ops = kernels.ops() if blocks.device.type == "cpu" and blocks.shape[0] > 0 else None
    if ops is not None:
        return ops.kdequantize(blocks.contiguous(), int(ggml_type), in_features, dtype == torch.bfloat16)
    if ggml_type == Q4_K_X16:  # only made where the kernels run (`pack_tiles`); they went away since
        raise CheckpointError("Q4_K blocks in 16-row tiles need lfm2's C++ kernels, which are off or failed to "
                              "build now; load the model again without LFM2_NO_KERNELS")
    raw = blocks.cpu().numpy()
    values = gguf.quants.dequantize(raw.reshape(-1, raw.shape[-1]), GGMLType(ggml_type))
    w = torch.from_numpy(np.ascontiguousarray(values)).reshape(blocks.shape[0], in_features).to(blocks.device)
    return w.to(dtype)


class KQuantLinear(nn.Module):
    """y = x W^T with W held as GGUF K-quant blocks (see the module docstring). No bias (LFM2 has none).

    Like `lfm2.quant.QuantLinear`: any leading shape, the input's dtype out, float32 results (the
    prefill GEMM in bfloat16 on AMX CPUs); `.to(dtype)` changes only the compute dtype, never the blocks.
    """

    def __init__(self, in_features: int, out_features: int, ggml_type: int,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        if not supports(ggml_type, in_features):
            raise CheckpointError(f"a K-quant layer needs a Q4_K, Q5_K or Q6_K type and rows of a multiple of "
                                  f"{SUPER_BLOCK} values; got type {ggml_type} and {in_features} values")
        kernels.ops()  # build the kernels now, at load time: never inside a (compiled) forward
        self.in_features, self.out_features, self.ggml_type = in_features, out_features, int(ggml_type)
        self.kernel_type = self.ggml_type  # the blocks' layout as the kernels name it: Q4_K_X16 after pack_tiles
        self.dtype = torch.float32
        self.register_buffer("blocks", torch.empty(out_features, row_bytes(ggml_type, in_features),
                                                   dtype=torch.uint8, device=device))

    @classmethod
    def from_blocks(cls, blocks: torch.Tensor, ggml_type: int, in_features: int) -> KQuantLinear:
        """A layer around a matrix's raw blocks (N, bytes per row), kept as they are."""
        m = cls(in_features, blocks.shape[0], ggml_type, device="meta")
        if blocks.dtype != torch.uint8 or blocks.dim() != 2 or blocks.shape[1] != row_bytes(ggml_type, in_features):
            raise CheckpointError(f"{GGMLType(ggml_type).name} blocks for rows of {in_features} values must be uint8 "
                                  f"(N, {row_bytes(ggml_type, in_features)}); got {blocks.dtype} {list(blocks.shape)}")
        m.blocks = blocks.contiguous()
        return m

    @property
    def kind(self) -> str:
        return GGMLType(self.ggml_type).name.lower()

    def pack_tiles(self) -> bool:
        """Rearrange Q4_K blocks into 16-row tiles in place, where that is the faster layout (`tiles_faster`;
        see the module docstring); returns whether it did. The tensor keeps its shape and
        storage, so stacked MoE experts stay one view."""
        if (self.kernel_type != GGMLType.Q4_K or self.out_features % TILE_ROWS or not self.blocks.is_cpu
                or not tiles_faster()):
            return False
        kernels.ops().kpack_(self.blocks, self.kernel_type, self.in_features)
        self.kernel_type = Q4_K_X16
        return True

    def dequantize(self) -> torch.Tensor:
        """The float32 weight (out, in)."""
        return dequantize_blocks(self.blocks, self.kernel_type, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x if x.dtype == torch.float32 else x.float()
        ops = kernels.ops() if xf.is_cpu else None
        if ops is not None and xf.numel() <= KGEMV_MAX_ROWS * self.in_features:
            y = ops.kgemv(xf.contiguous(), self.blocks, self.kernel_type, self.in_features)  # (..., K) -> (..., N)
        elif ops is not None and kernels.has_int8_gemm() and not kernels.has_amx_bf16():
            y = ops.kgemm(xf.contiguous(), self.blocks, self.kernel_type, self.in_features)
        else:  # (..., K) -> (M, K) -> (..., N)
            y = self._tiled_matmul(xf.reshape(-1, self.in_features)).view(*x.shape[:-1], self.out_features)
        return y if y.dtype == x.dtype else y.to(x.dtype)

    def _tiled_matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x (M, K) @ W^T, W dequantized a row tile at a time (see lfm2.quant.QuantLinear._tiled_matmul)."""
        compute = torch.bfloat16 if x.is_cpu and kernels.has_amx_bf16() else torch.float32
        rows = max(1, TILE_BYTES // (compute.itemsize * self.in_features))
        rows = -(-rows // TILE_ROWS) * TILE_ROWS if self.kernel_type == Q4_K_X16 else rows  # whole tiles
        x_t = x.to(compute).t()
        out_t = x_t.new_empty(self.out_features, x.shape[0])  # (N, M)
        for n0 in range(0, self.out_features, rows):
            w = dequantize_blocks(self.blocks[n0 : n0 + rows], self.kernel_type, self.in_features, compute)
            torch.mm(w, x_t, out=out_t[n0 : n0 + rows])
        return out_t.t().float()

    def _apply(self, fn: Any, recurse: bool = True) -> KQuantLinear:
        """Move the blocks between devices but never change their dtype; a float dtype becomes the compute dtype."""
        probe = fn(torch.empty(0, dtype=torch.float32, device=self.blocks.device))
        self.dtype = probe.dtype if probe.is_floating_point() else self.dtype
        if probe.device != self.blocks.device and self.kernel_type == Q4_K_X16:  # the tiles are a CPU kernel's layout
            self.blocks = kernels.ops().kunpack(self.blocks, self.kernel_type, self.in_features)
            self.kernel_type = self.ggml_type
        self.blocks = self.blocks.to(probe.device)
        return self

    def format_repr(self) -> str:
        return self.kind

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.kind}"


class KQuantEmbedding(KQuantLinear):
    """A K-quant (vocab, hidden) matrix serving as the token embedding and, through `linear`, the
    tied output head (with `lfm2.quant.TiedQuantHead`), stored once. `forward(ids)` dequantizes only
    the rows of the ids, in `.dtype`."""

    def __init__(self, num_embeddings: int, embedding_dim: int, ggml_type: int,
                 device: torch.device | str | None = None) -> None:
        super().__init__(embedding_dim, num_embeddings, ggml_type, device=device)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim

    @classmethod
    def from_blocks(cls, blocks: torch.Tensor, ggml_type: int, in_features: int) -> KQuantEmbedding:
        layer = KQuantLinear.from_blocks(blocks, ggml_type, in_features)
        m = cls(layer.out_features, in_features, ggml_type, device="meta")
        m.blocks = layer.blocks
        return m

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = dequantize_blocks(self.blocks.index_select(0, ids.reshape(-1)), self.ggml_type, self.embedding_dim)
        return rows.to(self.dtype).reshape(*ids.shape, self.embedding_dim)

    def pack_tiles(self) -> bool:
        """Never: an embedding's rows are looked up one by one, in the file's layout."""
        return False

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """x @ E^T: the tied output head."""
        return KQuantLinear.forward(self, x)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.kind}"
