"""The copy snapshotter, for an executor that cannot mount (a locked-down container).

A RUN step gets a plain copy of its parent's merged rootfs; afterwards the copy is
compared with the parent (type, mode, owner, size, mtime, link target; directories by
type, mode and owner) and the differences are written as an overlay-format upper dir:
changed and new entries copied, removed ones as whiteouts (0:0 character devices, or
links to the cache root's whiteout marker where the file system refuses those). It
costs O(rootfs) per step (see research/executor.md §4), which is why it is only the
fallback of a locked-down container.
"""

from __future__ import annotations

import os
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path

from dockbuild.engine.archive import make_whiteout, mark_opaque
from dockbuild.engine.executor import PlainRootfs
from dockbuild.engine.snapshots import walk_merged
from dockbuild.errors import ExecutorError


@dataclass(frozen=True)
class CopyStep:
    rootfs: PlainRootfs
    before: dict[str, os.stat_result]
    upper: Path

    def commit(self) -> None:
        diff(Path(self.rootfs.path), self.before, self.upper)

    def release(self) -> None:
        """Nothing is mounted."""


class CopySnapshotter:
    name = "copy"

    def prepare(self, layers: tuple[Path, ...], work: Path) -> CopyStep:
        root = work / "root"
        before = materialize(layers, root)
        return CopyStep(PlainRootfs(str(root)), before, work / "upper")


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


def diff(root: Path, before: dict[str, os.stat_result], upper: Path) -> None:
    """Write what changed in ``root`` since ``before`` into ``upper`` (overlay format).

    A directory removed and made again becomes an opaque directory holding all of its
    new contents, as overlayfs records it, so both snapshotters give the same layer for
    the same step (see :func:`_made_again`).
    """
    from dockbuild.userns import in_user_namespace

    rootless = in_user_namespace()
    after: set[str] = set()
    remade: list[str] = []  # directories made again: everything below them is new
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        fresh = rel_dir != "." and any(rel_dir == r or rel_dir.startswith(r + "/") for r in remade)
        for name in sorted(dirnames) + sorted(filenames):
            rel = name if rel_dir == "." else f"{rel_dir}/{name}"
            after.add(rel)
            path = root / rel
            st = os.lstat(path)
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
    for rel in sorted(set(before) - after):
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
