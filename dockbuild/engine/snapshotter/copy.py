"""The copy snapshotter, for an executor that cannot mount (a locked-down container).

A RUN step runs on a plain directory holding its parent's merged rootfs. That directory
is kept between steps: once a step's changes are committed, the directory is the next
step's rootfs as it stands, so consecutive RUN steps of a stage change one working
rootfs in place, and only a step whose parent has no idle working rootfs (where the
graph branches, or the first RUN on a base) pays for a full copy. After the step, a
stat walk compares the directory with the state recorded before it (type, mode, owner,
size, mtime, inode, link target; directories by type, mode and owner) and writes the
differences as an overlay-format upper dir: changed and new entries copied, removed ones
as whiteouts (0:0 character devices, or links to the cache root's whiteout marker where
the file system refuses those). A failed step's directory is thrown away.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from dockbuild.engine.archive import make_whiteout, mark_opaque
from dockbuild.engine.executor import PlainRootfs
from dockbuild.engine.snapshots import walk_merged
from dockbuild.errors import ExecutorError


@dataclass(eq=False)
class CopyStep:
    rootfs: PlainRootfs
    before: dict[str, os.stat_result]
    upper: Path
    owner: CopySnapshotter
    after: dict[str, os.stat_result] | None = None

    def commit(self) -> None:
        self.after = diff(Path(self.rootfs.path), self.before, self.upper)

    def release(self, layers: tuple[Path, ...] | None) -> None:
        """The step is over: its rootfs is now ``layers`` merged (kept for the next step
        on them), or, given None (failed, cancelled), thrown away."""
        root = Path(self.rootfs.path)
        if layers is None or self.after is None or not self.owner.keep(layers, root, self.after):
            shutil.rmtree(root, ignore_errors=True)


class CopySnapshotter:
    name = "copy"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # layer dirs (bottom first) -> an idle working rootfs holding them merged, and
        # what each of its paths looked like
        self._idle: dict[tuple[str, ...], tuple[Path, dict[str, os.stat_result]]] = {}

    def prepare(self, layers: tuple[Path, ...], work: Path) -> CopyStep:
        with self._lock:
            idle = self._idle.pop(tuple(map(str, layers)), None)
        if idle is not None and idle[0].is_dir():
            root, before = idle
        else:
            # Beside the work dir, not in it: it outlives this step (removed with the
            # store's other temporary dirs at the end).
            root = Path(tempfile.mkdtemp(prefix="chroot-", dir=work.parent))
            os.chmod(root, 0o755)
            before = materialize(layers, root)
        return CopyStep(PlainRootfs(str(root)), before, work / "upper", self)

    def keep(self, layers: tuple[Path, ...], root: Path, state: dict[str, os.stat_result]) -> bool:
        """Keep ``root`` as the idle rootfs of ``layers``, unless one is kept already."""
        with self._lock:
            return self._idle.setdefault(tuple(map(str, layers)), (root, state))[0] == root


def materialize(layers: tuple[Path, ...], dest: Path) -> dict[str, os.stat_result]:
    """Copy the merged view of ``layers`` (bottom first) to ``dest``; return what each
    path looked like, for :func:`diff`."""
    before: dict[str, os.stat_result] = {}
    dirs: list[tuple[Path, os.stat_result]] = []
    dest.mkdir(exist_ok=True)
    for rel, src in walk_merged(layers):
        st = os.lstat(src)
        out = dest / rel
        if stat.S_ISDIR(st.st_mode):
            out.mkdir()
            dirs.append((out, st))
        elif stat.S_ISLNK(st.st_mode):
            os.symlink(os.readlink(src), out)
        elif stat.S_ISREG(st.st_mode):
            shutil.copy2(src, out, follow_symlinks=False)
        elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) or stat.S_ISFIFO(st.st_mode):
            try:
                os.mknod(out, st.st_mode, st.st_rdev)
            except OSError:
                continue  # no CAP_MKNOD: the step cannot see this device
        else:
            continue
        os.lchown(out, st.st_uid, st.st_gid)
        if not stat.S_ISLNK(st.st_mode):
            os.chmod(out, stat.S_IMODE(st.st_mode))
        before[rel] = os.lstat(out)
    for out, st in reversed(dirs):
        os.utime(out, ns=(st.st_atime_ns, st.st_mtime_ns))
    return before


def _same(a: os.stat_result, b: os.stat_result, link_a: str, link_b: str) -> bool:
    if stat.S_IFMT(a.st_mode) != stat.S_IFMT(b.st_mode):
        return False
    if (a.st_mode, a.st_uid, a.st_gid) != (b.st_mode, b.st_uid, b.st_gid):
        return False
    if stat.S_ISDIR(a.st_mode):
        return True
    if stat.S_ISLNK(a.st_mode):
        return link_a == link_b
    # A file removed and made again is a new inode: a change, as overlayfs sees it.
    return (a.st_ino, a.st_size, a.st_mtime_ns, a.st_rdev) == (
        b.st_ino,
        b.st_size,
        b.st_mtime_ns,
        b.st_rdev,
    )


def _made_again(
    rel: str, st: os.stat_result, old: os.stat_result, before: dict[str, os.stat_result], path: Path
) -> bool:
    """Whether a directory was removed and made again: a new inode, or (the file system
    may hand the freed inode number straight back) none of its old entries left. Either
    way an opaque directory with the new entries is the same tree as whiteouts for each."""
    if st.st_ino != old.st_ino:
        return True
    prefix = rel + "/"
    old_names = {r[len(prefix) :].split("/", 1)[0] for r in before if r.startswith(prefix)}
    return bool(old_names) and not old_names & set(os.listdir(path))


def diff(
    root: Path, before: dict[str, os.stat_result], upper: Path
) -> dict[str, os.stat_result]:
    """Write what changed in ``root`` since ``before`` into ``upper`` (overlay format);
    return what each path looks like now.

    A directory removed and made again becomes an opaque directory holding all of its
    new contents, as overlayfs records it, so both snapshotters give the same layer for
    the same step (see :func:`_made_again`).
    """
    from dockbuild.userns import in_user_namespace

    rootless = in_user_namespace()
    after: dict[str, os.stat_result] = {}
    remade: list[str] = []  # directories made again: everything below them is new
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        fresh = rel_dir != "." and any(rel_dir == r or rel_dir.startswith(r + "/") for r in remade)
        for name in sorted(dirnames) + sorted(filenames):
            rel = name if rel_dir == "." else f"{rel_dir}/{name}"
            path = root / rel
            st = os.lstat(path)
            after[rel] = st
            old = None if fresh else before.get(rel)
            link = os.readlink(path) if stat.S_ISLNK(st.st_mode) else ""
            if old is not None:
                if (
                    stat.S_ISDIR(st.st_mode)
                    and stat.S_ISDIR(old.st_mode)
                    and _made_again(rel, st, old, before, path)
                ):
                    remade.append(rel)
                    _copy_up(root, rel, upper)
                    mark_opaque(upper / rel, rootless)
                    continue
                old_link = link if stat.S_ISLNK(old.st_mode) else ""
                if _same(st, old, link, old_link):
                    continue
            _copy_up(root, rel, upper)
    for rel in sorted(set(before) - after.keys()):
        parent = os.path.dirname(rel)
        if parent and parent not in after:
            continue  # its parent went away already: one whiteout covers it
        if any(rel.startswith(r + "/") for r in remade):
            continue  # below an opaque directory: hidden already
        _ensure_parents(root, rel, upper)
        try:
            make_whiteout(upper / rel)
        except OSError as e:
            raise ExecutorError(f"cannot record the removal of /{rel}: {e.strerror}") from None
    return after


def _ensure_parents(root: Path, rel: str, upper: Path) -> None:
    parts = rel.split("/")[:-1]
    for i in range(1, len(parts) + 1):
        sub = "/".join(parts[:i])
        if not (upper / sub).exists():
            _copy_entry(root / sub, upper / sub, directory_only=True)


def _copy_up(root: Path, rel: str, upper: Path) -> None:
    _ensure_parents(root, rel, upper)
    dst = upper / rel
    if os.path.lexists(dst):
        return  # a directory copied up as a parent already
    _copy_entry(root / rel, dst, directory_only=False)


def _copy_entry(src: Path, dst: Path, directory_only: bool) -> None:
    st = os.lstat(src)
    if stat.S_ISDIR(st.st_mode):
        dst.mkdir()
    elif directory_only:
        return
    elif stat.S_ISLNK(st.st_mode):
        os.symlink(os.readlink(src), dst)
    elif stat.S_ISREG(st.st_mode):
        shutil.copy2(src, dst, follow_symlinks=False)
    else:
        os.mknod(dst, st.st_mode, st.st_rdev)
    os.lchown(dst, st.st_uid, st.st_gid)
    if not stat.S_ISLNK(st.st_mode):
        os.chmod(dst, stat.S_IMODE(st.st_mode))
        os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))
