"""All-or-nothing writes for exporters: a temp file or dir beside the target, then rename.

An interrupted export (Ctrl-C, a full disk, a broken pipe) leaves the destination as it
was: the temp is removed on any exception, and only a complete, synced result is renamed
into place.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO


def fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def syncfs(path: Path) -> None:
    """Flush the whole filesystem holding ``path``: one call instead of a fsync per file."""
    fd = os.open(path, os.O_RDONLY)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), str(path))
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(dest: Path) -> Iterator[BinaryIO]:
    """Yield a file to write; on success it is synced and renamed to ``dest``."""
    dest = Path(dest)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; an export is an ordinary file
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(dest.parent)


@contextlib.contextmanager
def atomic_dir(dest: Path) -> Iterator[Path]:
    """Yield an empty temp directory; on success it replaces ``dest``.

    An existing ``dest`` is swapped out (rename) and then removed, so readers see either
    the old tree or the new one, never a mix.
    """
    dest = Path(dest)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp"))
    try:
        os.chmod(tmp, 0o755)
        yield tmp
        syncfs(tmp)
        replace_dir(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_dir(src: Path, dest: Path) -> None:
    """Rename the directory ``src`` to ``dest``, removing what ``dest`` held."""
    if not os.path.lexists(dest):
        os.rename(src, dest)
    else:
        old = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".old"))
        try:
            os.rename(dest, old / "x")
            os.rename(src, dest)
        except BaseException:
            if os.path.lexists(old / "x") and not os.path.lexists(dest):
                os.rename(old / "x", dest)
            raise
        finally:
            shutil.rmtree(old, ignore_errors=True)
    fsync_dir(dest.parent)
