"""All-or-nothing writes for exporters: a temp file or dir beside the target, then rename.

An interrupted export (Ctrl-C, a full disk, a broken pipe) leaves the destination as it
was: the temp is removed on any exception, and only a complete result is renamed into
place (synced first, unless the caller asks for ``durable=False``).

A user's destination goes through :func:`output_file` / :func:`output_dir`: a device, a
FIFO or a socket is written through, never renamed over, and a symlink is followed.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple


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
    import tempfile  # loaded when a file is written, not by every build that checks one

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


class Destination(NamedTuple):
    """What a user's output path names: where a write lands and what is there."""

    path: Path  # symlinks followed, except into /proc (the kernel follows those at open)
    mode: int | None  # st_mode of what is there; None when nothing is
    process_file: bool = False  # /dev/stdout, /dev/fd/N: another process's open file

    @property
    def written_through(self) -> bool:
        """Opened and written (never replaced): a device, FIFO, socket or process file."""
        if self.mode is None or stat.S_ISDIR(self.mode):
            return False
        return self.process_file or not stat.S_ISREG(self.mode)


def destination(dest: Path) -> Destination:
    """Look at ``dest``: a symlink is followed to its final target (a dangling one too),
    which gets the output while the link stays. OSErrors name ``dest``."""
    dest = Path(dest)
    process_file = _via_proc(dest)
    target = dest
    if os.path.islink(dest) and not process_file:
        target = Path(os.path.realpath(dest))
        if os.path.islink(target):  # realpath stops at a loop
            raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), str(dest))
    try:
        mode: int | None = os.stat(target).st_mode
    except (FileNotFoundError, NotADirectoryError):  # ENOTDIR: a file where a dir goes
        mode = None
    except OSError as e:
        e.filename, e.filename2 = str(dest), None
        raise
    return Destination(target, mode, process_file)


def _via_proc(dest: Path) -> bool:
    """Whether ``dest`` reaches into /proc (``/dev/stdout`` -> ``/proc/self/fd/1``): its
    magic links name an open file of a process, which only the kernel can follow."""
    path = os.path.abspath(dest)
    for _ in range(40):  # the kernel's own limit on symlinks in one lookup
        path = os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))
        if path == "/proc" or path.startswith("/proc/"):
            return True
        if not os.path.islink(path):
            return False
        path = os.path.normpath(os.path.join(os.path.dirname(path), os.readlink(path)))
    return False


def _name_user_path(e: OSError, dest: Path, target: Path) -> None:
    """Make ``e`` name ``dest`` (the user's path) where it names nothing, the resolved
    target or a temp file beside it."""
    name = "" if e.filename is None else os.fsdecode(e.filename)
    temp = os.path.dirname(name) == str(target.parent) and os.path.basename(name).startswith(
        f".{target.name}."
    )
    if not name or name == str(target) or temp:
        e.filename, e.filename2 = str(dest), None


@contextlib.contextmanager
def output_file(dest: Path, *, durable: bool = True) -> Iterator[BinaryIO]:
    """Yield a file to write an output to ``dest``, the path the user gave.

    - missing or a regular file: :func:`atomic_file` (missing parent directories made);
    - a symlink: followed (a dangling one too); its target gets these same rules;
    - a character or block device, a FIFO or a socket: opened and written through, never
      replaced (``/dev/null``, ``>(gzip > x)``, a FIFO a reader waits on);
    - a directory: IsADirectoryError.

    OSErrors name ``dest``, never a temp file.
    """
    dest = Path(dest)
    where = destination(dest)
    target, mode = where.path, where.mode
    if mode is not None and stat.S_ISDIR(mode):
        raise IsADirectoryError(errno.EISDIR, "is a directory", str(dest))
    if not where.written_through:
        _make_parents(dest, target)
        try:
            with atomic_file(target, durable=durable) as f:
                yield f
        except OSError as e:
            _name_user_path(e, dest, target)
            raise
        return
    assert mode is not None
    try:
        with _open_through(target, mode) as f:
            yield f
            f.flush()
            if durable and stat.S_ISBLK(mode):
                os.fsync(f.fileno())
    except OSError as e:
        _name_user_path(e, dest, target)
        raise


def _make_parents(dest: Path, target: Path) -> None:
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        e.filename, e.filename2 = str(dest), None  # a missing dir's ancestor: say which output
        raise


def _open_through(target: Path, mode: int) -> BinaryIO:
    """The device, FIFO or socket ``target`` opened for writing (a FIFO waits for its reader)."""
    if stat.S_ISSOCK(mode):
        import socket

        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(target))
            fd = sock.detach()
        except BaseException:
            sock.close()
            raise
        return os.fdopen(fd, "wb")
    # O_TRUNC: a process's file that is a regular file (stdout redirected to one) starts
    # empty, as the shell's `>` left it; devices and FIFOs ignore it.
    return os.fdopen(os.open(target, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC), "wb")


def output_dir(dest: Path) -> Path:
    """The directory an output named ``dest`` is written to: a symlink is followed, and a
    missing directory's parents are made. Anything but a directory there is refused
    (NotADirectoryError naming ``dest``): a directory output never replaces a file."""
    dest = Path(dest)
    where = destination(dest)
    if where.mode is None:
        _make_parents(dest, where.path)
    elif not stat.S_ISDIR(where.mode):
        raise NotADirectoryError(errno.ENOTDIR, "exists and is not a directory", str(dest))
    return where.path


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
    import shutil
    import tempfile

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
    import shutil

    if not os.path.lexists(dest):
        os.rename(src, dest)
    else:
        import tempfile

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
