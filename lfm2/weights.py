"""Reading and writing checkpoints in Hugging Face's layout.

A checkpoint directory holds `config.json` and either `model.safetensors` or shards listed in
`model.safetensors.index.json`. Tensors are memory-mapped and handed to the model as they are
when the dtype already matches, so loading a float32 checkpoint as float32 keeps one copy of
the weights in memory (the page cache's), not two.

Everything is checked before the model is touched: a truncated file, a missing tensor or a
tensor of the wrong shape raises one `CheckpointError` naming the file and the tensor; a
partial model is never returned.
"""

from __future__ import annotations

import json
import math
import os
import struct
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from lfm2.errors import CheckpointError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
# Checkpoints above this size show a progress bar while loading.
PROGRESS_BYTES = 512 * 2**20


def resolve_checkpoint(path_or_id: str | os.PathLike) -> Path:
    """A local checkpoint directory for a path or a Hugging Face hub id (e.g. "LiquidAI/LFM2-350M").

    Hub ids resolve through the Hugging Face cache; without network and without a cached copy
    the error says how to get the files.
    """
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
            t = handles[files[name]].get_tensor(name)
            bar.update(t.numel() * t.element_size())
            yield name, t


def load_into(model: torch.nn.Module, ckpt: Path, device: torch.device | str) -> None:
    """Fill a model built on the meta device with the checkpoint's weights, after checking them all.

    Each tensor takes the dtype of the meta model's parameter, so whatever `cast_model` decided
    (float32 routers in a bf16 MoE) holds for the loaded weights too.
    """
    table = tensor_table(ckpt)
    expected = dict(model.state_dict(keep_vars=True))
    tied = model.config.tie_word_embeddings
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
    state = {}
    for name, t in iter_tensors(table, list(expected)):
        state[name] = t.to(device=device, dtype=expected[name].dtype)
    if tied:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if tied:  # assign=True replaced the shared Parameter: tie the head to the embedding again
        model.lm_head.weight = model.model.embed_tokens.weight


def save_checkpoint(
    model: torch.nn.Module, out_dir: str | os.PathLike, extra_files: dict[str, str] | None = None
) -> Path:
    """Write `config.json` and `model.safetensors` (Hugging Face layout), each file atomically."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_tensors(state, out / SINGLE_FILE)
    files = {"config.json": json.dumps(model.config.to_dict(), indent=2) + "\n", **(extra_files or {})}
    for name, text in files.items():
        write_text_atomic(out / name, text)
    return out


def save_tensors(state: dict[str, torch.Tensor], path: Path) -> None:
    """Write a safetensors file atomically (temp file, then rename), with a plain file's mode."""
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as tmp:
        tmp_path = tmp.name
    try:
        save_file(state, tmp_path, metadata={"format": "pt"})
        os.chmod(tmp_path, new_file_mode())
        os.replace(tmp_path, path)
    finally:
        if os.path.exists(tmp_path):
            os.unlink(tmp_path)


# Files that travel with a checkpoint's weights: what a derived checkpoint copies from its source.
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


def copy_side_files(sources: list[Path], out: Path, names: tuple[str, ...] = SIDE_FILES) -> None:
    """Copy each of `names` into `out` (atomically) from the first source directory that has it."""
    for name in names:
        src = next((d / name for d in sources if (d / name).is_file()), None)
        if src is not None:
            write_text_atomic(out / name, src.read_text(encoding="utf-8"))


def new_file_mode() -> int:
    """The mode a plain `open()` would give a new file (temp files are created 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def write_text_atomic(path: Path, text: str) -> None:
    """Write a text file so that a crash never leaves a half-written file under its name."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, new_file_mode())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
