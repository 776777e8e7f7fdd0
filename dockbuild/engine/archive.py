"""Layer tars in and out: safe unpacking into overlay format and deterministic diff tars.

A layer directory is in overlayfs on-disk format, so the engine can use it as a lowerdir
as-is:

- a deleted path is a character device 0:0 with that name (a *whiteout*);
- a directory that hides everything below it carries ``trusted.overlay.opaque=y``
  (``user.overlay.opaque=y`` in rootless mode, where the mount uses ``userxattr``);
- directories that were an overlay upperdir may carry other ``*.overlay.*`` xattrs
  (origin, impure, ...) which are overlay's bookkeeping, never image content.

A layer tar is the OCI changeset form of the same thing: ``.wh.NAME`` empty files for
deletions and a ``.wh..wh..opq`` entry for an opaque directory.

Decisions worth knowing:

- Device nodes other than 0:0 need CAP_MKNOD. Without it (rootless, or a container that
  drops it) they are skipped silently, as moby does in a user namespace: a rootfs can
  live without ``/dev/console`` but a build cannot live with a failed pull.
- Ownership is applied when running as (namespace) root. An owner the user namespace
  does not map (a single-ID mapping maps root only) cannot be set: it is recorded in
  ``user.dockbuild.owner`` as a COPY --chown's is (:func:`set_owner`), so that what
  copies the file keeps it; a symlink's is lost (no user.* xattr on symlinks). xattr
  failures are ignored in rootless mode.
- ``*.overlay.*`` xattrs arriving in a tar are dropped: honouring a ``trusted.overlay.
  redirect`` from an image would let a layer point overlayfs at other paths. So is
  ``user.dockbuild.owner`` (OWNER_XATTR): dockbuild's own record of an owner, which the
  tar header carries; from an image it would give a file another owner than its header.
- Missing parent directories are created (0755, root), as tar does.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, cast

from dockbuild.errors import DockbuildError, SecurityError

# tarfile and the decompressors load where a tar is read or written: every build opens
# the store (which imports this module), a no-op rebuild reads no tar.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import tarfile

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
OPAQUE_XATTR_ROOT = "trusted.overlay.opaque"
OPAQUE_XATTR_ROOTLESS = "user.overlay.opaque"
OPAQUE_XATTRS = (OPAQUE_XATTR_ROOT, OPAQUE_XATTR_ROOTLESS)
_XATTR_PREFIX = "SCHILY.xattr."
_COPY_BUFSIZE = 1 << 20


# --- the overlay on-disk format -------------------------------------------------------


def is_whiteout(st: os.stat_result) -> bool:
    """Whether an lstat result is an overlay whiteout: a char device 0:0, or a hard link
    to the cache root's whiteout marker (see :func:`make_whiteout`)."""
    if stat.S_ISCHR(st.st_mode):
        return st.st_rdev == 0
    if not stat.S_ISREG(st.st_mode) or st.st_size or stat.S_IMODE(st.st_mode) or st.st_nlink < 2:
        return False
    ident = (st.st_dev, st.st_ino)
    if ident not in _marker_ids:
        _refresh_markers()  # another process may have made the marker since
    return ident in _marker_ids


# Where a char device 0:0 cannot be made (overlayfs refuses it: the cache root on a
# container's own filesystem), a whiteout is a hard link to one empty mode-0 file in the
# cache root, recognised by its inode. Such layers can never be overlay lower dirs, so a
# root holding the marker uses the copy snapshotter (engine/snapshotter/probe.py).
WHITEOUT_MARKER = "whiteout"
_marker_paths: set[str] = set()
_marker_ids: set[tuple[int, int]] = set()


def use_whiteout_marker(root: Path) -> None:
    """Recognise (and make, when needed) the whiteout marker of the cache root ``root``."""
    _marker_paths.add(str(root / WHITEOUT_MARKER))
    _refresh_markers()


def _refresh_markers() -> None:
    for path in _marker_paths:
        try:
            st = os.lstat(path)
        except OSError:
            continue
        _marker_ids.add((st.st_dev, st.st_ino))


def make_whiteout(path: str | os.PathLike[str]) -> None:
    """A whiteout at ``path``: a char device 0:0, else a link to the cache root's marker."""
    try:
        os.mknod(path, stat.S_IFCHR | 0o000, os.makedev(0, 0))
        return
    except PermissionError:
        pass
    os.link(_marker_for(path), path)
    _refresh_markers()


def mark_opaque(path: str | os.PathLike[str], rootless: bool) -> None:
    """Mark a directory opaque: ``trusted.overlay.opaque``, or ``user.overlay.opaque`` in
    a user namespace or where trusted xattrs are refused (no CAP_SYS_ADMIN: a default
    container). In the last case the cache root gets its whiteout marker too, so that
    overlayfs, which reads only trusted xattrs outside a user namespace, never mounts it."""
    if not rootless:
        try:
            os.setxattr(path, OPAQUE_XATTR_ROOT, b"y", follow_symlinks=False)
            return
        except PermissionError:
            _marker_for(path)
    os.setxattr(path, OPAQUE_XATTR_ROOTLESS, b"y", follow_symlinks=False)


def _marker_for(path: str | os.PathLike[str]) -> str:
    """The whiteout marker of the cache root holding ``path``, made if missing."""
    dev = os.lstat(os.path.dirname(os.path.abspath(path))).st_dev
    for marker in sorted(_marker_paths):
        if os.lstat(os.path.dirname(marker)).st_dev != dev:
            continue
        if not os.path.lexists(marker):
            tmp = f"{marker}.{os.getpid()}-{os.urandom(4).hex()}"
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o000))
            os.chmod(tmp, 0o000)
            try:
                os.link(tmp, marker)  # the first process to get here wins
            except FileExistsError:
                pass
            finally:
                os.unlink(tmp)
            _refresh_markers()
        return marker
    raise PermissionError(errno.EPERM, "cannot make a whiteout outside a cache root", str(path))


def has_whiteout_marker(root: Path) -> bool:
    """Whether layers in the cache root ``root`` record deletions as marker links."""
    return os.path.lexists(root / WHITEOUT_MARKER)


def is_opaque_dir(path: str | os.PathLike[str]) -> bool:
    """Whether a directory carries the overlay opaque xattr (root or rootless form)."""
    for name in OPAQUE_XATTRS:
        try:
            if os.getxattr(path, name, follow_symlinks=False) == b"y":
                return True
        except OSError:
            continue  # ENODATA, or trusted.* unreadable without privilege
    return False


def is_overlay_xattr(name: str) -> bool:
    """Whether an xattr is overlayfs bookkeeping (``trusted.overlay.*``, ``user.overlay.*``)."""
    return name.startswith(("trusted.overlay.", "user.overlay."))


# The owner ("uid:gid") a file has in its layer where a single-ID user namespace could
# not chown it on disk (engine/fileop.py): the layer tar's header carries it instead.
OWNER_XATTR = "user.dockbuild.owner"


def set_owner(target: str | os.PathLike[str] | int, uid: int, gid: int) -> bool:
    """Give a new file (a descriptor, or a path whose symlink is not followed) the owner
    ``uid:gid`` in its layer; False where it can be neither set nor recorded.

    In a user namespace with a single-ID mapping only root exists: an owner it cannot
    map is recorded on the file instead (``OWNER_XATTR``), and the layer's tar headers
    carry it, as they would the owner on disk. A copy of such a file takes that owner
    (:func:`layer_owner`) and records it again. A symlink takes no user.* xattr: its
    owner has nowhere to go (False)."""
    # A descriptor takes no follow_symlinks; a path's own symlink is what is meant.
    path_only: dict[str, bool] = {} if isinstance(target, int) else {"follow_symlinks": False}
    try:
        os.chown(target, uid, gid, **path_only)
        return True
    except OSError as e:
        if e.errno != errno.EINVAL:  # EINVAL: an id the user namespace does not map
            raise
    try:
        os.setxattr(target, OWNER_XATTR, f"{uid}:{gid}".encode(), **path_only)
    except OSError:
        return False
    return True


def layer_owner(path: str | os.PathLike[str], st: os.stat_result) -> tuple[int, int]:
    """The owner the file at ``path`` (lstat ``st``) has in its layer: the one
    ``OWNER_XATTR`` records, else the one on disk."""
    try:
        recorded = os.getxattr(path, OWNER_XATTR, follow_symlinks=False)
    except OSError:
        return st.st_uid, st.st_gid  # ENODATA; a symlink or a file system without xattrs
    return _recorded_owner(recorded, st)


def copy_owner_record(
    src: str | os.PathLike[str], dst: str | os.PathLike[str], *, replace: bool = False
) -> None:
    """Give the directory ``dst`` the owner ``OWNER_XATTR`` records on ``src``, if any
    (``replace``: and drop the one ``dst`` has when ``src`` has none). A regular file's
    travels with its other xattrs where shutil.copy2 copies it."""
    try:
        value = os.getxattr(src, OWNER_XATTR, follow_symlinks=False)
    except OSError:
        if replace:
            with contextlib.suppress(OSError):  # ENODATA: it had none
                os.removexattr(dst, OWNER_XATTR, follow_symlinks=False)
        return
    os.setxattr(dst, OWNER_XATTR, value, follow_symlinks=False)


def _recorded_owner(value: bytes, st: os.stat_result) -> tuple[int, int]:
    uid, _, gid = value.partition(b":")
    if uid.isdigit() and gid.isdigit():
        return int(uid), int(gid)
    return st.st_uid, st.st_gid  # not a value dockbuild wrote


def content_xattrs(path: str | os.PathLike[str]) -> dict[str, bytes]:
    """The xattrs of a path that belong in an image (no overlay ones), sorted by name."""
    xattrs = _xattrs(path)
    xattrs.pop(OWNER_XATTR, None)
    return xattrs


def _xattrs(path: str | os.PathLike[str]) -> dict[str, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EPERM):
            return {}
        raise
    out: dict[str, bytes] = {}
    for name in sorted(names):
        if is_overlay_xattr(name):
            continue
        try:
            out[name] = os.getxattr(path, name, follow_symlinks=False)
        except OSError:
            continue  # vanished or unreadable: not content we can carry
    return out


def layer_is_empty(layer_dir: Path) -> bool:
    """Whether a layer directory records no change at all (so no layer is written)."""
    with os.scandir(layer_dir) as it:
        if any(True for _ in it):
            return False
    return not is_opaque_dir(layer_dir)


# --- compressed blobs ------------------------------------------------------------------


def detect_compression(head: bytes) -> str:
    """Name the compression of a blob from its first bytes: gzip, zstd, bzip2, xz or none."""
    if head.startswith(b"\x1f\x8b"):
        return "gzip"
    if head.startswith(b"\x28\xb5\x2f\xfd"):
        return "zstd"
    if head.startswith(b"BZh"):
        return "bzip2"
    if head.startswith(b"\xfd7zXZ\x00"):
        return "xz"
    return "none"


def decompressed(raw: BinaryIO) -> BinaryIO:
    """Wrap a blob stream so that reading it yields the uncompressed bytes.

    The format is sniffed from the content, never trusted from a media type: registries
    and old engines mislabel layers.
    """
    buffered = (
        cast(io.BufferedReader, raw)
        if hasattr(raw, "peek")
        else io.BufferedReader(cast(io.RawIOBase, raw), _COPY_BUFSIZE)
    )
    kind = detect_compression(buffered.peek(6)[:6])
    if kind == "gzip":
        import gzip

        return cast(BinaryIO, gzip.GzipFile(fileobj=buffered, mode="rb"))
    if kind == "zstd":
        import zstandard  # imported lazily: only zstd layers need it

        reader = zstandard.ZstdDecompressor().stream_reader(buffered, read_across_frames=True)
        return io.BufferedReader(reader, _COPY_BUFSIZE)
    if kind == "bzip2":
        import bz2

        return cast(BinaryIO, bz2.BZ2File(buffered, mode="rb"))
    if kind == "xz":
        import lzma

        return cast(BinaryIO, lzma.LZMAFile(buffered, mode="rb"))
    return cast(BinaryIO, buffered)


class _BlobStream(io.RawIOBase):
    """A decompressing stream that also closes the file under it (GzipFile does not)."""

    def __init__(self, stream: BinaryIO, raw: BinaryIO) -> None:
        super().__init__()
        self._stream = stream
        self._raw = raw

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        return self._stream.read(size)

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]  # io passes memoryviews only
        data = self._stream.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            try:
                self._stream.close()
            finally:
                self._raw.close()
        super().close()


def open_blob(path: str | os.PathLike[str]) -> BinaryIO:
    """Open a layer blob on disk as an uncompressed stream (close it when done)."""
    raw = open(path, "rb", buffering=_COPY_BUFSIZE)  # noqa: SIM115 - returned to the caller
    try:
        return _BlobStream(decompressed(raw), raw)  # type: ignore[return-value]  # a readable io stream, as callers use BinaryIO
    except BaseException:
        raw.close()
        raise


# --- unpacking ---------------------------------------------------------------------------


def _entry_parts(name: str, entry: str) -> tuple[str, ...]:
    """Split a member name into components, refusing any that could leave the root."""
    parts = tuple(p for p in name.lstrip("/").split("/") if p not in ("", "."))
    if ".." in parts:
        raise SecurityError(f"layer entry {entry!r} contains a '..' component")
    return parts


class _Unpacker:
    """Applies tar members to an empty directory, one at a time, in overlay format."""

    def __init__(self, dest: Path, rootless: bool) -> None:
        self.dest = dest
        self.rootless = rootless
        self.as_root = os.geteuid() == 0
        self.opaque_xattr = OPAQUE_XATTR_ROOTLESS if rootless else OPAQUE_XATTR_ROOT
        # Paths known to be real directories created here: saves an lstat per component.
        self.dirs: set[tuple[str, ...]] = {()}
        self.whiteouts: set[tuple[str, ...]] = set()
        # Directory mode and mtime are applied last: children change the mtime, and a
        # read-only mode would stop their creation.
        self.dir_meta: dict[tuple[str, ...], tuple[int, int]] = {}

    def path(self, parts: tuple[str, ...]) -> str:
        return os.path.join(self.dest, *parts) if parts else str(self.dest)

    # -- directories and parents --

    def ensure_parent(self, parts: tuple[str, ...], entry: str) -> None:
        for i in range(1, len(parts)):
            prefix = parts[:i]
            if prefix in self.dirs:
                continue
            p = self.path(prefix)
            try:
                st = os.lstat(p)
            except FileNotFoundError:
                self.make_dir(prefix, 0o755)
                continue
            if stat.S_ISLNK(st.st_mode):
                raise SecurityError(
                    f"layer entry {entry!r} would be written through the symlink "
                    f"{'/'.join(prefix)!r}"
                )
            if not stat.S_ISDIR(st.st_mode):
                # A later entry below a file (or a whiteout) replaces it, as tar does.
                self.remove(prefix)
                self.make_dir(prefix, 0o755)
                continue
            self.dirs.add(prefix)

    def make_dir(self, parts: tuple[str, ...], mode: int) -> None:
        os.mkdir(self.path(parts), mode)
        self.dirs.add(parts)
        if parts in self.whiteouts:
            # Deleted and recreated in one layer: the lower directory's contents stay
            # hidden, which overlay says with an opaque directory.
            self.whiteouts.discard(parts)
            self.set_opaque(parts)

    def set_opaque(self, parts: tuple[str, ...]) -> None:
        os.setxattr(self.path(parts), self.opaque_xattr, b"y", follow_symlinks=False)

    def remove(self, parts: tuple[str, ...]) -> None:
        import shutil

        p = self.path(parts)
        st = os.lstat(p)
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(p)
            n = len(parts)
            self.dirs = {d for d in self.dirs if d[:n] != parts}
            self.dir_meta = {d: m for d, m in self.dir_meta.items() if d[:n] != parts}
        else:
            os.unlink(p)

    # -- metadata --

    def chown(self, target: str | int, ti: tarfile.TarInfo) -> None:
        if not self.as_root:
            return
        try:
            # An id the user namespace does not map is recorded instead; a symlink's is
            # lost (it takes no user.* xattr), as an image must unpack all the same.
            set_owner(target, ti.uid, ti.gid)
        except OSError as exc:
            if not (self.rootless and exc.errno == errno.EPERM):
                raise

    def set_xattrs(self, target: str | int, ti: tarfile.TarInfo) -> None:
        for key in sorted(ti.pax_headers):
            if not key.startswith(_XATTR_PREFIX):
                continue
            name = key[len(_XATTR_PREFIX) :]
            if is_overlay_xattr(name) or name == OWNER_XATTR:  # ours: the tar header has the owner
                continue
            value = ti.pax_headers[key].encode("utf-8", "surrogateescape")
            try:
                if isinstance(target, int):
                    os.setxattr(target, name, value)
                else:
                    os.setxattr(target, name, value, follow_symlinks=False)
            except OSError as exc:
                # user.* is not allowed on symlinks; trusted.* needs privilege.
                if not (self.rootless or ti.issym()) or exc.errno not in (
                    errno.EPERM,
                    errno.ENOTSUP,
                    errno.EACCES,
                ):
                    raise

    # -- members --

    def apply(self, tf: tarfile.TarFile, ti: tarfile.TarInfo) -> None:
        parts = _entry_parts(ti.name, ti.name)
        if not parts:
            if ti.isdir():
                self.chown(str(self.dest), ti)
                self.set_xattrs(str(self.dest), ti)
                self.dir_meta[()] = (ti.mode & 0o7777, int(ti.mtime))
            return
        base = parts[-1]
        if base.startswith(WHITEOUT_PREFIX):
            self.apply_whiteout(parts, ti)
            return
        self.ensure_parent(parts, ti.name)
        p = self.path(parts)
        try:
            st: os.stat_result | None = os.lstat(p)
        except FileNotFoundError:
            st = None
        if st is not None and not (ti.isdir() and stat.S_ISDIR(st.st_mode)):
            self.remove(parts)
            st = None
            if not ti.isdir():
                # A replaced whiteout is gone; only a directory keeps the memory of it
                # (make_dir turns it into an opaque directory).
                self.whiteouts.discard(parts)

        if ti.isdir():
            if st is None:
                self.make_dir(parts, 0o700)
            else:
                # An entry again: its header's owner replaces any recorded before.
                with contextlib.suppress(OSError):  # ENODATA: none was
                    os.removexattr(p, OWNER_XATTR, follow_symlinks=False)
            self.chown(p, ti)
            self.set_xattrs(p, ti)
            self.dir_meta[parts] = (ti.mode & 0o7777, int(ti.mtime))
            return
        if ti.islnk():
            self.apply_hardlink(parts, ti)
            return
        if ti.isreg():
            self.write_file(tf, ti, p)
        elif ti.issym():
            os.symlink(ti.linkname, p)
        elif ti.ischr() or ti.isblk():
            kind = stat.S_IFCHR if ti.ischr() else stat.S_IFBLK
            try:
                os.mknod(p, kind | 0o600, os.makedev(ti.devmajor, ti.devminor))
            except PermissionError:
                return  # no CAP_MKNOD: skipped, see the module docstring
        elif ti.isfifo():
            os.mkfifo(p, 0o600)
        else:
            return  # unknown types (e.g. GNU volume headers) carry no file
        if ti.isreg():
            return  # metadata already applied through the open descriptor
        self.chown(p, ti)
        if not ti.issym():
            os.chmod(p, ti.mode & 0o7777)
        self.set_xattrs(p, ti)
        os.utime(p, ns=(int(ti.mtime) * 10**9,) * 2, follow_symlinks=False)
        if ti.ischr() and ti.devmajor == 0 and ti.devminor == 0:
            self.whiteouts.add(parts)

    def write_file(self, tf: tarfile.TarFile, ti: tarfile.TarInfo, p: str) -> None:
        import shutil

        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        with open(fd, "wb", buffering=0, closefd=True) as out:
            src = tf.extractfile(ti)
            if src is not None:
                shutil.copyfileobj(src, out, _COPY_BUFSIZE)
            # chown before chmod (chown clears setuid) and before xattrs (chown clears
            # security.capability).
            self.chown(fd, ti)
            os.fchmod(fd, ti.mode & 0o7777)
            self.set_xattrs(fd, ti)
            os.utime(fd, ns=(int(ti.mtime) * 10**9,) * 2)

    def apply_whiteout(self, parts: tuple[str, ...], ti: tarfile.TarInfo) -> None:
        entry = ti.name
        base = parts[-1]
        if base == OPAQUE_MARKER:
            dir_parts = parts[:-1]
            self.ensure_parent(parts, entry)
            if dir_parts not in self.dirs:
                self.make_dir(dir_parts, 0o755)
            self.set_opaque(dir_parts)
            return
        if base.startswith(WHITEOUT_PREFIX + WHITEOUT_PREFIX):
            return  # AUFS bookkeeping (.wh..wh.plnk, ...): not content
        target = parts[:-1] + (base[len(WHITEOUT_PREFIX) :],)
        self.ensure_parent(target, entry)
        p = self.path(target)
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            make_whiteout(p)
            if not stat.S_ISCHR(os.lstat(p).st_mode):
                self.whiteouts.add(target)
                return  # the marker's time is shared by every link to it
            # Keep the marker's time so that writing the layer back gives the same tar.
            os.utime(p, ns=(int(ti.mtime) * 10**9,) * 2, follow_symlinks=False)
            self.whiteouts.add(target)
            return
        # The layer also has an entry of that name: a whiteout hides only lower layers,
        # so a file of this layer stays, and a directory stays without the lower contents.
        if stat.S_ISDIR(st.st_mode):
            self.set_opaque(target)

    def apply_hardlink(self, parts: tuple[str, ...], ti: tarfile.TarInfo) -> None:
        if ti.linkname.startswith("/"):
            raise SecurityError(
                f"layer entry {ti.name!r} is a hardlink to the absolute path {ti.linkname!r}"
            )
        target = _entry_parts(ti.linkname, ti.name)
        if not target:
            raise SecurityError(f"layer entry {ti.name!r} is a hardlink to the layer root")
        # The target must be a non-directory this layer already wrote, reached without
        # symlinks: anything else could link a file from outside the layer.
        for i in range(1, len(target)):
            prefix = target[:i]
            if prefix in self.dirs:
                continue
            try:
                st = os.lstat(self.path(prefix))
            except FileNotFoundError:
                st = None
            if st is None or not stat.S_ISDIR(st.st_mode):
                raise SecurityError(
                    f"layer entry {ti.name!r} is a hardlink to {ti.linkname!r}, which is not "
                    "an earlier entry of this layer"
                )
        src = self.path(target)
        try:
            st = os.lstat(src)
        except FileNotFoundError:
            st = None
        if st is None or stat.S_ISDIR(st.st_mode) or target in self.whiteouts:
            raise SecurityError(
                f"layer entry {ti.name!r} is a hardlink to {ti.linkname!r}, which is not "
                "an earlier entry of this layer"
            )
        os.link(src, self.path(parts), follow_symlinks=False)

    def finish(self) -> None:
        # Deepest first, so that no later chmod can block a pending utime.
        for parts in sorted(self.dir_meta, key=len, reverse=True):
            mode, mtime = self.dir_meta[parts]
            p = self.path(parts)
            os.chmod(p, mode)
            os.utime(p, ns=(mtime * 10**9,) * 2, follow_symlinks=False)


def unpack_layer(fileobj: BinaryIO, dest: Path, *, rootless: bool = False) -> None:
    """Extract an uncompressed layer tar stream into the empty directory ``dest``.

    The result is in overlay on-disk format (see the module docstring). Raises
    :class:`SecurityError` naming the entry when a member would write outside ``dest``
    (``..``, writing through a symlink of the layer, hardlinks out of the layer);
    absolute names are taken relative to ``dest`` as tar does. The stream is read to its
    end, so a hashing wrapper around it sees every byte.
    """
    import tarfile

    unpacker = _Unpacker(Path(dest), rootless)
    try:
        with tarfile.open(
            fileobj=fileobj, mode="r|", encoding="utf-8", errors="surrogateescape"
        ) as tf:
            while (ti := tf.next()) is not None:
                unpacker.apply(tf, ti)
                tf.members.clear()  # type: ignore[attr-defined]  # undocumented, not in typeshed; streaming: keep memory flat on huge layers
            unpacker.finish()
    except tarfile.TarError as exc:
        raise DockbuildError(f"invalid layer tar: {exc}") from exc
    while fileobj.read(_COPY_BUFSIZE):
        pass


# --- writing -----------------------------------------------------------------------------


class CountingWriter:
    """A write-only file object over ``out`` that knows its position without seeking
    (so tarfile can write to a pipe)."""

    def __init__(self, out: BinaryIO) -> None:
        self.out = out
        self.pos = 0

    def write(self, data: bytes) -> int:
        self.out.write(data)
        self.pos += len(data)
        return len(data)

    def tell(self) -> int:
        return self.pos

    def flush(self) -> None:
        self.out.flush()


class TreeTarWriter:
    """Writes filesystem entries as a deterministic PAX tar stream.

    Numeric ids with empty user and group names, no atime/ctime, integral mtimes
    (clamped to ``clamp_mtime`` when given), xattrs as ``SCHILY.xattr.*`` records without
    the overlay ones, and hardlinks as links to the first name written for the inode.
    Callers give the entries in their final order.
    """

    def __init__(self, out: BinaryIO, *, clamp_mtime: int | None = None) -> None:
        import tarfile

        self.clamp_mtime = clamp_mtime
        self.links: dict[tuple[int, int], str] = {}
        # Mode "w" on a position-counting wrapper rather than the "w|" stream mode: the
        # stream mode re-buffers every write, and pipes (stdout) cannot tell().
        # CountingWriter has all a tar writer calls (write, tell), not the whole IO protocol.
        self.tar = tarfile.open(  # type: ignore[call-overload]  # noqa: SIM115 - closed by close()
            fileobj=CountingWriter(out),
            mode="w",
            format=tarfile.PAX_FORMAT,
            encoding="utf-8",
            errors="surrogateescape",
        )
        self.tar.copybufsize = _COPY_BUFSIZE

    def __enter__(self) -> TreeTarWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.close()
        # On error the end-of-archive marker is not written: a broken pipe must not be
        # followed by more writes, and a truncated tar must not look complete.

    def close(self) -> None:
        self.tar.close()

    def mtime(self, value: float) -> int:
        t = int(value)
        if self.clamp_mtime is not None and t > self.clamp_mtime:
            return self.clamp_mtime
        return t

    def add_marker(self, name: str, mtime: float) -> None:
        """An empty regular file with mode 0 owned by 0:0 (a whiteout or opaque marker)."""
        import tarfile

        ti = tarfile.TarInfo(name)
        ti.type = tarfile.REGTYPE
        ti.mode = 0
        ti.mtime = self.mtime(mtime)
        ti.uname = ti.gname = ""
        self.tar.addfile(ti)

    def add_path(
        self, name: str, path: str | os.PathLike[str], st: os.stat_result | None = None
    ) -> None:
        """Add the file at ``path`` under ``name`` (relative, no leading ``./``)."""
        import tarfile

        if st is None:
            st = os.lstat(path)
        mode = st.st_mode
        ti = tarfile.TarInfo(name)
        ti.mode = stat.S_IMODE(mode)
        ti.uid, ti.gid = st.st_uid, st.st_gid
        ti.uname = ti.gname = ""
        ti.mtime = self.mtime(st.st_mtime)
        xattrs = _xattrs(path)
        owner = xattrs.pop(OWNER_XATTR, None)
        if owner is not None:
            ti.uid, ti.gid = _recorded_owner(owner, st)
        ti.pax_headers = {
            _XATTR_PREFIX + k: v.decode("utf-8", "surrogateescape") for k, v in xattrs.items()
        }
        if not stat.S_ISDIR(mode) and st.st_nlink > 1:
            key = (st.st_dev, st.st_ino)
            first = self.links.get(key)
            if first is not None:
                ti.type = tarfile.LNKTYPE
                ti.linkname = first
                ti.pax_headers = {}  # the inode's xattrs travel with the first name
                self.tar.addfile(ti)
                return
            self.links[key] = name
        if stat.S_ISREG(mode):
            ti.type = tarfile.REGTYPE
            with open(path, "rb", buffering=0) as f:
                ti.size = os.fstat(f.fileno()).st_size
                self.tar.addfile(ti, f)
            return
        if stat.S_ISDIR(mode):
            ti.type = tarfile.DIRTYPE
        elif stat.S_ISLNK(mode):
            ti.type = tarfile.SYMTYPE
            ti.linkname = os.readlink(path)
        elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            ti.type = tarfile.CHRTYPE if stat.S_ISCHR(mode) else tarfile.BLKTYPE
            ti.devmajor, ti.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
        elif stat.S_ISFIFO(mode):
            ti.type = tarfile.FIFOTYPE
        else:
            return  # sockets and the like have no tar form
        self.tar.addfile(ti)


def _sorted_entries(directory: str) -> list[os.DirEntry[str]]:
    with os.scandir(directory) as it:
        entries = list(it)
    # Byte order, like Go's sort of names: stable whatever the locale or the encoding.
    entries.sort(key=lambda e: os.fsencode(e.name))
    return entries


def _layer_entries(layer_dir: str, rel: str) -> Iterator[tuple[str, os.DirEntry[str]]]:
    for entry in _sorted_entries(os.path.join(layer_dir, rel) if rel else layer_dir):
        child = f"{rel}/{entry.name}" if rel else entry.name
        yield child, entry
        if entry.is_dir(follow_symlinks=False):
            yield from _layer_entries(layer_dir, child)


def write_layer_tar(layer_dir: Path, out: BinaryIO, *, clamp_mtime: int | None = None) -> None:
    """Write the layer directory ``layer_dir`` (overlay format) as an OCI layer tar.

    Whiteouts become empty ``.wh.NAME`` files, opaque directories get a
    ``.wh..wh..opq`` entry right after the directory, overlay xattrs are dropped.
    Entries are sorted by name with parents first; the root itself is not an entry.
    The same directory always gives the same bytes.
    """
    root = str(layer_dir)
    with TreeTarWriter(out, clamp_mtime=clamp_mtime) as writer:
        if is_opaque_dir(root):
            writer.add_marker(OPAQUE_MARKER, os.lstat(root).st_mtime)
        for rel, entry in _layer_entries(root, ""):
            st = entry.stat(follow_symlinks=False)
            if is_whiteout(st):
                head, _, base = rel.rpartition("/")
                name = f"{head}/{WHITEOUT_PREFIX}{base}" if head else WHITEOUT_PREFIX + base
                writer.add_marker(name, st.st_mtime)
                continue
            writer.add_path(rel, entry.path, st)
            if stat.S_ISDIR(st.st_mode) and is_opaque_dir(entry.path):
                writer.add_marker(f"{rel}/{OPAQUE_MARKER}", st.st_mtime)
