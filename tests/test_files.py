"""`lfm2.files`: every file lfm2 writes appears whole or not at all, with a plain file's mode."""

from __future__ import annotations

import os
import stat

import pytest

from lfm2.files import atomic_path, atomic_write, new_file_mode


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_write_text_and_bytes(tmp_path):
    atomic_write(tmp_path / "a.txt", "héllo\n")
    atomic_write(tmp_path / "b.bin", b"\x00\xff")
    assert (tmp_path / "a.txt").read_bytes() == "héllo\n".encode()
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\xff"
    assert _mode(tmp_path / "a.txt") == new_file_mode()  # not the temp file's private 0600
    atomic_write(tmp_path / "a.txt", "replaced", mode=0o640)
    assert (tmp_path / "a.txt").read_text() == "replaced" and _mode(tmp_path / "a.txt") == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.bin"]  # no temp file left


def test_umask_decides_the_mode(tmp_path):
    old = os.umask(0o077)
    try:
        assert new_file_mode() == 0o600
        atomic_write(tmp_path / "private", "x")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "private") == 0o600


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()])
def test_a_failed_write_leaves_the_old_file_and_no_temp_file(tmp_path, error):
    target = tmp_path / "model.safetensors"
    target.write_text("old")
    with pytest.raises(type(error)), atomic_path(target, suffix=".tmp.npy") as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".model.safetensors.") and tmp.name.endswith(".tmp.npy")
        tmp.write_text("half of the new")
        raise error
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]


def test_fsync_and_a_missing_folder(tmp_path):
    with atomic_path(tmp_path / "f.gguf", fsync=True) as tmp:
        tmp.write_bytes(b"GGUF")
    assert (tmp_path / "f.gguf").read_bytes() == b"GGUF"
    with pytest.raises(FileNotFoundError):
        atomic_write(tmp_path / "no" / "such" / "folder.json", "{}")
