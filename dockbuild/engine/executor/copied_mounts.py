"""RUN mounts without mount(2), for the chroot executor: copies placed in the rootfs.

Where mount(2) is forbidden (a default docker container) each :class:`ExecMount` is
emulated inside the plain rootfs before the step and taken out again after it, before
the copy snapshotter compares the rootfs with its parent:

- ``bind`` of a host directory (a cache mount): copied in; unless read-only, copied back
  over the source after the step (the caller holds the cache's ``sharing=`` lock);
- ``bind`` of a host socket (an ssh agent): a socket of our own at the target that relays
  each connection to the source;
- ``overlay`` (a bind mount of a stage, image or context): the merged view copied in;
  writes are thrown away;
- ``tmpfs``: an empty directory (mode 1777); ``secret``: the file written with its
  mode and owner.

Whatever was at a target is moved aside (outside the rootfs) and put back; missing
parent directories are created and removed again when the step left them empty, with
their parents' timestamps kept, so nothing of the emulation reaches the step's layer.
Read-only is not enforced (root writes anyway; the writes are discarded).
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import socket
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path

from dockbuild.engine.executor import ExecMount
from dockbuild.engine.executor.forkserver.mounts import resolve_in_root
from dockbuild.errors import ExecutorError


class CopiedMounts:
    """The mounts of one step, placed into ``root`` by :meth:`place`, taken out by
    :meth:`remove` (always call it, even when placing failed half-way)."""

    def __init__(self, root: str, mounts: tuple[ExecMount, ...]) -> None:
        self.root = root
        self.mounts = mounts
        self._undo: list[Callable[[], None]] = []
        self._aside = ""

    def place(self) -> None:
        for m in self.mounts:
            target = resolve_in_root(self.root, m.target)
            if os.path.realpath(target) == os.path.realpath(self.root):
                raise ExecutorError(f"cannot mount {m.target} over the root directory")
            self._make_parents(target)
            self._move_aside(target)
            self._undo.append(functools.partial(_remove, target))
            self._put(m, target)

    def remove(self) -> None:
        """Copy back what outlives the step (cache writes), remove everything else."""
        errors: list[BaseException] = []
        while self._undo:
            try:
                self._undo.pop()()
            except Exception as e:  # keep undoing: a secret must not stay behind
                errors.append(e)
        if self._aside:
            shutil.rmtree(self._aside, ignore_errors=True)
        if errors:
            raise ExecutorError(
                f"cannot take the emulated RUN mounts out of the rootfs: {errors[0]}"
            )

    # -- placing ----------------------------------------------------------------------

    def _put(self, m: ExecMount, target: str) -> None:
        if m.type == "tmpfs":
            os.mkdir(target)
            os.chmod(target, 0o1777)
        elif m.type == "secret":
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            try:
                view = memoryview(m.data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fchown(fd, m.uid or 0, m.gid or 0)
                os.fchmod(fd, 0o400 if m.mode is None else m.mode)
            finally:
                os.close(fd)
        elif m.type == "overlay":
            _copy_merged(tuple(reversed(m.lowerdirs)), m.subpath, target)
        elif m.type == "bind":
            source = os.path.join(m.source, m.subpath) if m.subpath else m.source
            st = os.stat(source)
            if stat.S_ISSOCK(st.st_mode):
                self._undo.append(_relay(source, target, st))
            elif stat.S_ISDIR(st.st_mode):
                copy_tree(source, target)
                if not m.readonly:
                    self._undo.append(lambda: _copy_back(target, source))
            else:
                _copy_entry(source, target)
        else:
            raise ExecutorError(f"unsupported mount type {m.type!r}")

    def _make_parents(self, target: str) -> None:
        """Create the missing parents of ``target`` (a stub, as BuildKit's), removed
        again afterwards when left empty."""
        missing: list[str] = []
        parent = os.path.dirname(target)
        while not os.path.lexists(parent):
            missing.append(parent)
            parent = os.path.dirname(parent)
        if not os.path.isdir(parent) or os.path.islink(parent):
            raise ExecutorError(
                f"cannot mount at {target[len(self.root) :]}: a parent is not a directory"
            )
        for path in reversed(missing):
            with _timestamps_kept(os.path.dirname(path)):
                os.mkdir(path, 0o755)
            self._undo.append(functools.partial(_remove_if_empty, path))

    def _move_aside(self, target: str) -> None:
        if not os.path.lexists(target):
            return
        if not self._aside:
            # Beside the rootfs (same filesystem, so a rename), not inside it.
            self._aside = tempfile.mkdtemp(prefix=".aside-", dir=os.path.dirname(self.root))
        hidden = os.path.join(self._aside, str(len(self._undo)))
        with _timestamps_kept(os.path.dirname(target)):
            os.rename(target, hidden)

        def restore() -> None:
            with _timestamps_kept(os.path.dirname(target)):
                os.rename(hidden, target)

        self._undo.append(restore)


# -- helpers ------------------------------------------------------------------------------


@contextlib.contextmanager
def _timestamps_kept(directory: str):  # type: ignore[no-untyped-def]  # a plain generator
    st = os.lstat(directory)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.utime(directory, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)


def _remove(path: str) -> None:
    with _timestamps_kept(os.path.dirname(path)):
        if os.path.isdir(path) and not os.path.islink(path):
            _make_removable(path)
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.unlink(path)


def _make_removable(path: str) -> None:
    # A step may leave directories without write permission (mode 0555): root can still
    # remove their entries, but only where it is not bound by permissions; be sure.
    for dirpath, dirnames, _ in os.walk(path):
        for name in dirnames:
            with contextlib.suppress(OSError):
                full = os.path.join(dirpath, name)
                if not os.path.islink(full):
                    os.chmod(full, 0o700)


def _remove_if_empty(path: str) -> None:
    with contextlib.suppress(OSError), _timestamps_kept(os.path.dirname(path)):
        if not os.listdir(path):
            os.rmdir(path)


def _copy_entry(src: str, dst: str) -> None:
    """One entry with its mode, owner and times (a socket or unknown type: skipped)."""
    st = os.lstat(src)
    if stat.S_ISDIR(st.st_mode):
        os.mkdir(dst)
    elif stat.S_ISLNK(st.st_mode):
        os.symlink(os.readlink(src), dst)
    elif stat.S_ISREG(st.st_mode):
        shutil.copyfile(src, dst, follow_symlinks=False)
    elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) or stat.S_ISFIFO(st.st_mode):
        os.mknod(dst, st.st_mode, st.st_rdev)
    else:
        return
    os.lchown(dst, st.st_uid, st.st_gid)
    if not stat.S_ISLNK(st.st_mode):
        os.chmod(dst, stat.S_IMODE(st.st_mode))
        os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))


def copy_tree(src: str, dst: str) -> None:
    """``src`` (a directory) as ``dst``, owners, modes and times kept, symlinks as such."""
    _copy_entry(src, dst)
    dirs: list[tuple[str, str]] = [(src, dst)]
    for dirpath, dirnames, filenames in os.walk(src):
        out_dir = os.path.join(dst, os.path.relpath(dirpath, src))
        for name in dirnames + filenames:
            out = os.path.join(out_dir, name)
            _copy_entry(os.path.join(dirpath, name), out)
            if name in dirnames and not os.path.islink(out):
                dirs.append((os.path.join(dirpath, name), out))
    for source, out in reversed(dirs):  # after their entries were made
        st = os.lstat(source)
        os.utime(out, ns=(st.st_atime_ns, st.st_mtime_ns))


def _copy_back(target: str, source: str) -> None:
    """A cache mount's contents after the step replace the cache dir (one rename)."""
    if not os.path.isdir(target) or os.path.islink(target):
        return  # the step removed or replaced the mount point: keep the cache as it was
    parent = os.path.dirname(source)
    fresh = tempfile.mkdtemp(prefix=".copy-back-", dir=parent)
    os.rmdir(fresh)
    old = fresh + ".old"
    try:
        copy_tree(target, fresh)
        os.rename(source, old)
        os.rename(fresh, source)
    finally:
        shutil.rmtree(fresh, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def _copy_merged(layers: tuple[str, ...], subpath: str, dest: str) -> None:
    """What ``subpath`` is in the merged view of ``layers`` (bottom first), at ``dest``."""
    from dockbuild.engine.snapshots import walk_merged

    prefix = subpath.strip("/")
    if len(layers) == 1:  # a plain directory (the context): no whiteouts to honour
        source = os.path.join(layers[0], prefix) if prefix else layers[0]
        if os.path.isdir(source) and not os.path.islink(source):
            copy_tree(source, dest)
        else:
            _copy_entry(source, dest)
        return
    entries = list(walk_merged(tuple(Path(p) for p in layers)))
    if not prefix:
        os.mkdir(dest, 0o755)
    for rel, src in entries:
        if prefix:
            if rel == prefix:
                _copy_entry(str(src), dest)
                continue
            if not rel.startswith(prefix + "/"):
                continue
            rel = rel[len(prefix) + 1 :]
        _copy_entry(str(src), os.path.join(dest, rel))
    if not os.path.lexists(dest):
        raise ExecutorError(f"bind mount source {subpath}: no such file or directory")


def _relay(upstream: str, target: str, st: os.stat_result) -> Callable[[], None]:
    """A listening socket at ``target`` relaying each connection to ``upstream``; returns
    what stops it. (A socket path must fit in 108 bytes: a long one is reached through
    its directory's descriptor.)"""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    directory = os.open(os.path.dirname(target), os.O_PATH | os.O_DIRECTORY)
    try:
        path = target
        if len(os.fsencode(path)) >= 108:
            path = f"/proc/self/fd/{directory}/{os.path.basename(target)}"
        listener.bind(path)
    except OSError as e:
        listener.close()
        raise ExecutorError(
            f"cannot place the ssh agent socket at {target}: {e.strerror}"
        ) from None
    finally:
        os.close(directory)
    os.lchown(target, st.st_uid, st.st_gid)
    os.chmod(target, stat.S_IMODE(st.st_mode))
    listener.listen(16)
    from dockbuild.engine import sshrelay

    sshrelay.serve(listener, upstream, "ssh-relay")

    def stop() -> None:
        with contextlib.suppress(OSError):
            listener.shutdown(socket.SHUT_RDWR)  # wakes the accept()
        listener.close()

    return stop
