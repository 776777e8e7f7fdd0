"""All-or-nothing writes for exporters: a temp file or dir beside the target, then rename.

An interrupted export (Ctrl-C, a full disk, a broken pipe) leaves the destination as it
was: the temp is removed on any exception, and only a complete result is renamed into
place (synced first, unless the caller asks for ``durable=False``).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO


@functools.cache
def _libc() -> Any:
    """The C library, for the calls Python's os module lacks (ctypes loads only then)."""
    import ctypes

    return ctypes.CDLL(None, use_errno=True)


def _errno() -> int:
    import ctypes

    return ctypes.get_errno()


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
        if _libc().syncfs(fd) != 0:
            err = _errno()
            raise OSError(err, os.strerror(err), str(path))
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(dest: Path, *, durable: bool = True) -> Iterator[BinaryIO]:
    """Yield a file to write; on success it is synced and renamed to ``dest``.

    ``durable=False`` skips the syncs: the rename is still all-or-nothing for every
    reader while the system runs, but the kernel writes the data back in its own time
    (image exports: see docs/outputs.md, "Atomic, not synced").
    """
    dest = Path(dest)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; an export is an ordinary file
        if durable:
            os.replace(tmp, dest)
        else:
            _replace_unsynced(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if durable:
        fsync_dir(dest.parent)


_RENAME_EXCHANGE = 2  # renameat2(2) flag
_AT_FDCWD = -100


def _replace_unsynced(tmp: str, dest: Path) -> None:
    """``os.replace(tmp, dest)`` without ext4's flush of ``tmp`` (auto_da_alloc, which it
    starts when a rename replaces a file): the two names are swapped atomically
    (renameat2 RENAME_EXCHANGE) and the old file, now at ``tmp``, is removed."""
    try:
        if not stat.S_ISREG(os.lstat(dest).st_mode):
            raise FileNotFoundError  # not a file to swap with: a plain rename decides
        renameat2 = _libc().renameat2
    except (OSError, AttributeError):  # no such file, or a libc without renameat2
        os.replace(tmp, dest)
        return
    if renameat2(_AT_FDCWD, os.fsencode(tmp), _AT_FDCWD, os.fsencode(dest), _RENAME_EXCHANGE):
        err = _errno()
        if err not in (errno.EINVAL, errno.ENOSYS, errno.ENOENT, errno.EOPNOTSUPP):
            raise OSError(err, os.strerror(err), str(dest))
        os.replace(tmp, dest)  # a filesystem that cannot swap, or dest just went away
        return
    os.unlink(tmp)


@contextlib.contextmanager
def atomic_dir(dest: Path, *, durable: bool = True) -> Iterator[Path]:
    """Yield an empty temp directory; on success it replaces ``dest``.

    An existing ``dest`` is swapped out (rename) and then removed, so readers see either
    the old tree or the new one, never a mix. ``durable=False``: no sync, as in
    :func:`atomic_file`.
    """
    dest = Path(dest)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp"))
    try:
        os.chmod(tmp, 0o755)
        yield tmp
        if durable:
            syncfs(tmp)
        replace_dir(tmp, dest, durable=durable)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_dir(src: Path, dest: Path, *, durable: bool = True) -> None:
    """Rename the directory ``src`` to ``dest``, removing what ``dest`` held (and sync
    the rename, unless ``durable=False``)."""
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
    if durable:
        fsync_dir(dest.parent)
