"""GGUF, llama.cpp's single-file format: load it, and convert between it and Hugging Face checkpoints.

Reading (`load_gguf`, `read_gguf`, `import_gguf`):
- the header (metadata and tensor table) is parsed here rather than by `gguf.GGUFReader`, so that
  every defect is reported with the tensor's name: an unknown type id, a tensor whose bytes run
  past the end of the file (a truncated download), a missing or misshapen tensor. All of it is
  checked before any weight is read;
- the config comes from the `{arch}.*` metadata of architectures `lfm2` and `lfm2moe`; the
  per-block `attention.head_count_kv` array says which blocks are attention (> 0) and which are
  short convolutions (0);
- the tokenizer is rebuilt as a `tokenizers.Tokenizer` that encodes as llama.cpp does for the
  `lfm2` pre-tokenizer: the Llama-3 split regex, byte-level BPE with `ignore_merges` (a pre-token
  that is itself in the vocabulary is taken whole), BOS added per `tokenizer.ggml.add_bos_token`;
  CONTROL tokens become special added tokens; the chat template is the file's own;
- the data is memory-mapped: F32 tensors loaded as float32 are views of the file's pages, F16 and
  BF16 are converted from them, and the quantized types (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K,
  Q4_K, Q5_K, Q6_K) are dequantized with `gguf.quants`, one tensor at a time: to float32 for a
  float model, else into lfm2's int8 / int4 layers (Q8_0 / Q4_0 blocks are taken as they are;
  see `load_model` and `native_format`).

Writing (`export_gguf`) follows llama.cpp's `convert_hf_to_gguf.py` (classes `LFM2Model` and
`LFM2MoeModel`) and what `src/models/lfm2.cpp` / `lfm2moe.cpp` load: the same metadata keys, with
`attention.head_count_kv` as a per-block array (0 for conv blocks); 1-D tensors, norms, the MoE
router and the conv kernel always F32; the conv kernel squeezed from (d, 1, L) to (d, L); the
experts stacked into (E, ...) tensors; the vocabulary as a token list with token types, and the
merges, special ids, add-BOS flag and chat template through `gguf.SpecialVocab`, as llama.cpp's
converter does. The file is written to a temporary name beside the output and renamed into place
when complete, so a crash never leaves a half-written file under the final name.

`NAME_TABLE` is the one place where GGUF tensor names meet ours.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from tokenizers import AddedToken, models, processors
from tokenizers import Tokenizer as HFTokenizer
from tqdm.auto import tqdm

from lfm2.bpe import build_tokenizer
from lfm2.config import ModelConfig
from lfm2.errors import CheckpointError, ConfigError, TokenizerError
from lfm2.files import atomic_path
from lfm2.loading import Loaded, parse_device, parse_dtype
from lfm2.models import build_model, cast_model
from lfm2.models.lfm2 import is_plain_linear
from lfm2.models.lfm2_vl import VlConfig, is_vl_config
from lfm2.shards import read_tensor
from lfm2.tokenizer import Tokenizer
from lfm2.weights import (
    PROGRESS_BYTES,
    WeightArena,
    move_to_huge_pages,
    read_exact,
    resolve_checkpoint,
    save_checkpoint,
    tensor_table,
    use_huge_pages,
)

GGMLType = gguf.GGMLQuantizationType
TokenType = gguf.TokenType

# GGUF `general.architecture` -> our `model_type`.
ARCHITECTURES = {"lfm2": "lfm2", "lfm2moe": "lfm2_moe"}
GGUF_ARCH = {v: k for k, v in ARCHITECTURES.items()}

# The one name table. `{i}` is the block index, `{e}` the expert index. The last column says which
# models or blocks have the tensor: "model" (every model), "untied" (an output head of its own),
# "block" (every block), "conv" / "attention" (by `layer_types`), "dense_ffn" (a SwiGLU block),
# "moe" (a mixture-of-experts block). Shapes are the same on both sides except the conv kernel,
# (d, L) in GGUF and (d, 1, L) in ours, and the experts, stacked along a first axis E in GGUF.
NAME_TABLE: tuple[tuple[str, str, str], ...] = (
    ("token_embd.weight", "model.embed_tokens.weight", "model"),
    ("token_embd_norm.weight", "model.embedding_norm.weight", "model"),  # the final norm
    ("output.weight", "lm_head.weight", "untied"),
    ("blk.{i}.attn_norm.weight", "model.layers.{i}.operator_norm.weight", "block"),
    ("blk.{i}.ffn_norm.weight", "model.layers.{i}.ffn_norm.weight", "block"),
    ("blk.{i}.shortconv.in_proj.weight", "model.layers.{i}.conv.in_proj.weight", "conv"),
    ("blk.{i}.shortconv.conv.weight", "model.layers.{i}.conv.conv.weight", "conv"),
    ("blk.{i}.shortconv.out_proj.weight", "model.layers.{i}.conv.out_proj.weight", "conv"),
    ("blk.{i}.attn_q.weight", "model.layers.{i}.self_attn.q_proj.weight", "attention"),
    ("blk.{i}.attn_k.weight", "model.layers.{i}.self_attn.k_proj.weight", "attention"),
    ("blk.{i}.attn_v.weight", "model.layers.{i}.self_attn.v_proj.weight", "attention"),
    ("blk.{i}.attn_output.weight", "model.layers.{i}.self_attn.out_proj.weight", "attention"),
    ("blk.{i}.attn_q_norm.weight", "model.layers.{i}.self_attn.q_layernorm.weight", "attention"),
    ("blk.{i}.attn_k_norm.weight", "model.layers.{i}.self_attn.k_layernorm.weight", "attention"),
    ("blk.{i}.ffn_gate.weight", "model.layers.{i}.feed_forward.w1.weight", "dense_ffn"),
    ("blk.{i}.ffn_up.weight", "model.layers.{i}.feed_forward.w3.weight", "dense_ffn"),
    ("blk.{i}.ffn_down.weight", "model.layers.{i}.feed_forward.w2.weight", "dense_ffn"),
    ("blk.{i}.ffn_gate_inp.weight", "model.layers.{i}.feed_forward.gate.weight", "moe"),  # router
    ("blk.{i}.exp_probs_b.bias", "model.layers.{i}.feed_forward.expert_bias", "moe"),
    ("blk.{i}.ffn_gate_exps.weight", "model.layers.{i}.feed_forward.experts.{e}.w1.weight", "moe"),
    ("blk.{i}.ffn_up_exps.weight", "model.layers.{i}.feed_forward.experts.{e}.w3.weight", "moe"),
    ("blk.{i}.ffn_down_exps.weight", "model.layers.{i}.feed_forward.experts.{e}.w2.weight", "moe"),
)
# Other names for the same tensor in files written by other converters.
ALIASES = {"token_embd_norm.weight": ("output_norm.weight",)}

FLOAT_TYPES = (GGMLType.F32, GGMLType.F16, GGMLType.BF16)
QUANT_TYPES = (GGMLType.Q8_0, GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q5_0, GGMLType.Q5_1,
               GGMLType.Q2_K, GGMLType.Q3_K, GGMLType.Q4_K, GGMLType.Q5_K, GGMLType.Q6_K)
READ_TYPES = FLOAT_TYPES + QUANT_TYPES
# `export_gguf(type=...)`: the type of the weight matrices, and the `general.file_type` it sets.
WRITE_TYPES = {"f32": GGMLType.F32, "f16": GGMLType.F16, "bf16": GGMLType.BF16,
               "q8_0": GGMLType.Q8_0, "q4_0": GGMLType.Q4_0}
_FILE_TYPES = {GGMLType.F32: gguf.LlamaFileType.ALL_F32, GGMLType.F16: gguf.LlamaFileType.MOSTLY_F16,
               GGMLType.BF16: gguf.LlamaFileType.MOSTLY_BF16, GGMLType.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0,
               GGMLType.Q4_0: gguf.LlamaFileType.MOSTLY_Q4_0}

# Pre-tokenizer names for which llama.cpp uses the Llama-3 split regex with ignore_merges and BOS.
_LLAMA3_PRE = ("lfm2", "llama-bpe", "llama3", "llama-v3")
# Tokenizer-side (our name, GGUF key) of the special tokens.
_SPECIAL_KEYS = (("bos_token", "tokenizer.ggml.bos_token_id"), ("eos_token", "tokenizer.ggml.eos_token_id"),
                 ("unk_token", "tokenizer.ggml.unknown_token_id"), ("pad_token", "tokenizer.ggml.padding_token_id"))
# generation_config.json field -> GGUF `general.sampling.*` key (llama.cpp reads them as defaults).
_SAMPLING_KEYS = {"temperature": "general.sampling.temp", "top_k": "general.sampling.top_k",
                  "top_p": "general.sampling.top_p", "min_p": "general.sampling.min_p",
                  "repetition_penalty": "general.sampling.penalty_repeat"}
# Text the converter encodes with both tokenizers to prove the GGUF vocabulary encodes like the
# original: runs of spaces, tabs and newlines, contractions in several cases, digit runs, scripts
# without spaces, emoji sequences, punctuation runs and special tokens.
_PROBE_TEXT = (
    "\n \n\n \t\t \t\n  \n   x    y\r\n"
    "I'm sure you'LL see it's THEIR'S; we'Ve 'd 'RE 'm\n"
    "1 12 123 1234 12345 3.14159 1,000,000 0x1F\n"
    "Hello, World!!! ... ??? ---=== (brackets) [x] {y} <z> @user #tag $5 100% a&b\n"
    "Größe Ærø naïve façade — “quotes” ‘single’ …\n"
    "Привет мир! Καλημέρα κόσμε. مرحبا بالعالم שלום עולם\n"
    "今天天气很好，我们去公园散步吧。日本語のテキスト。한국어 문장입니다.\n"
    "ภาษาไทยไม่มีช่องว่าง កាន់តែពិសេស हिन्दी भाषा\n"
    "😀🎉🚀 👍🏽 😶‍🌫️ 🇫🇷 ✅\n"
    "def f(x):\n\treturn x**2  # comment\n"
    "<|startoftext|><|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
)


# -- reading the file -----------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorInfo:
    """One entry of a GGUF tensor table."""

    name: str
    type: GGMLType
    shape: tuple[int, ...]  # torch order, outermost first (GGUF stores the dimensions innermost first)
    offset: int  # absolute byte offset of the data in the file
    nbytes: int


_SCALARS = {
    gguf.GGUFValueType.UINT8: "<B", gguf.GGUFValueType.INT8: "<b", gguf.GGUFValueType.UINT16: "<H",
    gguf.GGUFValueType.INT16: "<h", gguf.GGUFValueType.UINT32: "<I", gguf.GGUFValueType.INT32: "<i",
    gguf.GGUFValueType.FLOAT32: "<f", gguf.GGUFValueType.BOOL: "<?", gguf.GGUFValueType.UINT64: "<Q",
    gguf.GGUFValueType.INT64: "<q", gguf.GGUFValueType.FLOAT64: "<d",
}


_U64 = struct.Struct("<Q")


def _shortest(x: float) -> float:
    """A float32 metadata value as the shortest decimal that rounds to it: 1e-5 written to GGUF
    reads back as 1e-5, not 9.99999974e-06, so configs survive a round trip unchanged."""
    return float(str(np.float32(x)))


class _Cursor:
    """Reads little-endian GGUF values from a buffer; running past its end is a truncated header."""

    def __init__(self, buf: np.ndarray, path: Path) -> None:
        self.buf, self.path, self.pos, self.size = memoryview(buf).cast("B"), path, 0, len(buf)

    def take(self, n: int, what: str) -> int:
        if n < 0 or self.pos + n > self.size:
            raise CheckpointError(
                f"{self.path}: the file ends at byte {self.size} while reading {what} at byte {self.pos}: "
                "the GGUF header is truncated or corrupt (re-download or re-convert the file)"
            )
        start = self.pos
        self.pos += n
        return start

    def unpack(self, fmt: str, what: str) -> Any:
        return struct.unpack_from(fmt, self.buf, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        n = self.unpack("<Q", what)
        start = self.take(n, what)
        try:
            return str(self.buf[start : start + n], "utf-8")
        except UnicodeDecodeError:
            raise CheckpointError(f"{self.path}: {what} at byte {start} is not valid UTF-8 (corrupt file)") from None

    def strings(self, n: int, what: str) -> list[str]:
        """n strings in a row: `string`'s checks in one tight loop. A vocabulary's 65,536 tokens and ~64,000
        merges through `string` one by one took 0.68 s of every LFM2 file's load; this loop ~0.05 s."""
        buf, size, pos, out = self.buf, self.size, self.pos, []
        length = _U64.unpack_from
        try:
            for _ in range(n):
                if pos + 8 > size:
                    break
                (k,) = length(buf, pos)
                if pos + 8 + k > size:
                    break
                out.append(str(buf[pos + 8 : pos + 8 + k], "utf-8"))
                pos += 8 + k
        except UnicodeDecodeError:
            raise CheckpointError(f"{self.path}: {what}: string {len(out)} at byte {pos + 8} is not valid UTF-8 "
                                  "(corrupt file)") from None
        self.pos = pos
        if len(out) < n:  # ran past the end: `string` names where
            self.string(f"{what}: string {len(out)} of {n}")
        return out

    def value(self, vtype: int, key: str) -> Any:
        what = f"the value of metadata key {key!r}"
        if vtype == gguf.GGUFValueType.STRING:
            return self.string(what)
        if vtype == gguf.GGUFValueType.FLOAT32:
            return _shortest(self.unpack("<f", what))
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype], what)
        if vtype == gguf.GGUFValueType.ARRAY:
            etype = self.unpack("<I", what)
            n = self.unpack("<Q", what)
            if etype in _SCALARS:
                dtype = np.dtype(_SCALARS[etype])
                start = self.take(n * dtype.itemsize, what)
                values = np.frombuffer(self.buf, dtype=dtype, count=n, offset=start).tolist()
                return [_shortest(v) for v in values] if etype == gguf.GGUFValueType.FLOAT32 else values
            if etype == gguf.GGUFValueType.STRING:
                return self.strings(n, what)
            return [self.value(etype, key) for _ in range(n)]
        raise CheckpointError(f"{self.path}: metadata key {key!r} has value type {vtype}, which is not a GGUF type")


class GGUFFile:
    """A GGUF file: its metadata, its tensor table, and its data memory-mapped.

    The map is copy-on-write: tensors handed out are writable views whose pages come from the
    file, and the file itself is never modified.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"{self.path}: no such GGUF file")
        if self.path.stat().st_size == 0:
            raise CheckpointError(f"{self.path}: the file is empty (0 bytes), not a GGUF file")
        try:
            self._map = np.memmap(self.path, mode="c")
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{self.path}: cannot read ({e})") from None
        cur = _Cursor(self._map, self.path)
        magic = bytes(self._map[:4])
        if magic != b"GGUF":
            raise CheckpointError(f"{self.path}: not a GGUF file (it starts with {magic!r}, expected b'GGUF')")
        cur.take(4, "the magic")
        version = cur.unpack("<I", "the version")
        if version not in (2, 3):
            raise CheckpointError(f"{self.path}: GGUF version {version} is not supported (lfm2 reads versions 2 and 3)")
        n_tensors = cur.unpack("<Q", "the tensor count")
        n_kv = cur.unpack("<Q", "the metadata count")
        self.metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = cur.string("a metadata key")
            self.metadata[key] = cur.value(cur.unpack("<I", f"the type of metadata key {key!r}"), key)
        entries = []
        for _ in range(n_tensors):
            name = cur.string("a tensor name")
            n_dims = cur.unpack("<I", f"the rank of tensor {name!r}")
            dims = [cur.unpack("<Q", f"the shape of tensor {name!r}") for _ in range(n_dims)]
            type_id = cur.unpack("<I", f"the type of tensor {name!r}")
            entries.append((name, dims, type_id, cur.unpack("<Q", f"the offset of tensor {name!r}")))
        alignment = self.metadata.get("general.alignment", gguf.GGUF_DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise CheckpointError(f"{self.path}: metadata 'general.alignment' is {alignment!r}, not a power of two")
        data_start = -(-cur.pos // alignment) * alignment
        self.tensors: dict[str, TensorInfo] = {}
        for name, dims, type_id, rel in entries:
            if name in self.tensors:
                raise CheckpointError(f"{self.path}: tensor {name!r} appears twice in the tensor table")
            self.tensors[name] = self._tensor_info(name, dims, type_id, data_start + rel)

    def _tensor_info(self, name: str, dims: list[int], type_id: int, offset: int) -> TensorInfo:
        try:
            ttype = GGMLType(type_id)
        except ValueError:
            raise CheckpointError(
                f"{self.path}: tensor {name!r} has GGML type id {type_id}, which is no known GGML type: the file "
                f"is corrupt or newer than this `gguf` package. lfm2 reads {', '.join(t.name for t in READ_TYPES)}"
            ) from None
        block, type_size = gguf.GGML_QUANT_SIZES[ttype]
        shape = tuple(reversed(dims))
        numel = int(np.prod(dims, dtype=np.int64)) if dims else 1
        if dims and dims[0] % block:
            raise CheckpointError(
                f"{self.path}: tensor {name!r} of type {ttype.name} has rows of {dims[0]} values, not a multiple "
                f"of the type's block of {block}: the tensor table is corrupt"
            )
        nbytes = numel // block * type_size
        if offset + nbytes > len(self._map):
            raise CheckpointError(
                f"{self.path}: tensor {name!r} ({ttype.name} {list(shape)}) needs bytes {offset}..{offset + nbytes} "
                f"but the file has only {len(self._map)} bytes: the file is truncated (re-download or re-convert it)"
            )
        return TensorInfo(name, ttype, shape, offset, nbytes)

    def raw(self, name: str) -> np.ndarray:
        """The bytes of a tensor, as a uint8 view of the map."""
        info = self.tensors[name]
        return self._map[info.offset : info.offset + info.nbytes]

    def release(self, name: str) -> None:
        """Drop the pages of a tensor whose bytes were copied out from this process's resident memory.

        Read pages of the map stay resident (and count in the process's peak) until unmapped: without
        this, loading a Q8_0 file peaked at its weights plus the whole file (LFM2-1.2B: 2.76 GiB
        against llama.cpp's 1.26). Only whole pages inside the tensor go, and only for tensors nothing
        holds a view of: a later read faults them in again from the file (nothing here writes to the map)."""
        info = self.tensors[name]
        view = getattr(self._map, "_mmap", None)
        if view is None or not hasattr(view, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
            return
        start = -(-info.offset // mmap.PAGESIZE) * mmap.PAGESIZE
        end = (info.offset + info.nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
        if end > start:
            view.madvise(mmap.MADV_DONTNEED, start, end - start)

    def maps(self, t: torch.Tensor) -> bool:
        """Whether `t` is a view of this file's map (a tensor `tensor` gave without a copy)."""
        base = self._map.ctypes.data
        return t.device.type == "cpu" and base <= t.untyped_storage().data_ptr() < base + len(self._map)

    def read_into(self, name: str, out: np.ndarray, start: int = 0) -> None:
        """Bytes start .. start + out.nbytes of a tensor's data into `out` (contiguous), with plain reads
        (`lfm2.weights.read_exact`). Through the map, each page read was a fault that mapped it (and the page
        cache's folio around it) into this process until released, and a tensor copied out whole was resident
        twice, map and copy (LFM2-1.2B Q8_0's 142 MB embedding: +130 MiB at the load's peak)."""
        info = self.tensors[name]
        if start < 0 or start + out.nbytes > info.nbytes:
            raise ValueError(f"bytes {start}..{start + out.nbytes} are outside tensor {name!r} ({info.nbytes} bytes)")
        with open(self.path, "rb", buffering=0) as fh:
            read_exact(fh, info.offset + start, torch.from_numpy(out), self.path, name)

    def row_chunks(self, name: str) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, (rows, bytes a row) uint8 array) over a tensor's rows (its innermost dimension's
        blocks; leading dimensions flattened), about CHUNK_BYTES at a time, read (`read_into`) into one
        buffer that the next chunk overwrites: the caller copies a chunk out before asking for the next."""
        info = self.tensors[name]
        row_bytes = info.nbytes // max(1, int(np.prod(info.shape[:-1], dtype=np.int64)))
        total = info.nbytes // row_bytes
        step = max(1, CHUNK_BYTES // row_bytes)
        buf = np.empty((min(step, total), row_bytes), dtype=np.uint8)
        for r in range(0, total, step):
            chunk = buf[: min(step, total - r)]
            self.read_into(name, chunk, r * row_bytes)
            yield r, chunk

    def tensor(self, name: str) -> torch.Tensor:
        """A tensor's values: F32/F16/BF16 as stored (F32 without a copy), quantized types as float32."""
        info = self.tensors[name]
        check_type(self.path, info)
        raw = self.raw(name)
        if info.type == GGMLType.F32:
            return torch.from_numpy(raw.view(np.float32).reshape(info.shape))
        if info.type == GGMLType.F16:
            return torch.from_numpy(raw.view(np.float16).reshape(info.shape))
        if info.type == GGMLType.BF16:
            return torch.from_numpy(raw.view(np.int16).reshape(info.shape)).view(torch.bfloat16)
        blocks = raw.reshape(gguf.quant_shape_to_byte_shape(info.shape, info.type))
        return torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(blocks, info.type)))

    def quantized_rows(self, name: str, rows: int) -> Iterator[torch.Tensor]:
        """A 2-D quantized tensor's values as float32, `rows` rows at a time: `gguf.quants` makes
        several temporaries the size of what it dequantizes, so a 65,536-row embedding read whole
        would briefly take gigabytes."""
        info = self.tensors[name]
        check_type(self.path, info)
        blocks = self.raw(name).reshape(gguf.quant_shape_to_byte_shape(info.shape, info.type))
        for r in range(0, blocks.shape[0], rows):
            yield torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(blocks[r : r + rows], info.type)))


def check_type(path: Path, info: TensorInfo) -> None:
    if info.type not in READ_TYPES:
        raise CheckpointError(
            f"{path}: tensor {info.name!r} is stored as {info.type.name} (GGML type id {int(info.type)}), which "
            f"lfm2 cannot dequantize; it reads {', '.join(t.name for t in READ_TYPES)}. Re-quantize the model to one "
            "of these (llama.cpp's llama-quantize), or convert it from the original checkpoint with `lfm2 convert`"
        )


# -- config ----------------------------------------------------------------------------------------


def _arch(f: GGUFFile) -> str:
    arch = f.metadata.get("general.architecture")
    if arch == "clip":
        raise ConfigError(
            f"{f.path}: this is an mmproj file (the vision part of a multimodal model), not a language model; "
            "load the text model's .gguf and pass this file as its mmproj (lfm2.load(model, mmproj=...), "
            "--mmproj on the command line)"
        )
    if arch not in ARCHITECTURES:
        raise ConfigError(
            f"{f.path}: architecture {arch!r} (metadata key 'general.architecture') is not supported; "
            f"lfm2 reads GGUF files of architecture {' and '.join(map(repr, ARCHITECTURES))}"
        )
    return arch


def _key(f: GGUFFile, key: str, kind: type = int, default: Any = ...) -> Any:
    if key not in f.metadata:
        if default is ...:
            raise ConfigError(
                f"{f.path}: metadata key {key!r} is missing; llama.cpp's converter writes it for this architecture"
            )
        return default
    value = f.metadata[key]
    values = value if isinstance(value, list) else [value]
    accepted = (int, float) if kind is float else kind  # an integer where a float is expected is fine
    if not values or not all(isinstance(v, accepted) and not isinstance(v, bool) for v in values):
        raise ConfigError(f"{f.path}: metadata key {key!r} is {value!r:.100}, expected {kind.__name__}")
    return value


def _per_block(f: GGUFFile, key: str, n_layer: int) -> list[int]:
    value = _key(f, key)
    if not isinstance(value, list):
        return [value] * n_layer
    if len(value) != n_layer:
        raise ConfigError(f"{f.path}: metadata key {key!r} has {len(value)} entries, not one per block ({n_layer})")
    return value


def _uniform(f: GGUFFile, key: str, values: list[int]) -> int:
    if len(set(values)) > 1:
        raise ConfigError(f"{f.path}: metadata key {key!r} varies across blocks ({values}); LFM2 uses one value")
    return values[0]


def config_from_gguf(f: GGUFFile) -> ModelConfig:
    """The model config that a GGUF file's metadata (and its tensor table) describes."""
    arch = _arch(f)
    n_layer = _key(f, f"{arch}.block_count")
    kv = _per_block(f, f"{arch}.attention.head_count_kv", n_layer)
    heads = _uniform(f, f"{arch}.attention.head_count", _per_block(f, f"{arch}.attention.head_count", n_layer))
    attn_kv = [k for k in kv if k > 0]
    hidden = _key(f, f"{arch}.embedding_length")
    tokens = f.metadata.get("tokenizer.ggml.tokens")
    if isinstance(tokens, list):
        vocab = len(tokens)
    elif "token_embd.weight" in f.tensors:
        vocab = f.tensors["token_embd.weight"].shape[0]
    else:
        vocab = _key(f, f"{arch}.vocab_size")
    cfg: dict[str, Any] = dict(
        model_type=ARCHITECTURES[arch],
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=n_layer,
        num_attention_heads=heads,
        num_key_value_heads=_uniform(f, f"{arch}.attention.head_count_kv", attn_kv) if attn_kv else heads,
        head_dim=_key(f, f"{arch}.attention.key_length", default=0),
        # Per-block arrays may hold 0 for the MoE blocks; the dense blocks share one width.
        intermediate_size=_uniform(
            f, f"{arch}.feed_forward_length", [n for n in _per_block(f, f"{arch}.feed_forward_length", n_layer) if n]
            or [0]
        ),
        layer_types=["full_attention" if k > 0 else "conv" for k in kv],
        conv_L_cache=_key(f, f"{arch}.shortconv.l_cache"),
        conv_bias=False,  # llama.cpp's LFM2 graph has no conv biases
        norm_eps=float(_key(f, f"{arch}.attention.layer_norm_rms_epsilon", float)),
        rope_theta=float(_key(f, f"{arch}.rope.freq_base", float, 10_000.0)),  # llama.cpp's default
        max_position_embeddings=_key(f, f"{arch}.context_length"),
        tie_word_embeddings="output.weight" not in f.tensors,
        bos_token_id=f.metadata.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=f.metadata.get("tokenizer.ggml.eos_token_id"),
        pad_token_id=f.metadata.get("tokenizer.ggml.padding_token_id"),
    )
    if arch == "lfm2moe":
        gating = _key(f, f"{arch}.expert_gating_func", default=int(gguf.ExpertGatingFuncType.SIGMOID))
        if gating != gguf.ExpertGatingFuncType.SIGMOID:
            raise ConfigError(
                f"{f.path}: metadata key '{arch}.expert_gating_func' is {gating}, expected "
                f"{int(gguf.ExpertGatingFuncType.SIGMOID)} (sigmoid), the only gating LFM2-MoE uses"
            )
        moe_ff = _key(f, f"{arch}.expert_feed_forward_length")
        cfg.update(
            num_experts=_key(f, f"{arch}.expert_count"),
            num_experts_per_tok=_key(f, f"{arch}.expert_used_count"),
            moe_intermediate_size=_uniform(f, f"{arch}.expert_feed_forward_length", moe_ff)
            if isinstance(moe_ff, list) else moe_ff,
            num_dense_layers=_key(f, f"{arch}.leading_dense_block_count", default=0),
            # What llama.cpp's lfm2moe graph does: weights always renormalized, never scaled,
            # experts chosen with the `exp_probs_b` bias.
            norm_topk_prob=True,
            routed_scaling_factor=1.0,
            use_expert_bias=True,
        )
    try:
        return ModelConfig(**cfg)
    except ConfigError as e:
        raise ConfigError(f"{f.path}: the metadata describes an invalid model: {e}") from None


# -- the name table applied to a config ------------------------------------------------------------


def tensor_plan(config: ModelConfig) -> list[tuple[str, list[str]]]:
    """(GGUF name, our names) for every tensor of a model of this config: the model-level tensors,
    then block by block. A GGUF tensor maps to one of ours, or, for stacked experts, one per expert."""
    plan = [(g, [ours]) for g, ours, where in NAME_TABLE
            if where == "model" or (where == "untied" and not config.tie_word_embeddings)]
    for i, layer_type in enumerate(config.layer_types):
        moe = config.is_moe and i >= config.num_dense_layers
        has = {"block": True, "conv": layer_type == "conv", "attention": layer_type == "full_attention",
               "dense_ffn": not moe, "moe": moe}
        for gname, ours, where in NAME_TABLE:
            if has.get(where, False):
                experts = range(config.num_experts) if "{e}" in ours else [0]
                plan.append((gname.format(i=i), [ours.format(i=i, e=e) for e in experts]))
    return plan


def _stacked(gname: str) -> bool:
    return "_exps." in gname


def _is_conv_kernel(gname: str) -> bool:
    return gname.endswith(".shortconv.conv.weight")


def _gguf_shape(gname: str, ours: list[tuple[int, ...]]) -> tuple[int, ...]:
    if _stacked(gname):
        return (len(ours), *ours[0])
    if _is_conv_kernel(gname):
        d, _, L = ours[0]
        return (d, L)
    return ours[0]


def _to_ours(gname: str, t: torch.Tensor) -> list[torch.Tensor]:
    if _stacked(gname):
        return list(t.unbind(0))  # (E, out, in) -> E x (out, in), views
    if _is_conv_kernel(gname):
        return [t.unsqueeze(1)]  # (d, L) -> (d, 1, L)
    return [t]


def _to_gguf(gname: str, ts: list[torch.Tensor]) -> torch.Tensor:
    if _stacked(gname):
        return torch.stack(ts)  # E x (out, in) -> (E, out, in)
    if _is_conv_kernel(gname):
        return ts[0].squeeze(1)  # (d, 1, L) -> (d, L)
    return ts[0]


def _keep_fp32(name: str) -> bool:
    """The MoE router and expert bias stay float32 whatever the model dtype, as `cast_model` keeps them."""
    return name.endswith(("feed_forward.gate.weight", "expert_bias"))


# -- loading ---------------------------------------------------------------------------------------


def _why_expected(gname: str, config: ModelConfig) -> str:
    if not gname.startswith("blk."):
        return "every model has"
    i = int(gname.split(".")[1])
    kind = "an attention" if config.layer_types[i] == "full_attention" else "a conv"
    ffn = "mixture-of-experts" if config.is_moe and i >= config.num_dense_layers else "dense"
    return f"the metadata says block {i} has ({kind} block with a {ffn} feed-forward)"


def _resolve_names(f: GGUFFile, config: ModelConfig) -> list[tuple[str, str, list[str]]]:
    """(name in the file, canonical GGUF name, our names), after checking every tensor's presence,
    shape and type against the config. Nothing is read before this passes."""
    expected = {k: tuple(v.shape) for k, v in build_model(config, "meta").state_dict().items()}
    resolved, used = [], set()
    for gname, ours in tensor_plan(config):
        present = [n for n in (gname, *ALIASES.get(gname, ())) if n in f.tensors]
        if not present:
            what = f"{ours[0]!r}" + (f" and the other {len(ours) - 1} experts" if len(ours) > 1 else "")
            raise CheckpointError(
                f"{f.path}: tensor {gname!r} is missing; it holds our {what}, which {_why_expected(gname, config)}"
            )
        src = present[0]
        info = f.tensors[src]
        want = _gguf_shape(gname, [expected[n] for n in ours])
        if info.shape != want:
            raise CheckpointError(
                f"{f.path}: tensor {src!r} has shape {list(info.shape)}, expected {list(want)} from the metadata "
                f"(it holds our {ours[0]!r})"
            )
        check_type(f.path, info)
        resolved.append((src, gname, ours))
        used.add(src)
    unexpected = [n for n in f.tensors if n not in used]
    if unexpected:
        more = f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else ""
        shown = ", ".join(map(repr, unexpected[:5])) + more
        raise CheckpointError(
            f"{f.path}: unexpected tensor(s) {shown}: not part of an {_arch(f)} language model with this metadata"
        )
    return resolved


# Bytes of a tensor converted at once as it is read (`GGUFFile.row_chunks`).
CHUNK_BYTES = 16 * 2**20
# Float32 bytes dequantized at once when a matrix is requantized as it is read (`load_model`).
REQUANT_CHUNK_BYTES = 16 * 2**20
# GGUF block types that are our quantized layouts byte for byte (group size 32), by our format name.
DIRECT_TYPES = {"int8": GGMLType.Q8_0, "int4": GGMLType.Q4_0}
# The embedding's and an untied head's format from their block type, whatever the layers' `quantize`.
DIRECT_KINDS = {t: kind for kind, t in DIRECT_TYPES.items()}


def load_model(f: GGUFFile, config: ModelConfig, dtype: torch.dtype, device: torch.device | str = "cpu",
               progress: bool | None = None, quantize: str | None = None, group_size: int | None = 32,
               kquants: bool = False) -> torch.nn.Module:
    """The model with the file's weights, after checking every tensor.

    Without `quantize`, every weight is dequantized to `dtype`. With `quantize` ("int8" or
    "int4"), tensors stored in the matching GGUF block type (Q8_0 / Q4_0, at group size 32)
    become quantized layers directly from the file's blocks, never passing through float32;
    the embedding / head likewise when stored as Q8_0 or Q4_0, whatever `quantize` (our int4 models
    keep it in int8, as most Q4_0 files do). Matrices in other block types (the K-quants of Q4_K_M /
    Q5_K_M / Q6_K files, Q4_1, Q5_0, ...) are requantized one tensor at a time as they are read (the
    embedding and an untied head to int8; a 2-D matrix a few MiB of rows at a time, stacked MoE
    experts tensor by tensor), so no float32 copy of the model is ever in memory; whatever remains
    float (F32/F16/BF16 matrices) is then quantized by `quantize_model`.

    With `kquants` (a CPU load in the file's own format, with the kernels built), Q4_K / Q5_K /
    Q6_K matrices, the embedding and an untied head among them, are kept as the file's blocks in
    `lfm2.kquant` layers instead of being requantized.
    """
    from lfm2 import kquant, quant

    resolved = _resolve_names(f, config)
    model = build_model(config, "meta")
    cast_model(model, dtype)
    linear = {f"{n}.weight" for n, m in model.named_modules() if is_plain_linear(m) and n != "lm_head"}
    direct: dict[str, str] = {}  # GGUF name -> our format, for tensors taken as they are
    requantized: dict[str, str] = {}  # GGUF name -> our format, for other block types, per tensor
    kept: set[str] = set()  # GGUF names of K-quant matrices kept as they are
    if quantize is not None:
        for src, _, ours in resolved:
            ttype = f.tensors[src].type
            embedding = ours == ["model.embed_tokens.weight"]
            matrix = embedding or ours == ["lm_head.weight"] or all(o in linear for o in ours)
            if kquants and matrix and kquant.supports(ttype, f.tensors[src].shape[-1]):
                kept.add(src)
            elif group_size == 32 and (embedding or ours == ["lm_head.weight"]) and ttype in DIRECT_KINDS:
                # as the file stores them: requantizing Q4_0 values to int8 moved them (teacher-forced top-1 against
                # llama.cpp on its own Q4_0 file, 1,024 positions: 95.0% -> 96.7%; docs/benchmarks.md)
                direct[src] = DIRECT_KINDS[ttype]
            elif group_size == 32 and all(o in linear for o in ours) and ttype == DIRECT_TYPES[quantize]:
                direct[src] = quantize
            elif ttype in QUANT_TYPES and matrix:
                # the embedding and an untied head stay int8, as in our int4 models and llama.cpp's files
                requantized[src] = quantize if all(o in linear for o in ours) else "int8"
    total = sum(f.tensors[src].nbytes for src, _, _ in resolved)
    # On the CPU the blocks taken as they are (nearly all of a quantized file) go straight into their slots of
    # one huge-page arena, which `move_to_huge_pages` below then leaves alone: moving them after the load
    # would hold the largest (the embedding) twice at the load's peak (LFM2-1.2B Q8_0: +113 MiB).
    cpu = torch.device(device).type == "cpu"
    arena = WeightArena(_block_specs(f, kept, direct)) if cpu and use_huge_pages() and (kept or direct) else None
    disable = total < PROGRESS_BYTES if progress is None else not progress
    state = {}
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"loading {f.path.name}", disable=disable) as bar:
        for src, gname, ours in resolved:
            if src in kept:
                info = f.tensors[src]
                K = info.shape[-1]
                rows = (-1, info.shape[-2], kquant.row_bytes(info.type, K))  # (experts or 1, N, bytes)
                blocks = _copy_blocks(f, src, arena).reshape(rows)
                for e, name in enumerate(ours):  # stacked MoE experts: one layer per expert
                    _put_kquant(model, name, blocks[e].to(device), info.type, K, dtype)
            elif src in direct:
                qweight, scales = (t.to(device) for t in _copy_direct(f, src, arena))
                for e, name in enumerate(ours):
                    q, sc = (qweight[e], scales[e]) if len(ours) > 1 else (qweight, scales)
                    _put_quantized(model, name, q, sc, dtype)
            elif src in requantized and len(ours) == 1 and len(f.tensors[src].shape) == 2:
                # row by row (quantization is), a few MiB of float32 at a time
                chunk = max(1, REQUANT_CHUNK_BYTES // (4 * f.tensors[src].shape[-1]))
                parts = [quant.quantize_weight(t, requantized[src], group_size)
                         for t in f.quantized_rows(src, chunk)]
                q, sc = (torch.cat([p[i] for p in parts]).to(device) for i in (0, 1))
                _put_quantized(model, ours[0], q, sc, dtype)
            elif src in requantized:
                for name, t in zip(ours, _to_ours(gname, f.tensor(src)), strict=True):
                    q, sc = quant.quantize_weight(t.float(), requantized[src], group_size)
                    _put_quantized(model, name, q.to(device), sc.to(device), dtype)
            else:
                for name, t in zip(ours, _to_ours(gname, f.tensor(src)), strict=True):
                    t = t.to(device=device, dtype=torch.float32 if _keep_fp32(name) else dtype)
                    # A quantized model's few float tensors (norms, conv kernels) are copied out too: moved to huge
                    # pages from the map later, each would map the file's pages around it (a large folio at a time:
                    # LFM2-350M Q8_0, 65 MiB of other tensors' pages at the load's peak).
                    state[name] = t.clone() if arena is not None and f.maps(t) else t
            if src in requantized or arena is not None:  # pages of the map read for it (kept / direct: plain reads)
                f.release(src)
            bar.update(f.tensors[src].nbytes)
    embedding_direct = isinstance(model.model.embed_tokens, quant.QuantEmbedding | kquant.KQuantEmbedding)
    if config.tie_word_embeddings:
        if embedding_direct:
            model.lm_head = quant.TiedQuantHead(model.model.embed_tokens)
        else:
            state["lm_head.weight"] = state["model.embed_tokens.weight"]
    expected = {k for k, v in model.state_dict(keep_vars=True).items() if v.is_meta}
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:  # cannot happen after _resolve_names; a guard against mapping bugs
        raise CheckpointError(f"{f.path}: internal mapping error (missing {sorted(missing)[:3]}, "
                              f"unexpected {sorted(unexpected)[:3]})")
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings and not embedding_direct:  # assign=True replaced the shared Parameter
        model.lm_head.weight = model.model.embed_tokens.weight
    if quantize is not None:
        quant.quantize_model(model, quantize, group_size)
    if cpu and isinstance(model.model.embed_tokens, quant.QuantEmbedding | kquant.KQuantEmbedding):  # quantized
        move_to_huge_pages(model, skip=arena)  # weights made in memory from the file's blocks (see lfm2.weights)
    return model.eval()


def _block_specs(f: GGUFFile, kept: set[str], direct: dict[str, str]) -> list[tuple[tuple[int, ...], torch.dtype]]:
    """The (shape, dtype) of what `_copy_blocks` and `_copy_direct` make of these tensors: the arena's slots."""
    specs: list[tuple[tuple[int, ...], torch.dtype]] = []
    for src, info in f.tensors.items():
        if src in kept:
            specs.append(((info.nbytes,), torch.uint8))
        elif src in direct:
            specs += _direct_specs(info)
    return specs


def _direct_specs(info: TensorInfo) -> list[tuple[tuple[int, ...], torch.dtype]]:
    """(qweight, scales) shapes and dtypes of a Q8_0 / Q4_0 tensor in our layout (`quant.from_gguf_q8_0`)."""
    *lead, K = info.shape
    q8 = info.type == GGMLType.Q8_0
    return [((*lead, K if q8 else K // 2), torch.int8 if q8 else torch.uint8), ((*lead, K // 32), torch.float16)]


def _take(arena: WeightArena | None, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype) if arena is None else arena.take(shape, dtype)


def _copy_blocks(f: GGUFFile, src: str, arena: WeightArena | None) -> torch.Tensor:
    """A tensor's bytes (flat uint8), read into their slot (`GGUFFile.read_into`)."""
    out = _take(arena, (f.tensors[src].nbytes,), torch.uint8)
    f.read_into(src, out.numpy())
    return out


def _copy_direct(f: GGUFFile, src: str, arena: WeightArena | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(qweight, scales) of a Q8_0 / Q4_0 tensor in our layout, converted a chunk of rows at a time."""
    from lfm2 import quant

    info = f.tensors[src]
    to_packed = quant.from_gguf_q8_0 if info.type == GGMLType.Q8_0 else quant.from_gguf_q4_0
    q, sc = (_take(arena, shape, dtype) for shape, dtype in _direct_specs(info))
    rows_q, rows_sc = q.view(-1, q.shape[-1]), sc.view(-1, sc.shape[-1])
    for r, chunk in f.row_chunks(src):
        cq, csc = to_packed(chunk, (chunk.shape[0], info.shape[-1]))
        rows_q[r : r + chunk.shape[0]] = cq
        rows_sc[r : r + chunk.shape[0]] = csc
    return q, sc


def _put_quantized(model: torch.nn.Module, name: str, qweight: torch.Tensor, scales: torch.Tensor,
                   dtype: torch.dtype) -> None:
    """Put a quantized layer made of `qweight`/`scales` where weight `name` of `model` goes."""
    from lfm2 import quant

    module = name.removesuffix(".weight")
    if module == "model.embed_tokens":
        layer = quant.QuantEmbedding.from_packed(qweight, scales)
    else:
        layer = quant.QuantLinear.from_packed(qweight, scales)
    layer.dtype = dtype
    parent, _, attr = module.rpartition(".")
    setattr(model.get_submodule(parent), attr, layer)


def _put_kquant(model: torch.nn.Module, name: str, blocks: torch.Tensor, ggml_type: int, in_features: int,
                dtype: torch.dtype) -> None:
    """Put a K-quant layer of `blocks` where weight `name` of `model` goes."""
    from lfm2 import kquant

    module = name.removesuffix(".weight")
    cls = kquant.KQuantEmbedding if module == "model.embed_tokens" else kquant.KQuantLinear
    layer = cls.from_blocks(blocks, ggml_type, in_features)
    layer.pack_tiles()  # Q4_K into the decode kernel's 16-row tiles where that is faster (in place)
    layer.dtype = dtype
    parent, _, attr = module.rpartition(".")
    setattr(model.get_submodule(parent), attr, layer)


# -- tokenizer -------------------------------------------------------------------------------------


@dataclass
class GGUFVocab:
    """The tokenizer a GGUF file carries, rebuilt for the `tokenizers` library."""

    tokenizer: HFTokenizer
    special_tokens: dict[str, str]
    chat_template: str | dict[str, str] | None
    add_bos: bool
    add_eos: bool
    extra_eos_ids: list[int] = field(default_factory=list)


def build_vocab_tokenizer(
    tokens: Sequence[str], types: Sequence[int], merges: Sequence[str], bos: str | None, eos: str | None,
    add_bos: bool, add_eos: bool, where: str,
) -> HFTokenizer:
    """A byte-level BPE `tokenizers.Tokenizer` from a GGUF-style vocabulary, encoding as llama.cpp's
    `lfm2` pre-tokenizer does (the pipeline of `lfm2.bpe`)."""
    vocab: dict[str, int] = {}
    for i, (token, ttype) in enumerate(zip(tokens, types, strict=True)):
        if ttype != TokenType.UNUSED:  # placeholders for ids the original tokenizer never had
            vocab.setdefault(token, i)
    pairs = []
    for n, merge in enumerate(merges):
        a, sep, b = merge.partition(" ")
        if not sep or not a or not b:
            raise TokenizerError(f"{where}: merge {n} is {merge!r}, expected two tokens separated by one space")
        pairs.append((a, b))
    tok = build_tokenizer()
    try:
        tok.model = models.BPE(vocab=vocab, merges=pairs, ignore_merges=True)
    except Exception as e:  # the Rust side raises a bare Exception, e.g. for a merge of unknown tokens
        raise TokenizerError(f"{where}: the vocabulary and merges do not form a BPE model: {e}") from None
    control = [AddedToken(tokens[i], special=True, normalized=False)
               for i, t in enumerate(types) if t == TokenType.CONTROL]
    user = [AddedToken(tokens[i], special=False, normalized=False)
            for i, t in enumerate(types) if t == TokenType.USER_DEFINED]
    tok.add_special_tokens(control)
    tok.add_tokens(user)
    ends = [(bos, add_bos), (eos, add_eos)]
    for token, wanted in ends:
        if wanted and token is None:
            raise TokenizerError(f"{where}: the file asks to add a BOS/EOS token but does not say which one")
    if add_bos or add_eos:
        head = [f"{bos}:0"] if add_bos else []
        tail = [f"{eos}:0"] if add_eos else []
        single = [*head, "$A:0", *tail]
        pair = [*single, *(p.replace(":0", ":1") for p in head), "$B:1", *(p.replace(":0", ":1") for p in tail)]
        specials = {t: vocab[t] for t, wanted in ends if wanted}
        tok.post_processor = processors.TemplateProcessing(
            single=single, pair=pair, special_tokens=list(specials.items())
        )
    return tok


def vocab_from_gguf(f: GGUFFile) -> GGUFVocab | None:
    """The file's tokenizer, or None for a file without a vocabulary."""
    meta, where = f.metadata, str(f.path)
    model = meta.get("tokenizer.ggml.model")
    if model is None:
        return None
    if model != "gpt2":
        raise TokenizerError(
            f"{where}: tokenizer model {model!r} (metadata key 'tokenizer.ggml.model') is not supported; "
            "LFM2 files use 'gpt2' (byte-level BPE)"
        )
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in _LLAMA3_PRE:
        raise TokenizerError(
            f"{where}: pre-tokenizer {pre!r} (metadata key 'tokenizer.ggml.pre') is not supported; LFM2 files "
            f"use 'lfm2' (the Llama-3 split regex); lfm2 reads {', '.join(_LLAMA3_PRE)}"
        )
    tokens = meta.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
        raise TokenizerError(f"{where}: metadata key 'tokenizer.ggml.tokens' is missing or not a list of strings")
    types = meta.get("tokenizer.ggml.token_type", [int(TokenType.NORMAL)] * len(tokens))
    if len(types) != len(tokens):
        raise TokenizerError(
            f"{where}: 'tokenizer.ggml.token_type' has {len(types)} entries, 'tokenizer.ggml.tokens' {len(tokens)}"
        )
    special = {}
    for name, key in _SPECIAL_KEYS:
        tid = meta.get(key)
        if tid is None:
            continue
        if not isinstance(tid, int) or not 0 <= tid < len(tokens):
            raise TokenizerError(f"{where}: metadata key {key!r} is {tid!r}, not an id below {len(tokens)}")
        special[name] = tokens[tid]
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", True))  # llama.cpp's default for these pre-tokenizers
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    tok = build_vocab_tokenizer(tokens, types, meta.get("tokenizer.ggml.merges", []), special.get("bos_token"),
                                special.get("eos_token"), add_bos, add_eos, where)
    template: str | dict[str, str] | None = meta.get("tokenizer.chat_template")
    prefix = "tokenizer.chat_template."
    named = {k[len(prefix) :]: v for k, v in meta.items() if k.startswith(prefix)}
    if named:
        template = {**({"default": template} if template is not None else {}), **named}
    extra = [meta["tokenizer.ggml.eot_token_id"]] if isinstance(meta.get("tokenizer.ggml.eot_token_id"), int) else []
    return GGUFVocab(tok, special, template, add_bos, add_eos, extra)


def tokenizer_from_gguf(f: GGUFFile) -> Tokenizer | None:
    """Our `Tokenizer` for the file's vocabulary, or None for a file without one."""
    v = vocab_from_gguf(f)
    if v is None:
        return None
    return Tokenizer(v.tokenizer, v.special_tokens, v.chat_template, v.extra_eos_ids, name=str(f.path))


def generation_defaults_from_gguf(f: GGUFFile) -> dict[str, Any]:
    """The `general.sampling.*` defaults, under generation_config.json's names."""
    return {name: f.metadata[key] for name, key in _SAMPLING_KEYS.items() if key in f.metadata}


# -- public entry points for reading --------------------------------------------------------------


def read_gguf(path: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
              progress: bool | None = None, quantize: str | None = None, group_size: int | None = 32,
              native: bool = False) -> tuple[ModelConfig, torch.nn.Module, Tokenizer | None, GGUFFile]:
    """(config, model, tokenizer or None, the `GGUFFile`) of a GGUF file, every tensor checked first.
    `native` (and no `quantize`): the file's own format where lfm2 has kernels for it (`native_format`)."""
    from lfm2 import kernels

    f = GGUFFile(path)
    config = config_from_gguf(f)
    tokenizer = tokenizer_from_gguf(f)
    own = native_format(f) if quantize is None and native and group_size == 32 else None
    kquants = own is not None and kernels.ops() is not None  # without the kernels, int8 layers decode faster
    try:
        model = load_model(f, config, dtype, device, progress, quantize or own, group_size, kquants)
    except ConfigError:
        if own is None:
            raise
        # a layer whose width 32-value groups do not divide: the file's format cannot hold it, read it as float
        model = load_model(f, config, dtype, device, progress, None, group_size)
    return config, model, tokenizer, f


def native_format(f: GGUFFile) -> str | None:
    """The lfm2 format a quantized file runs in by default: "int4" when most of its weight matrices'
    bytes are Q4_0 blocks (taken as they are), "int8" when Q8_0 (likewise) or another block type,
    None for float files (F32/F16/BF16). In a K-quant file (Q4_K_M / Q5_K_M / Q6_K) "int8" is the
    format of what is not Q4_K / Q5_K / Q6_K: those blocks stay as they are where the kernels built
    (`load_model`'s `kquants`). Other block types (Q4_1, Q5_0, ...), and K-quants without the
    kernels, are requantized to int8 as they are read: 8.5 bits a weight instead of float32's 32,
    and their 4-6 bit values fit int8 at a fraction of a step."""
    sizes: dict[int, int] = {}
    for name, info in f.tensors.items():
        if name.startswith("blk.") and name.endswith(".weight") and len(info.shape) >= 2:
            sizes[info.type] = sizes.get(info.type, 0) + info.nbytes
    if not sizes:
        return None
    main = max(sizes, key=sizes.get)
    direct = next((kind for kind, ttype in DIRECT_TYPES.items() if ttype == main), None)
    return direct or ("int8" if main in QUANT_TYPES else None)


def load_gguf(
    path: str | os.PathLike, dtype: str | torch.dtype | None = None, device: str | torch.device = "cpu",
    quantize: str | None = None, group_size: int | None = 32, native: bool = False,
    mmproj: str | os.PathLike | None = None,
) -> Loaded:
    """What `lfm2.load()` makes an `LLM` of for a `.gguf` file: the file's model, config and tokenizer,
    and its `general.sampling.*` keys as the sampling defaults (a GGUF file has no
    generation_config.json beside it). With `mmproj`, an LFM2-VL mmproj file, also the vision model
    around the language model and its image processor (`lfm2.mmproj.load_mmproj`; the mmproj file's
    header is checked before the text model is read).

    Quantized weights are dequantized to `dtype` (float32 on CPU by default, bfloat16 on
    accelerators); float32 weights loaded as float32 stay memory-mapped. With `quantize`, Q8_0 /
    Q4_0 tensors become int8 / int4 layers as they are (see `load_model`). With `native` and no
    `quantize`, a CPU load keeps the file's own format where lfm2 has kernels for it
    (`native_format`): a Q4_0 file runs as int4 from its blocks, at a quarter of float32's memory,
    as llama.cpp runs it, rather than dequantized.
    """
    device = parse_device(device)
    dtype = parse_dtype(dtype, device)
    vision_file = None
    if mmproj is not None:
        from lfm2.mmproj import check_is_lfm2_mmproj, load_mmproj

        vision_file = GGUFFile(mmproj)
        check_is_lfm2_mmproj(vision_file)
    config, model, tokenizer, f = read_gguf(path, dtype, device, quantize=quantize,
                                            group_size=group_size, native=native and device.type == "cpu")
    loaded = Loaded(model=model, config=config, tokenizer=tokenizer, path=f.path,
                    generation_defaults=generation_defaults_from_gguf(f))
    if vision_file is not None:
        loaded.vision, loaded.image_processor = load_mmproj(vision_file, model, config, tokenizer, dtype, device,
                                                            text_path=f.path)
    return loaded


def import_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, dtype: torch.dtype | None = None,
                progress: bool = True, mmproj: str | os.PathLike | None = None) -> Path:
    """Write a GGUF file as a Hugging Face checkpoint directory, dequantized.

    Writes config.json, model.safetensors, tokenizer.json, tokenizer_config.json (with the chat
    template) and special_tokens_map.json, each atomically. `dtype` defaults to float32, which
    holds every GGUF value exactly (an F16 file's norms and conv kernels are F32). With `mmproj`
    (an LFM2-VL text model's vision part), an LFM2-VL checkpoint: its config.json, every tensor under
    the released checkpoints' names, and processor_config.json with the file's preprocessing.
    """
    vision_file = None
    if mmproj is not None:
        from lfm2.mmproj import check_is_lfm2_mmproj, load_mmproj, processor_config

        vision_file = GGUFFile(mmproj)
        check_is_lfm2_mmproj(vision_file)  # before the text model is read
    f = GGUFFile(gguf_path)
    config = config_from_gguf(f)
    vocab = vocab_from_gguf(f)
    model = load_model(f, config, dtype or torch.float32, "cpu", progress)
    extra: dict[str, str] = {}
    if vocab is not None:
        tok_config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **vocab.special_tokens,
            "add_bos_token": vocab.add_bos,
            "add_eos_token": vocab.add_eos,
            "clean_up_tokenization_spaces": False,
            "model_max_length": config.max_position_embeddings,
        }
        if vocab.chat_template is not None:
            tok_config["chat_template"] = vocab.chat_template
        extra["tokenizer.json"] = vocab.tokenizer.to_str(pretty=True)
        extra["tokenizer_config.json"] = json.dumps(tok_config, indent=2, ensure_ascii=False) + "\n"
        extra["special_tokens_map.json"] = json.dumps(vocab.special_tokens, indent=2, ensure_ascii=False) + "\n"
    defaults = generation_defaults_from_gguf(f)
    if defaults:
        gen = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id,
               "pad_token_id": config.pad_token_id, "do_sample": True, **defaults}
        extra["generation_config.json"] = json.dumps(gen, indent=2) + "\n"
    if vision_file is not None:
        vision, processor = load_mmproj(vision_file, model, config, vocab.tokenizer if vocab else None,
                                        dtype or torch.float32, text_path=f.path)
        extra["processor_config.json"] = json.dumps(processor_config(processor), indent=2) + "\n"
        return save_checkpoint(vision, out_dir, extra_files=extra, names=vision.released_name)
    return save_checkpoint(model, out_dir, extra_files=extra)


# -- writing ---------------------------------------------------------------------------------------


def _check_exportable(config: ModelConfig, src: Path) -> None:
    """Refuse configs llama.cpp's LFM2 graph cannot run, rather than write a file it runs wrongly."""
    problems = []
    if config.conv_bias:
        problems.append("conv_bias is true (llama.cpp's short convolution has no biases)")
    if config.head_dim * config.num_attention_heads != config.hidden_size:
        problems.append(f"head_dim {config.head_dim} x {config.num_attention_heads} heads != hidden_size "
                        f"{config.hidden_size} (llama.cpp needs them equal)")
    if config.is_moe:
        if not config.norm_topk_prob:
            problems.append("norm_topk_prob is false (llama.cpp's lfm2moe always renormalizes the expert weights)")
        if config.routed_scaling_factor != 1.0:
            problems.append(
                f"routed_scaling_factor is {config.routed_scaling_factor} (llama.cpp's lfm2moe never scales)"
            )
        if not config.use_expert_bias:
            problems.append("use_expert_bias is false (llama.cpp's lfm2moe requires the expert bias)")
    if problems:
        raise ConfigError(f"{src / 'config.json'}: cannot write a GGUF that llama.cpp would run correctly: "
                          + "; ".join(problems))


def _tensor_type(gname: str, shape: tuple[int, ...], wanted: GGMLType) -> GGMLType:
    """The GGUF type of one tensor, by llama.cpp's converter's rules."""
    if len(shape) <= 1 or not gname.endswith(".weight") or gname.endswith(
        ("_norm.weight", ".ffn_gate_inp.weight", ".shortconv.conv.weight")
    ):
        return GGMLType.F32  # llama.cpp keeps norms, biases, the router and the conv kernel F32
    if wanted == GGMLType.Q4_0 and gname in ("token_embd.weight", "output.weight"):
        # llama-quantize keeps the output matrix (the tied embedding) at higher precision in Q4_0
        # files (Q6_K, which gguf-py cannot write); we keep it Q8_0.
        wanted = GGMLType.Q8_0
    if shape[-1] % gguf.GGML_QUANT_SIZES[wanted][0]:
        return GGMLType.F16  # rows that do not split into blocks: llama.cpp's converter falls back to F16
    return wanted


def _encode(t: torch.Tensor, ttype: GGMLType) -> np.ndarray:
    """A tensor's GGUF bytes (as a float or uint8 array) for the given type."""
    if ttype == GGMLType.F32:
        return t.to(torch.float32).contiguous().numpy()
    if ttype == GGMLType.F16:
        return t.to(torch.float16).contiguous().numpy()
    if ttype == GGMLType.BF16:  # torch rounds to nearest even, as ggml does
        return t.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint8)
    return gguf.quants.quantize(t.to(torch.float32).contiguous().numpy(), ttype)


def _vocab_metadata(src: Path, vocab_size: int) -> tuple[list[str], list[int], gguf.SpecialVocab]:
    """Tokens and token types as llama.cpp's converter writes them, and the rest via `gguf.SpecialVocab`."""
    path = src / "tokenizer.json"
    if not path.is_file():
        raise TokenizerError(f"{path}: not found; a GGUF file needs the vocabulary, and this checkpoint has none")
    try:
        hf = HFTokenizer.from_file(str(path))
    except Exception as e:  # the Rust loader raises a bare Exception
        raise TokenizerError(f"{path}: not a valid tokenizers file: {e}") from None
    if json.loads(hf.to_str()).get("model", {}).get("type") != "BPE":
        raise TokenizerError(f"{path}: the tokenizer model is not BPE; LFM2's GGUF vocabulary is byte-level BPE")
    vocab = hf.get_vocab(with_added_tokens=True)
    if max(vocab.values()) >= vocab_size:
        raise TokenizerError(f"{path}: token id {max(vocab.values())} is beyond config.json's vocab_size {vocab_size}")
    by_id = {i: t for t, i in vocab.items()}
    added = hf.get_added_tokens_decoder()
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:  # the embedding is padded beyond the tokenizer: llama.cpp's placeholder names
            tokens.append(f"[PAD{i}]")
            types.append(int(TokenType.UNUSED))
            continue
        token = by_id[i]
        tokens.append(token)
        if i in added:
            looks_special = token.startswith("<|") and token.endswith("|>")
            types.append(int(TokenType.CONTROL if added[i].special or looks_special else TokenType.USER_DEFINED))
        else:
            types.append(int(TokenType.NORMAL))
    # SpecialVocab logs warnings about template shapes llama.cpp does not use (the pair template).
    logger = logging.getLogger("gguf.vocab")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        special = gguf.SpecialVocab(src, load_merges=True, n_vocab=vocab_size)
    finally:
        logger.setLevel(level)
    return tokens, types, special


def _check_vocab_encodes_alike(src: Path, tokens: list[str], types: list[int], special: gguf.SpecialVocab) -> None:
    """Prove that the GGUF vocabulary, read back, encodes a probe text as tokenizer.json does.

    llama.cpp identifies the pre-tokenizer by a name (`lfm2`) and never looks at tokenizer.json's
    own; a tokenizer that splits differently would be written without complaint and tokenize
    wrongly in llama.cpp. This check turns that into an error at conversion time.
    """
    ids = special.special_token_ids
    name = {k: tokens[ids[k]] if k in ids else None for k in ("bos", "eos")}
    add = special.add_special_token
    where = f"{src} (as written to GGUF)"
    rebuilt = build_vocab_tokenizer(tokens, types, special.merges, name["bos"], name["eos"],
                                    add.get("bos", True), add.get("eos", False), where)
    original = HFTokenizer.from_file(str(src / "tokenizer.json"))
    for with_special in (False, True):
        a = original.encode(_PROBE_TEXT, add_special_tokens=with_special).ids
        b = rebuilt.encode(_PROBE_TEXT, add_special_tokens=with_special).ids
        if a != b:
            at = next((k for k, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
            raise TokenizerError(
                f"{src / 'tokenizer.json'}: this tokenizer does not encode like LFM2's (the Llama-3 split regex over "
                f"byte-level BPE with ignore_merges), which llama.cpp assumes for pre-tokenizer 'lfm2': a probe text "
                f"differs at token {at} (tokenizer.json {a[at : at + 3]}, GGUF vocabulary {b[at : at + 3]}"
                f"{', add_special_tokens=True' if with_special else ''})"
            )


def _write_metadata(w: gguf.GGUFWriter, config: ModelConfig, name: str, wanted: GGMLType) -> None:
    """The `general.*` and `{arch}.*` keys, as llama.cpp's converter writes them for LFM2."""
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(name)
    w.add_block_count(config.num_hidden_layers)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv([config.num_key_value_heads if t == "full_attention" else 0 for t in config.layer_types])
    w.add_rope_freq_base(config.rope_theta)
    w.add_layer_norm_rms_eps(config.norm_eps)
    w.add_vocab_size(config.vocab_size)
    w.add_shortconv_l_cache(config.conv_L_cache)
    if config.is_moe:
        w.add_expert_count(config.num_experts)
        w.add_expert_used_count(config.num_experts_per_tok)
        w.add_expert_feed_forward_length(config.moe_intermediate_size)
        w.add_leading_dense_block_count(config.num_dense_layers)
        w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
    w.add_file_type(_FILE_TYPES[wanted])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _write_sampling_defaults(w: gguf.GGUFWriter, src: Path) -> None:
    path = src / "generation_config.json"
    if not path.is_file():
        return
    try:
        gen = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(gen, dict) or gen.get("do_sample") is False:
        return
    adders = {"temperature": w.add_sampling_temp, "top_k": w.add_sampling_top_k, "top_p": w.add_sampling_top_p,
              "min_p": w.add_sampling_min_p, "repetition_penalty": w.add_sampling_penalty_repeat}
    for key, add in adders.items():
        value = gen.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            add(int(value) if key == "top_k" else float(value))


def language_config(src: Path) -> tuple[ModelConfig, Callable[[str], str], bool]:
    """The config of a checkpoint's language model, a map from our tensor names to the checkpoint's,
    and whether it is an LFM2-VL checkpoint.

    An LFM2-VL checkpoint (`model_type` lfm2_vl) holds its language model under `model.language_model.*`
    (the head stays `lm_head`), beside the vision part that `lfm2.mmproj` writes; a text checkpoint
    holds it under our names."""
    path = src / "config.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raw = None  # ModelConfig.from_json says what is wrong with it
    if isinstance(raw, dict) and is_vl_config(raw):
        config = VlConfig.from_dict(raw, source=str(path)).text
        return config, lambda name: name.replace("model.", "model.language_model.", 1), True
    return ModelConfig.from_json(path), lambda name: name, False


def export_gguf(src: str | os.PathLike, out_path: str | os.PathLike, type: str = "f16",
                progress: bool = True) -> Path:
    """Write a Hugging Face LFM2 / LFM2-MoE checkpoint as a GGUF file that llama.cpp runs.

    Of an LFM2-VL checkpoint it writes the language model, as llama.cpp's converter does; the
    vision part goes to an mmproj file (`lfm2.mmproj.export_mmproj`).

    `type` is the type of the weight matrices: f32, f16, bf16, q8_0 or q4_0 (norms, the router and
    the conv kernel stay F32; in q4_0 files the embedding and output head are Q8_0). The file is
    written beside `out_path` under a temporary name and renamed into place when complete.
    """
    wanted = WRITE_TYPES.get(str(type).lower())
    if wanted is None:
        raise ConfigError(f"unknown GGUF type {type!r}; choose one of {', '.join(WRITE_TYPES)}")
    src_dir = resolve_checkpoint(src)
    out = Path(out_path)
    if out.is_dir():
        raise ConfigError(f"{out}: is a directory; give the path of the .gguf file to write")
    config, stored, _ = language_config(src_dir)
    _check_exportable(config, src_dir)
    tokens, types, special = _vocab_metadata(src_dir, config.vocab_size)
    _check_vocab_encodes_alike(src_dir, tokens, types, special)

    # Every source tensor present with the right shape, before anything is written.
    table = tensor_table(src_dir)
    expected = {k: tuple(v.shape) for k, v in build_model(config, "meta").state_dict().items()}
    plan = tensor_plan(config)
    for _, ours in plan:
        for name in ours:
            if stored(name) not in table:
                raise CheckpointError(f"{src_dir}: missing tensor {stored(name)!r}; the checkpoint does not match "
                                      "config.json")
            found = tuple(table[stored(name)][1]["shape"])
            if found != expected[name]:
                raise CheckpointError(f"{table[stored(name)][0]}: tensor {stored(name)!r} has shape {list(found)}, "
                                      f"expected {list(expected[name])} from config.json")

    w = gguf.GGUFWriter(path=None, arch=GGUF_ARCH[config.model_type])
    name = src_dir.name if Path(src).is_dir() else str(src).rstrip("/").split("/")[-1]  # hub id: not the hash
    _write_metadata(w, config, name, wanted)
    _write_sampling_defaults(w, src_dir)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("lfm2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    special.add_to_gguf(w, quiet=True)
    entries = [(gname, ours, _gguf_shape(gname, [expected[n] for n in ours])) for gname, ours in plan]

    def read(gname: str, ours: list[str]) -> torch.Tensor:
        # Plain reads of one tensor at a time, not memory maps held open for the whole export: those would
        # count every page read in this process's resident memory (15.6 GB converting a bfloat16 LFM2-8B-A1B).
        return _to_gguf(gname, [read_tensor(*table[stored(name)], stored(name)) for name in ours])

    return write_gguf_file(w, out, [(g, shape, _tensor_type(g, shape, wanted), ours) for g, ours, shape in entries],
                           read, progress, "GGUF file")


def write_gguf_file(w: gguf.GGUFWriter, out: Path, tensors: list[tuple[str, tuple[int, ...], GGMLType, Any]],
                    read: Callable[[str, Any], torch.Tensor], progress: bool, what: str) -> Path:
    """Write a GGUF file whose metadata `w` holds, atomically (fsynced before the name points at it):
    `tensors` are (GGUF name, GGUF shape, type, key), each read when written by `read(name, key)` as
    float values and encoded to its type. One place for the text model's file and the mmproj's."""
    sizes = []
    for gname, shape, ttype, _ in tensors:
        block, type_size = gguf.GGML_QUANT_SIZES[ttype]
        sizes.append(int(np.prod(shape)) // block * type_size)
        w.add_tensor_info(gname, shape, np.dtype(np.float16 if ttype == GGMLType.F16 else np.float32), sizes[-1],
                          ttype)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_path(out, fsync=True) as tmp:
            try:
                w.write_header_to_file(tmp)
                w.write_kv_data_to_file()
                w.write_ti_data_to_file()
                with tqdm(total=sum(sizes), unit="B", unit_scale=True, desc=f"writing {out.name}",
                          disable=not progress) as bar:
                    for (gname, _, ttype, key), nbytes in zip(tensors, sizes, strict=True):
                        w.write_tensor_data(_encode(read(gname, key), ttype))
                        bar.update(nbytes)
            finally:
                w.close()
    except (OSError, gguf.QuantError) as e:
        raise CheckpointError(f"{out}: could not write the {what} ({e.__class__.__name__}: {e})") from None
    return out


__all__ = [
    "NAME_TABLE", "ARCHITECTURES", "READ_TYPES", "WRITE_TYPES", "GGUFFile", "TensorInfo", "config_from_gguf",
    "tensor_plan", "load_model", "vocab_from_gguf", "tokenizer_from_gguf", "read_gguf", "load_gguf",
    "import_gguf", "export_gguf",
]
