"""mlx_gemma_qat.atomic: a file or folder appears whole or not at all, and is flushed to disk (file and folder)."""

import os
from pathlib import Path

import pytest

from mlx_gemma_qat import atomic


@pytest.fixture
def synced(monkeypatch):
    """The (device, inode) of everything os.fsync is called on, in order."""
    seen = []
    real = os.fsync

    def spy(fd):
        st = os.fstat(fd)
        seen.append((st.st_dev, st.st_ino))
        return real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    return seen


def _id(path):
    st = os.stat(path)
    return st.st_dev, st.st_ino


def test_write_text_replaces_whole_and_flushes_file_and_folder(tmp_path, synced):
    f = tmp_path / "a.json"
    f.write_text("old")
    atomic.write_text(f, "new")
    assert f.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["a.json"]
    assert synced == [_id(f), _id(tmp_path)]  # the data before the rename, the folder after it


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    f = tmp_path / "w.safetensors"
    f.write_bytes(b"good")
    with pytest.raises(OSError, match="disk full"):
        with atomic.atomic_file(f) as tmp:
            assert tmp.parent == tmp_path and tmp.name.startswith(".w.safetensors.") and tmp.suffix == ".safetensors"
            tmp.write_bytes(b"half")
            raise OSError("disk full")
    assert f.read_bytes() == b"good" and [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]
    with pytest.raises(KeyboardInterrupt):  # an interruption too
        with atomic.atomic_file(f, suffix=".safetensors") as tmp:
            tmp.write_bytes(b"half")
            raise KeyboardInterrupt
    assert f.read_bytes() == b"good" and [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]


def test_atomic_dir_replaces_a_folder_whole(tmp_path, synced):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("x")
    with atomic.atomic_dir(out) as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "w.bin").write_bytes(b"1")
        (tmp / "c.json").write_text("{}")
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == ["c.json", "sub", "sub/w.bin"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # neither the temporary nor the old folder left
    for p in (out / "sub" / "w.bin", out / "c.json", out / "sub", out, tmp_path):
        assert _id(p) in synced, p  # every file and folder, and the parent after the rename
    with pytest.raises(ValueError):
        with atomic.atomic_dir(out) as tmp:
            (tmp / "half").write_text("x")
            raise ValueError
    assert sorted(p.name for p in out.iterdir()) == ["c.json", "sub"] and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_commit_puts_the_old_folder_back_when_the_rename_fails(tmp_path, monkeypatch):
    out, tmp = tmp_path / "out", tmp_path / "new"
    out.mkdir()
    (out / "keep").write_text("k")
    tmp.mkdir()
    real = os.replace

    def failing(src, dst):
        if Path(src) == tmp:
            raise OSError("no")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(OSError, match="no"):
        atomic.commit(tmp, out)
    assert (out / "keep").read_text() == "k"


def test_folder_fsync_is_skipped_where_impossible(tmp_path, monkeypatch):
    import errno

    def refuse(fd):
        raise OSError(errno.EINVAL, "Invalid argument")

    (tmp_path / "f").write_bytes(b"x")
    monkeypatch.setattr(os, "fsync", refuse)
    atomic.fsync_dir(tmp_path)  # a file system that cannot sync folders: skipped
    with pytest.raises(OSError):
        atomic.fsync_file(tmp_path / "f")  # a file's flush failing is an error
