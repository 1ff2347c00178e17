"""Writing safetensors checkpoints one tensor at a time, in Hugging Face's shards, for models larger than memory.

`safetensors.torch.save_file` takes a dict of every tensor and serializes it in memory first, so saving
a model needs the model (and, for a while, a second copy of its bytes). Here the writer gets the list
of tensors (name, shape, dtype) up front, which fixes every offset, so each shard's header is written
first and each tensor is made by a callback only when its turn comes, written, and dropped: memory holds
one tensor at a time, whatever the model's size. That is what lets `lfm2 bench` write a random
LFM2-8B-A1B (16.6 GB of bfloat16) on a 24 GiB machine, and `quantize_checkpoint` stream a bfloat16
checkpoint into int4 holding only the tensor it is quantizing.

The layout is Hugging Face's: one `model.safetensors` when everything fits in one shard, else
`model-00001-of-0000N.safetensors`... with `model.safetensors.index.json` (`{"metadata": {"total_size":
bytes}, "weight_map": {tensor: file}}`), which transformers and `lfm2.weights.tensor_table` read.
Every file is written atomically (`lfm2.files`); the index is written last.

`read_tensor` is the matching reader: one tensor with plain reads, no memory map, so a tensor read and
dropped leaves nothing resident in the process (a memory map would keep every page touched counted in
its resident set until the file is closed).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from pathlib import Path

import torch

from lfm2.errors import CheckpointError
from lfm2.files import atomic_path, atomic_write
from lfm2.weights import INDEX_FILE, SAFETENSORS_DTYPES, SINGLE_FILE, read_exact

# Bytes of tensor data per shard. Hugging Face's writers default to 5 GB; 2 GB keeps each file small
# enough to copy or re-download on its own.
SHARD_BYTES = 2 * 10**9
_SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}

Spec = tuple[str, tuple[int, ...], torch.dtype]  # (tensor name, shape, dtype)


def shard_name(i: int, n: int) -> str:
    """The file name of shard `i` (from 1) of `n`, as Hugging Face names them."""
    return f"model-{i:05d}-of-{n:05d}.safetensors"


def plan_shards(specs: list[Spec], max_bytes: int = SHARD_BYTES) -> list[list[Spec]]:
    """`specs` cut in order into shards of at most `max_bytes` of data (a bigger tensor gets a shard of its own)."""
    shards: list[list[Spec]] = [[]]
    size = 0
    for spec in specs:
        n = _nbytes(spec)
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += n
    return shards


def write_sharded(out: Path, specs: list[Spec], produce: Callable[[str], torch.Tensor],
                  max_bytes: int = SHARD_BYTES, progress: Callable[[str], None] | None = None) -> list[Path]:
    """Write the tensors `specs` lists into `out` as one file or Hugging Face shards; returns the files.

    `produce(name)` is called once per tensor, in the order of `specs`, and must return a tensor of the
    listed shape and dtype (checked). Weight files of another layout left in `out` by an earlier write
    (`model.safetensors`, `model-*-of-*.safetensors`, the index) are removed once the new ones are in
    place, so loaders never see two. `progress` is told each file's name once it is written.
    """
    seen = set()
    for name, _, dtype in specs:
        if name in seen:
            raise ValueError(f"tensor {name!r} is listed twice")
        if dtype not in _NAMES:
            raise ValueError(f"tensor {name!r}: dtype {dtype} cannot be stored in safetensors")
        seen.add(name)
    out.mkdir(parents=True, exist_ok=True)
    shards = plan_shards(specs, max_bytes)
    names = [SINGLE_FILE] if len(shards) == 1 else [shard_name(i + 1, len(shards)) for i in range(len(shards))]
    written = []
    for file, shard in zip(names, shards, strict=True):
        write_safetensors(out / file, shard, produce)
        written.append(out / file)
        if progress is not None:
            progress(file)
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(_nbytes(s) for s in specs)},
                 "weight_map": {name: file for file, shard in zip(names, shards, strict=True) for name, _, _ in shard}}
        atomic_write(out / INDEX_FILE, json.dumps(index, indent=2) + "\n")
    keep = {*names, INDEX_FILE} if len(shards) > 1 else {SINGLE_FILE}
    for stale in out.iterdir():
        if stale.name not in keep and (stale.name in (SINGLE_FILE, INDEX_FILE) or _SHARD.fullmatch(stale.name)):
            stale.unlink()
    return written


def write_safetensors(path: Path, specs: list[Spec], produce: Callable[[str], torch.Tensor]) -> None:
    """One safetensors file of the tensors `specs` lists, each made by `produce(name)` when written (atomically)."""
    header: dict[str, dict] = {"__metadata__": {"format": "pt"}}  # type: ignore[dict-item]
    offset = 0
    for name, shape, dtype in specs:
        n = _nbytes((name, shape, dtype))
        header[name] = {"dtype": _NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors' own writer pads it
    with atomic_path(path, fsync=True) as tmp, open(tmp, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for name, shape, dtype in specs:
            t = produce(name)
            if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
                raise ValueError(f"{path.name}: tensor {name!r} was made as {t.dtype} {list(t.shape)}, "
                                 f"listed as {dtype} {list(shape)}")
            f.write(memoryview(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()))


def read_tensor(path: Path, info: dict, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
    """One tensor of a safetensors file, from its header entry (`lfm2.weights.read_header`), by plain reads;
    with `rows` (start, stop), only those rows of it (its first dimension)."""
    dtype = SAFETENSORS_DTYPES.get(info["dtype"])
    if dtype is None:
        raise CheckpointError(f"{path}: tensor {name!r} has dtype {info['dtype']}, which lfm2 cannot load")
    shape = tuple(info["shape"])
    offset = info["file_offset"]
    if rows is not None:
        start, stop = rows[0], min(rows[1], shape[0])
        offset += start * math.prod(shape[1:]) * dtype.itemsize
        shape = (stop - start, *shape[1:])
    out = torch.empty(shape, dtype=dtype)
    if out.numel():
        with open(path, "rb", buffering=0) as f:
            read_exact(f, offset, out, path, name)
    return out


def _nbytes(spec: Spec) -> int:
    _, shape, dtype = spec
    return math.prod(shape) * dtype.itemsize
