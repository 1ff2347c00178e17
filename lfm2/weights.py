"""Reading and writing checkpoints in Hugging Face's layout.

A checkpoint directory holds `config.json` and either `model.safetensors` or shards listed in
`model.safetensors.index.json`. On the CPU, the weights are read straight from the files into one
buffer backed by 2 MiB huge pages (`WeightArena`): decode streams every weight once per token,
and with 4 KiB pages that stream pays a TLB miss every 4 KiB (measured: an int4 350M decode step
10% faster on huge pages). Each tensor is read into its place (converted through a one-tensor
temporary when the dtypes differ), so loading never holds two copies of the model.
`LFM2_MMAP=1` keeps the old behaviour: tensors memory-mapped from the files (one copy in memory,
the page cache's, but 4 KiB pages).

Everything is checked before the model is touched: a truncated file, a missing tensor or a
tensor of the wrong shape raises one `CheckpointError` naming the file and the tensor; a
partial model is never returned.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import shutil
import struct
import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from lfm2.errors import CheckpointError
from lfm2.files import atomic_path, atomic_write

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}
# Bytes per element, for checking a header's offsets: also of the float8 dtypes, which lfm2 reads
# headers of but does not load (a clear error names the dtype).
_DTYPE_BYTES = {**{name: dtype.itemsize for name, dtype in SAFETENSORS_DTYPES.items()}, "F8_E4M3": 1, "F8_E5M2": 1}
# Checkpoints above this size show a progress bar while loading.
PROGRESS_BYTES = 512 * 2**20
HUGE_PAGE = 2 << 20
_ALIGN = 64  # bytes between tensors in an arena: a cache line, and any dtype's alignment
_MADV_HUGEPAGE = 14  # Linux


def use_huge_pages() -> bool:
    """Whether CPU weights go into a huge-page arena (Linux, unless LFM2_MMAP=1)."""
    return sys.platform.startswith("linux") and os.environ.get("LFM2_MMAP", "") not in ("1", "true", "yes")


def huge_page_buffer(nbytes: int) -> torch.Tensor:
    """An uninitialised uint8 CPU tensor of `nbytes`, 2 MiB-aligned and advised for transparent huge pages.

    The memory is advised before anything touches it, so the kernel backs it with huge pages as
    it is first written (THP in `madvise` mode, the usual default; with THP off it is ordinary
    memory). Only the pages written become resident: the alignment slack costs address space."""
    buf = torch.empty(nbytes + HUGE_PAGE, dtype=torch.uint8)
    start = (-buf.data_ptr()) % HUGE_PAGE
    if use_huge_pages() and nbytes:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.madvise(ctypes.c_void_p(buf.data_ptr() + start), ctypes.c_size_t(nbytes), _MADV_HUGEPAGE)
        except (OSError, AttributeError):
            pass  # no madvise: ordinary pages, same results
    return buf[start : start + nbytes]


class WeightArena:
    """Tensors laid out one after another in one huge-page buffer (see the module docstring)."""

    def __init__(self, specs: list[tuple[tuple[int, ...], torch.dtype]]) -> None:
        self.buffer = huge_page_buffer(sum(_aligned(_nbytes(shape, dtype)) for shape, dtype in specs))
        self.offset = 0

    def take(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """The next slot, as an uninitialised tensor of this shape and dtype."""
        n = _nbytes(shape, dtype)
        if self.offset + n > self.buffer.numel():
            raise ValueError(f"WeightArena: no room for {list(shape)} {dtype} (asked for more than its specs)")
        t = self.buffer[self.offset : self.offset + n].view(dtype).view(shape)
        self.offset += _aligned(n)
        return t


def return_freed_memory() -> None:
    """Give the C allocator's free memory back to the system (glibc's `malloc_trim`; elsewhere nothing).

    glibc serves a freed block of up to 32 MiB from its heap the next time (its mmap threshold rises
    to the largest block freed), and keeps freed heap memory resident: moving a model tensor by tensor
    left the old copies' pages counted in the process's memory until the heap shrank on its own,
    +270 MiB at the peak of loading LFM2-350M Q8_0 (992 against 719 MiB after the load)."""
    global _malloc_trim
    if _malloc_trim is None:
        try:
            _malloc_trim = ctypes.CDLL(None).malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim = None  # libc's malloc_trim once looked up, False where there is none
TRIM_BYTES = 64 * 2**20  # moved (and freed) between two `return_freed_memory` calls


def _owns_storage(t: torch.Tensor) -> bool:
    return t.is_contiguous() and t.untyped_storage().nbytes() == t.numel() * t.element_size()


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return math.prod(shape) * dtype.itemsize


def _aligned(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def move_to_huge_pages(model: torch.nn.Module, skip: WeightArena | None = None) -> torch.nn.Module:
    """Move a CPU model's parameters and buffers into one huge-page arena, tensor by tensor.

    For weights made in memory (quantized on load, converted from GGUF blocks): each old tensor
    is freed as soon as its copy is made, so memory grows by one tensor at most. Tensors shared
    between modules stay shared. Tensors already in `skip` (made in their slots as they were read)
    stay where they are."""
    if not use_huge_pages():
        return model
    placed = None if skip is None else skip.buffer.untyped_storage().data_ptr()
    slots: dict[int, list[tuple[dict, str]]] = {}
    tensors: dict[int, torch.Tensor] = {}
    for mod in model.modules():
        for table in (mod._parameters, mod._buffers):
            for name, t in table.items():
                if t is not None and t.device.type == "cpu" and t.untyped_storage().data_ptr() != placed:
                    slots.setdefault(id(t), []).append((table, name))
                    tensors[id(t)] = t
    arena = WeightArena([(tuple(t.shape), t.dtype) for t in tensors.values()])
    freed = 0
    for key in list(tensors):
        t = tensors.pop(key)  # the last reference here: the old tensor is freed once rebound
        new = arena.take(tuple(t.shape), t.dtype)
        new.copy_(t.detach())
        if isinstance(t, torch.nn.Parameter):
            t.data = new  # every holder of this Parameter (tied weights) sees the move
        else:
            for table, name in slots[key]:
                table[name] = new
        freed += new.nbytes
        del t
        if freed >= TRIM_BYTES:
            return_freed_memory()
            freed = 0
    return_freed_memory()
    return model


def resolve_checkpoint(path_or_id: str | os.PathLike) -> Path:
    """A local checkpoint directory for a path or a Hugging Face hub id (e.g. "LiquidAI/LFM2-350M").

    Hub ids resolve through the Hugging Face cache; without network and without a cached copy
    the error says how to get the files.
    """
    if not str(path_or_id).strip():
        raise CheckpointError("empty checkpoint path: pass a checkpoint directory, a .gguf file or a hub id "
                              "(or nothing, for the bundled model)")
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        return path
    text = str(path_or_id)
    if path.exists():
        raise CheckpointError(f"{path}: expected a checkpoint directory (config.json + safetensors), found a file")
    parts = text.split("/")
    if len(parts) != 2 or not all(parts) or text.startswith((".", "~")):
        raise CheckpointError(
            f"{text}: no such checkpoint directory, and not a Hugging Face hub id (owner/name)"
        )
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.md"]
    try:
        return Path(snapshot_download(text, allow_patterns=patterns, local_files_only=True))
    except Exception:
        pass  # not cached: try the network below
    try:
        return Path(snapshot_download(text, allow_patterns=patterns))
    except Exception as e:
        detail = " ".join(str(e).split())  # one line: hub errors carry newlines
        raise CheckpointError(
            f"{text}: could not download from the Hugging Face hub ({type(e).__name__}: {detail}). "
            f"If this machine is offline, fetch it elsewhere with `huggingface-cli download {text}` "
            "and copy the Hugging Face cache here, or pass the path of a local checkpoint directory."
        ) from None


def read_header(path: Path) -> dict[str, dict]:
    """The tensor table of a safetensors file, checked against the file's real size."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: file is {size} bytes, too short to be a safetensors file")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise CheckpointError(
                    f"{path}: header claims {n} bytes but the file has {size}: truncated or not safetensors"
                )
            header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: safetensors header is not valid JSON ({e})") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None
    header.pop("__metadata__", None)
    data_size = size - 8 - n
    for name, info in header.items():
        begin, end = info["data_offsets"]
        info["file_offset"] = 8 + n + begin
        if end > data_size:
            raise CheckpointError(
                f"{path}: tensor {name!r} needs bytes {begin}..{end} of the data section but the file "
                f"holds only {data_size}: the file is truncated (re-download or re-save it)"
            )
        expected = _DTYPE_BYTES.get(info["dtype"], 0) * math.prod(info["shape"])
        if _DTYPE_BYTES.get(info["dtype"]) and end - begin != expected:
            raise CheckpointError(
                f"{path}: tensor {name!r} has {end - begin} bytes, {expected} expected for "
                f"{info['dtype']} {info['shape']}"
            )
    return header


def tensor_table(ckpt: Path) -> dict[str, tuple[Path, dict]]:
    """Each tensor's file and header entry (dtype, shape), for a single-file or sharded checkpoint."""
    single, index = ckpt / SINGLE_FILE, ckpt / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        files = {name: ckpt / shard for name, shard in weight_map.items()}
        for shard in sorted(set(files.values())):
            if not shard.is_file():
                raise CheckpointError(f"{index}: lists shard {shard.name!r}, which is missing from {ckpt}")
    elif single.is_file():
        files = None
    else:
        raise CheckpointError(f"{ckpt}: no {SINGLE_FILE} or {INDEX_FILE}; is this a checkpoint directory?")
    if files is None:
        return {name: (single, info) for name, info in read_header(single).items()}
    headers = {p: read_header(p) for p in sorted(set(files.values()))}
    table = {}
    for name, p in files.items():
        if name not in headers[p]:
            raise CheckpointError(f"{p}: tensor {name!r} is listed in {INDEX_FILE} but not in the file")
        table[name] = (p, headers[p][name])
    return table


def iter_tensors(table: dict[str, tuple[Path, dict]], names: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """Memory-mapped tensors by name (from a `tensor_table`), with a progress bar for large checkpoints."""
    files = {name: p for name, (p, _) in table.items()}
    total = sum(p.stat().st_size for p in set(files.values()))
    with ExitStack() as stack, tqdm(
        total=total, unit="B", unit_scale=True, desc="loading", disable=total < PROGRESS_BYTES
    ) as bar:
        handles = {p: stack.enter_context(safe_open(str(p), framework="pt")) for p in set(files.values())}
        for name in names:
            t = handles[files[name]].get_tensor(table[name][1].get("stored_name", name))
            bar.update(t.numel() * t.element_size())
            yield name, t


def read_tensors(
    table: dict[str, tuple[Path, dict]], specs: dict[str, tuple[tuple[int, ...], torch.dtype]]
) -> dict[str, torch.Tensor]:
    """The tensors `specs` names (name -> (shape, dtype)), read from their files into one `WeightArena`.

    Plain reads, no memory map: the page cache may keep the file, but this process holds one
    copy. A tensor stored in another dtype is read into a temporary and converted into place."""
    arena = WeightArena(list(specs.values()))
    out = {}
    total = sum(table[name][1]["data_offsets"][1] - table[name][1]["data_offsets"][0] for name in specs)
    with ExitStack() as stack, tqdm(
        total=total, unit="B", unit_scale=True, desc="loading", disable=total < PROGRESS_BYTES
    ) as bar:
        files = {}
        for name, (shape, dtype) in specs.items():
            path, info = table[name]
            if path not in files:
                files[path] = stack.enter_context(open(path, "rb", buffering=0))
            stored = SAFETENSORS_DTYPES.get(info["dtype"])
            if stored is None:
                raise CheckpointError(f"{path}: tensor {name!r} has dtype {info['dtype']}, which lfm2 cannot load")
            slot = arena.take(shape, dtype)
            target = slot if stored == dtype else torch.empty(shape, dtype=stored)
            read_exact(files[path], info["file_offset"], target, path, name)
            if target is not slot:
                slot.copy_(target)
            bar.update(target.numel() * target.element_size())
            out[name] = slot
    return out


def read_exact(f: Any, offset: int, out: torch.Tensor, path: Path, name: str) -> None:
    """Bytes from `offset` of open file `f` into `out` (contiguous) with plain reads, short reads continued."""
    view = memoryview(out.reshape(-1).view(torch.uint8).numpy())
    f.seek(offset)
    got = 0
    while got < len(view):
        n = f.readinto(view[got:])
        if not n:
            raise CheckpointError(f"{path}: tensor {name!r} ends early: the file is truncated (re-download it)")
        got += n


def read_state(table: dict[str, tuple[Path, dict]], expected: dict[str, torch.Tensor], device: torch.device | str,
               huge_pages: bool = True) -> dict[str, torch.Tensor]:
    """The checked tensors `expected` names (meta tensors giving shape and dtype), each in its dtype on `device`.

    On the CPU (unless `huge_pages` is False or LFM2_MMAP=1) they are read into one huge-page
    arena (`read_tensors`); elsewhere they come memory-mapped and are moved and cast as needed."""
    if huge_pages and torch.device(device).type == "cpu" and use_huge_pages():
        return read_tensors(table, {name: (tuple(t.shape), t.dtype) for name, t in expected.items()})
    tensors = iter_tensors(table, list(expected))
    return {name: t.to(device=device, dtype=expected[name].dtype) for name, t in tensors}


def model_table(model: torch.nn.Module, ckpt: Path) -> dict[str, tuple[Path, dict]]:
    """`tensor_table(ckpt)` under the model's own tensor names: a model whose checkpoints name some tensors
    otherwise (`Lfm2VlForConditionalGeneration`) maps them with its `sanitize` (None: a tensor it drops)."""
    table = tensor_table(ckpt)
    sanitize = getattr(model, "sanitize", None)
    if sanitize is not None:
        for name, ours in sanitize(list(table)).items():
            entry = table.pop(name)
            if ours is not None:
                table[ours] = (entry[0], {**entry[1], "stored_name": name})
    return table


def load_into(model: torch.nn.Module, ckpt: Path, device: torch.device | str, huge_pages: bool = True) -> None:
    """Fill a model built on the meta device with the checkpoint's weights, after checking them all.

    Each tensor takes the dtype of the meta model's parameter, so whatever `cast_model` decided
    (float32 routers in a bf16 MoE) holds for the loaded weights too.
    """
    table = model_table(model, ckpt)
    expected = dict(model.state_dict(keep_vars=True))
    tied = model.config.tie_word_embeddings
    embedding = getattr(model, "embedding_key", "model.embed_tokens.weight")
    if tied:
        expected.pop("lm_head.weight", None)
    shapes = {name: tuple(info["shape"]) for name, (_, info) in table.items()}
    missing = [n for n in expected if n not in shapes]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CheckpointError(f"{ckpt}: missing tensor(s) {shown}; the checkpoint does not match config.json")
    for name, param in expected.items():
        if shapes[name] != tuple(param.shape):
            raise CheckpointError(
                f"{table[name][0]}: tensor {name!r} has shape {list(shapes[name])}, expected "
                f"{list(param.shape)} from config.json"
            )
    unexpected = [n for n in shapes if n not in expected and not (tied and n == "lm_head.weight")]
    if unexpected:
        raise CheckpointError(
            f"{ckpt}: unexpected tensor(s) {', '.join(unexpected[:5])}: the checkpoint is not an "
            f"{model.config.model_type} model of this config"
        )
    state = read_state(table, expected, device, huge_pages)
    if tied:
        state["lm_head.weight"] = state[embedding]
    model.load_state_dict(state, strict=True, assign=True)
    if tied:  # assign=True replaced the shared Parameter: tie the head to the embedding again
        model.lm_head.weight = model.get_parameter(embedding)


def save_checkpoint(
    model: torch.nn.Module, out_dir: str | os.PathLike, extra_files: dict[str, str] | None = None,
    names: Callable[[str], str] | None = None,
) -> Path:
    """Write `config.json` and `model.safetensors` (Hugging Face layout), each file atomically;
    `names` maps the model's tensor names to the checkpoint's where they differ.

    `extra_files` (name -> text) are written beside them; a `config.json` among them replaces the
    one made from `model.config` (an LFM2-VL model's, which is its source checkpoint's)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    if names is not None:
        state = {names(k): v for k, v in state.items()}
    save_tensors(state, out / SINGLE_FILE)
    files = dict(extra_files or {})
    if "config.json" not in files:
        files = {"config.json": json.dumps(model.config.to_dict(), indent=2) + "\n", **files}
    for name, text in files.items():
        atomic_write(out / name, text)
    return out


def save_tensors(state: dict[str, torch.Tensor], path: Path) -> None:
    """Write a safetensors file atomically (`lfm2.files.atomic_path`)."""
    # safetensors refuses tensors that share memory; loaded weights are slots of one arena.
    state = {k: v if _owns_storage(v) else v.contiguous().clone() for k, v in state.items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})


# Files that travel with a checkpoint's weights: what a derived checkpoint copies from its source.
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


def copy_checkpoint_files(src: Path, out: Path, skip: tuple[str, ...] = ("config.json",)) -> None:
    """Copy every file of checkpoint directory `src` into `out` (atomically) but its weights and `skip`:
    a derived checkpoint's tokenizer, templates and an LFM2-VL model's processor settings."""
    for f in sorted(src.iterdir()):
        if f.is_file() and f.name not in (*skip, INDEX_FILE) and not f.name.endswith(".safetensors"):
            with atomic_path(out / f.name) as tmp:
                shutil.copyfile(f, tmp)


def copy_side_files(sources: list[Path], out: Path, names: tuple[str, ...] = SIDE_FILES) -> None:
    """Copy each of `names` into `out` (atomically) from the first source directory that has it."""
    for name in names:
        src = next((d / name for d in sources if (d / name).is_file()), None)
        if src is not None:
            atomic_write(out / name, src.read_text(encoding="utf-8"))
