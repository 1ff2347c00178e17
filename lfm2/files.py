"""Writing a file so that a crash never leaves half of it under its name: the one way lfm2 writes files.

Everything lfm2 writes (weights, configs, tokenizers, GGUF files, token files, training state,
plots) is written to a temporary name in the destination's folder and renamed into place when
complete. A rename within one file system is atomic, so a reader sees the old file or the new
one, never a torn one; a process killed mid-write leaves at most a hidden `.NAME.*.tmp` file,
and any exception removes it. The temporary file is created private (0600), so the finished
file is given the mode a plain `open()` would have given it (`new_file_mode`), unless the caller
asks for another.

`atomic_write` writes bytes or text; `atomic_path` hands out the temporary path for writers
that insist on a file name of their own (safetensors, `torch.save`, `np.save`, matplotlib,
gguf's writer).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def new_file_mode() -> int:
    """The mode a plain `open()` would give a new file here (0666 less the umask)."""
    mask = os.umask(0)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return 0o666 & ~mask


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp", mode: int | None = None,
                fsync: bool = False) -> Iterator[Path]:
    """A temporary path beside `path` to write; renamed onto `path` when the block ends without error.

    `suffix` ends the temporary name, for writers that pick the format from it or append their own
    (`np.save` adds `.npy` unless the name has it). `mode` is the finished file's permissions
    (default: `new_file_mode()`). `fsync` flushes the data to disk before the rename, so that after
    a power loss the name points at the whole file (worth it for large files written once). On any
    exception, including KeyboardInterrupt, the temporary file is removed and `path` is untouched.
    """
    path = Path(path)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        if fsync:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.chmod(tmp, new_file_mode() if mode is None else mode)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: str | os.PathLike, data: str | bytes, mode: int | None = None) -> None:
    """Write `data` (text as UTF-8, or bytes) to `path` atomically (see `atomic_path`)."""
    with atomic_path(path, mode=mode) as tmp:
        if isinstance(data, str):
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(data)
        else:
            tmp.write_bytes(data)


__all__ = ["atomic_path", "atomic_write", "new_file_mode"]
