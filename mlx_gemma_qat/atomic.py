"""Atomic writes: a file or a folder appears whole under its final name, or not at all.

The output is written under a temporary name beside its destination (the same folder, hence the same
filesystem; a dot name, so listings hide it), flushed to disk (the file, or every file and folder inside a
folder), moved into place with ``os.replace`` and then the parent folder is flushed too, so that the new name
itself survives a crash or a power cut. If anything fails, the temporary is removed and whatever was at the
destination before is left as it was.

- ``atomic_file(path)``: ``with atomic_file(p) as tmp: writer(tmp)`` for writers that take a path.
- ``write_bytes`` / ``write_text``: the common cases of it.
- ``atomic_dir(path)``: the same for a folder (an existing destination is replaced whole).
- ``temp_sibling`` + ``commit``: for a writer that cannot sit inside a ``with`` block (a file filled over many
  calls, a folder another program creates).

Flushing a folder (fsync of a read-only descriptor) works on Linux and macOS; Windows cannot open a folder and
does not need it (its rename is durable through the file system's journal): there it is skipped, as it is on a
file system that refuses to fsync folders (EINVAL on some network mounts).
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
from pathlib import Path
from typing import Iterator

_NO_DIR_SYNC = {errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF, errno.EACCES, errno.EPERM}


def temp_sibling(path: str | os.PathLike, suffix: str | None = None) -> Path:
    """A fresh hidden name beside ``path`` for its temporary, ending in ``suffix`` (default: ``path``'s own,
    as some writers, e.g. ``mx.save_safetensors``, append theirs to a name that lacks it)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{secrets.token_hex(4)}.partial{path.suffix if suffix is None else suffix}")


def fsync_file(path: str | os.PathLike) -> None:
    """Flush a written file's data to disk."""
    fd = os.open(path, os.O_RDWR if os.name == "nt" else os.O_RDONLY)  # Windows flushes writable handles only
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a folder's entries (a rename or a new file in it) to disk; skipped where that is impossible."""
    if os.name == "nt":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in _NO_DIR_SYNC:
            raise
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    for root, _, files in os.walk(folder):
        for name in files:
            p = os.path.join(root, name)
            if not os.path.islink(p):
                fsync_file(p)
        fsync_dir(root)


def commit(tmp: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Move the finished temporary ``tmp`` (a file or a folder, beside ``dst``) to ``dst``, durably.

    A folder that exists at ``dst`` is moved aside, replaced, then deleted (``os.replace`` cannot replace a
    non-empty folder); if the second rename fails, it is moved back."""
    tmp, dst = Path(tmp), Path(dst)
    if tmp.is_dir():
        _fsync_tree(tmp)
        if dst.is_dir() and not dst.is_symlink():
            old = temp_sibling(dst, ".old")
            os.replace(dst, old)
            try:
                os.replace(tmp, dst)
            except BaseException:
                os.replace(old, dst)
                raise
            fsync_dir(dst.parent)
            shutil.rmtree(old, ignore_errors=True)
            return dst
    else:
        fsync_file(tmp)
    os.replace(tmp, dst)
    fsync_dir(dst.parent)
    return dst


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write; when the block ends without an error it becomes ``path``
    (see ``commit``), else it is deleted. ``suffix``: the temporary's (default ``path``'s)."""
    path = Path(path)
    tmp = temp_sibling(path, suffix)
    try:
        yield tmp
        commit(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a new empty temporary folder beside ``path``; when the block ends without an error it replaces
    ``path`` (see ``commit``), else it is deleted with what was written in it."""
    path = Path(path)
    tmp = temp_sibling(path, "")
    tmp.mkdir()
    try:
        yield tmp
        commit(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding=encoding)
    return Path(path)


__all__ = ["atomic_file", "atomic_dir", "write_bytes", "write_text", "temp_sibling", "commit", "fsync_file",
           "fsync_dir"]
