"""The copy snapshotter, for an executor that cannot mount (a locked-down container).

A RUN step runs on a plain directory holding its parent's merged rootfs. That directory
is kept in the cache root (``rootfs/``) when the step is over, as the rootfs of the
chain it now holds, so consecutive RUN steps change one working rootfs in place, within
a build and across builds. A step whose chain has no kept rootfs takes the kept one
sharing the longest chain prefix with it and brings it to its chain: every path a
layer above the shared prefix names (on either side) is made again from the step's
layers, which costs what those layers hold, not the image. Only where nothing is kept
(the first RUN on a base) is the whole rootfs copied.

A kept rootfs is taken by renaming it into the build's own ``tmp/`` folder (one process
wins), so two builds never share one, and one left by a killed step is swept with that
folder, never reused. At most :data:`MAX_KEPT` are kept (the least recently kept go);
``dockbuild prune`` removes them all, GC those whose layers are gone.

After the step, a stat walk compares the directory with the state recorded before it
(type, mode, owner, size, mtime, inode, link target; directories by type, mode and
owner) and writes the differences as an overlay-format upper dir: changed and new
entries copied, removed ones as whiteouts (0:0 character devices, or links to the cache
root's whiteout marker where the file system refuses those). A failed step's directory
is thrown away.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import marshal
import os
import shutil
import stat
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from dockbuild.engine.archive import copy_owner_record, is_opaque_dir, make_whiteout, mark_opaque
from dockbuild.engine.executor import PlainRootfs
from dockbuild.engine.snapshots import visible_entry, walk_merged, walk_subtree
from dockbuild.errors import ExecutorError

KEPT_DIR = "rootfs"
# Each kept rootfs is an image's size on disk: a few cover a stage or two being rebuilt.
MAX_KEPT = 3


class Rec(NamedTuple):
    """What the stat walk compares of one path (os.stat_result's names, and a link's target)."""

    st_mode: int
    st_uid: int
    st_gid: int
    st_ino: int
    st_size: int
    st_mtime_ns: int
    st_ctime_ns: int
    st_rdev: int
    link: str


State = dict[str, Rec]


def _rec(st: os.stat_result, path: str | Path) -> Rec:
    link = os.readlink(path) if stat.S_ISLNK(st.st_mode) else ""
    return Rec(
        st.st_mode,
        st.st_uid,
        st.st_gid,
        st.st_ino,
        st.st_size,
        st.st_mtime_ns,
        st.st_ctime_ns,
        st.st_rdev,
        link,
    )


@dataclass(eq=False)
class CopyStep:
    holder: Path  # root/ (the rootfs), and the records kept beside it
    before: State
    drift: set[str]
    upper: Path
    owner: CopySnapshotter
    after: State | None = None

    @property
    def rootfs(self) -> PlainRootfs:
        return PlainRootfs(str(self.holder / "root"))

    def commit(self) -> None:
        self.after = diff(self.holder / "root", self.before, self.upper, self.drift)

    def release(self, layers: tuple[Path, ...] | None) -> None:
        """The step is over: its rootfs is now ``layers`` merged (kept for the next step
        on them), or, given None (failed, cancelled), thrown away."""
        if layers is None or self.after is None:
            shutil.rmtree(self.holder, ignore_errors=True)
        else:
            self.owner.keep(layers, self.holder, self.after, self.drift)


class CopySnapshotter:
    name = "copy"

    def __init__(self, cache_root: Path) -> None:
        self.kept = cache_root / KEPT_DIR

    def prepare(self, layers: tuple[Path, ...], work: Path) -> CopyStep:
        upper = work / "upper"
        chain = chain_identity(layers)
        # Beside the work dir, not in it: it outlives this step (kept, or removed with
        # the store's other temporary dirs at the end).
        for holder, meta in self._candidates(chain, work.parent):
            try:
                return self._reuse(holder, meta, chain, layers, upper)
            except (OSError, ValueError, EOFError, TypeError):
                shutil.rmtree(holder, ignore_errors=True)  # unreadable, or its layers gone
        holder = Path(tempfile.mkdtemp(prefix="chroot-", dir=work.parent))
        (holder / "root").mkdir(0o755)
        os.chmod(holder / "root", 0o755)
        return CopyStep(holder, materialize(layers, holder / "root"), set(), upper, self)

    def _candidates(
        self, chain: list[str], tmp: Path
    ) -> Iterator[tuple[Path, dict[str, list[str]]]]:
        """Kept rootfs dirs sharing a chain prefix with ``chain``, the closest first, each
        taken (renamed into ``tmp``) as it is yielded."""
        try:
            names = os.listdir(self.kept)
        except FileNotFoundError:
            return
        ranked = []
        for name in names:
            try:
                meta = json.loads((self.kept / name / "chain").read_text())
            except (OSError, ValueError):
                continue  # being written or taken by another build
            ids = meta["ids"]
            common = _common(ids, chain)
            if common:
                ranked.append((-common, len(ids) + len(chain) - 2 * common, name, meta))
        for _, _, name, meta in sorted(ranked, key=lambda r: r[:3]):
            holder = tmp / f"chroot-{os.urandom(6).hex()}"
            try:
                os.rename(self.kept / name, holder)
            except FileNotFoundError:
                continue  # another build took it first
            yield holder, meta

    def _reuse(
        self,
        holder: Path,
        meta: dict[str, list[str]],
        chain: list[str],
        layers: tuple[Path, ...],
        upper: Path,
    ) -> CopyStep:
        records, drifted = marshal.loads((holder / "state").read_bytes())
        before = {rel: Rec(*r) for rel, r in records.items()}
        drift = set(drifted)
        if meta["ids"] != chain:
            common = _common(meta["ids"], chain)
            theirs = [Path(p) for p in meta["layers"][common:]]
            if chain_identity(theirs) != meta["ids"][common:]:
                raise ValueError("a layer of the kept rootfs was removed or made again")
            before = sync(holder / "root", before, drift, [*theirs, *layers[common:]], layers)
            drift = set()
        return CopyStep(holder, before, drift, upper, self)

    def keep(self, layers: tuple[Path, ...], holder: Path, state: State, drift: set[str]) -> None:
        """Keep ``holder`` as the rootfs of ``layers``, unless another build kept one
        already; then drop the least recently kept beyond :data:`MAX_KEPT`."""
        chain = chain_identity(layers)
        (holder / "state").write_bytes(
            marshal.dumps(({rel: tuple(r) for rel, r in state.items()}, list(drift)))
        )
        # Written last: a kept dir is looked at only once its chain file is there.
        (holder / "chain").write_text(json.dumps({"ids": chain, "layers": list(map(str, layers))}))
        self.kept.mkdir(exist_ok=True)
        try:
            os.rename(
                holder, self.kept / hashlib.sha256("\n".join(chain).encode()).hexdigest()[:32]
            )
        except OSError:
            shutil.rmtree(holder, ignore_errors=True)  # another build kept this chain
            return
        _trim(self.kept, MAX_KEPT, holder.parent)


def chain_identity(layers: Iterable[Path]) -> list[str]:
    """Each layer dir by path, inode and ctime: a layer removed and made again (prune,
    then a rebuild under the same id) is another layer."""
    out = []
    for layer in layers:
        st = os.stat(layer)
        out.append(f"{layer}:{st.st_ino}:{st.st_ctime_ns}")
    return out


def _common(a: list[str], b: list[str]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _trim(kept: Path, limit: int, tmp: Path) -> None:
    entries = []
    for name in os.listdir(kept):
        with contextlib.suppress(OSError):
            entries.append((os.stat(kept / name / "chain").st_mtime_ns, name))
    for _, name in sorted(entries)[: max(0, len(entries) - limit)]:
        _discard(kept / name, tmp)


def _discard(path: Path, tmp: Path) -> None:
    """Take a kept rootfs (no other build may be taking it) and remove it."""
    gone = tmp / f"chroot-{os.urandom(6).hex()}"
    try:
        os.rename(path, gone)
    except FileNotFoundError:
        return
    shutil.rmtree(gone, ignore_errors=True)


def prune_kept(cache_root: Path, tmp: Path, *, stale_only: bool) -> None:
    """Remove the kept rootfs dirs (``stale_only``: those whose layers are gone)."""
    kept = cache_root / KEPT_DIR
    try:
        names = os.listdir(kept)
    except FileNotFoundError:
        return
    for name in names:
        if stale_only:
            try:
                meta = json.loads((kept / name / "chain").read_text())
                if chain_identity(Path(p) for p in meta["layers"]) == meta["ids"]:
                    continue
            except (OSError, ValueError, KeyError):
                pass
        tmp.mkdir(parents=True, exist_ok=True)
        _discard(kept / name, tmp)


def _place(src: Path, out: Path, st: os.stat_result) -> bool:
    """Copy one entry of a merged view (a directory empty, its mtime set later)."""
    if stat.S_ISDIR(st.st_mode):
        out.mkdir()
        copy_owner_record(src, out)
    elif stat.S_ISLNK(st.st_mode):
        os.symlink(os.readlink(src), out)
    elif stat.S_ISREG(st.st_mode):
        shutil.copy2(src, out, follow_symlinks=False)
    elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) or stat.S_ISFIFO(st.st_mode):
        try:
            os.mknod(out, st.st_mode, st.st_rdev)
        except OSError:
            return False  # no CAP_MKNOD: the step cannot see this device
    else:
        return False
    os.lchown(out, st.st_uid, st.st_gid)
    if not stat.S_ISLNK(st.st_mode):
        os.chmod(out, stat.S_IMODE(st.st_mode))
    return True


def materialize(layers: tuple[Path, ...], dest: Path) -> State:
    """Copy the merged view of ``layers`` (bottom first) to ``dest``; return what each
    path looked like, for :func:`diff`."""
    dest.mkdir(exist_ok=True)
    return _copy_tree(walk_merged(layers), dest)


def _copy_tree(entries: Iterable[tuple[str, Path]], dest: Path) -> State:
    placed: State = {}
    dirs: list[tuple[Path, os.stat_result]] = []
    for rel, src in entries:
        st = os.lstat(src)
        out = dest / rel
        if not _place(src, out, st):
            continue
        if stat.S_ISDIR(st.st_mode):
            dirs.append((out, st))
        placed[rel] = _rec(os.lstat(out), out)
    for out, st in reversed(dirs):
        os.utime(out, ns=(st.st_atime_ns, st.st_mtime_ns))
    for out, _ in dirs:  # as the step will find them: their mtimes (and ctimes) set
        placed[os.path.relpath(out, dest)] = _rec(os.lstat(out), out)
    return placed


@dataclass
class _Touched:
    deep: dict[str, bool] = field(default_factory=dict)  # path -> its whole subtree

    def add_layer(self, layer: Path) -> None:
        for dirpath, dirnames, filenames in os.walk(layer):
            rel_dir = os.path.relpath(dirpath, layer)
            for name in dirnames + filenames:
                rel = name if rel_dir == "." else f"{rel_dir}/{name}"
                path = os.path.join(dirpath, name)
                whole = not stat.S_ISDIR(os.lstat(path).st_mode) or is_opaque_dir(path)
                self.deep[rel] = self.deep.get(rel, False) or whole


def sync(
    root: Path, state: State, drift: set[str], changed: list[Path], layers: tuple[Path, ...]
) -> State:
    """Make the rootfs ``root`` (described by ``state``) the merged view of ``layers``
    where it may differ: every path the ``changed`` layers name (a whiteout, an opaque
    directory or a non-directory: its whole subtree; a directory: its metadata), and
    the directories in ``drift`` (an mtime no layer recorded). Returns the new state."""
    touched = _Touched()
    for layer in changed:
        touched.add_layer(layer)
    for rel in drift:
        touched.deep.setdefault(rel, False)
    remade: set[str] = set()
    fixed: list[tuple[str, os.stat_result]] = []  # directories: metadata from the layers
    new: State = {}
    for rel in sorted(touched.deep, key=lambda r: r.split("/")):
        if any(p in remade for p in _ancestors(rel)):
            continue
        path = root / rel
        src = visible_entry(layers, rel)
        want = os.lstat(src) if src is not None else None
        try:
            have: os.stat_result | None = os.lstat(path)
        except (FileNotFoundError, NotADirectoryError):
            have = None
        both_dirs = (
            want is not None
            and have is not None
            and stat.S_ISDIR(want.st_mode)
            and stat.S_ISDIR(have.st_mode)
        )
        if both_dirs and not touched.deep[rel]:
            assert want is not None and src is not None
            os.lchown(path, want.st_uid, want.st_gid)
            copy_owner_record(src, path, replace=True)
            os.chmod(path, stat.S_IMODE(want.st_mode))
            fixed.append((rel, want))
            continue
        remade.add(rel)
        if have is not None:
            if stat.S_ISDIR(have.st_mode):
                shutil.rmtree(path)
            else:
                path.unlink()
        if src is not None:
            new.update(_copy_tree(walk_subtree(layers, rel), root))
    for rel, want in sorted(fixed, key=lambda f: -f[0].count("/")):
        os.utime(root / rel, ns=(want.st_atime_ns, want.st_mtime_ns))
    kept = {
        rel: st
        for rel, st in state.items()
        if rel not in remade and not any(p in remade for p in _ancestors(rel))
    }
    kept.update(new)
    for rel, _ in fixed:
        kept[rel] = _rec(os.lstat(root / rel), root / rel)
    return kept


def _ancestors(rel: str) -> Iterator[str]:
    while "/" in rel:
        rel = rel.rsplit("/", 1)[0]
        yield rel


def _same(a: Rec, b: Rec) -> bool:
    if (a.st_mode, a.st_uid, a.st_gid) != (b.st_mode, b.st_uid, b.st_gid):
        return False
    if stat.S_ISDIR(a.st_mode):
        return True
    if stat.S_ISLNK(a.st_mode):
        return a.link == b.link
    # A file removed and made again is a new inode: a change, as overlayfs sees it.
    return (a.st_ino, a.st_size, a.st_mtime_ns, a.st_rdev) == (
        b.st_ino,
        b.st_size,
        b.st_mtime_ns,
        b.st_rdev,
    )


def _made_again(st: Rec, old: Rec, old_names: set[str], path: str) -> bool:
    """Whether a directory was removed and made again: a new inode, or (the file system
    may hand the freed inode number straight back) none of its old entries left. Either
    way an opaque directory with the new entries is the same tree as whiteouts for each.
    An unchanged ctime means no entry was added or removed."""
    if st.st_ino != old.st_ino:
        return True
    if st.st_ctime_ns == old.st_ctime_ns:
        return False
    return bool(old_names) and not old_names & set(os.listdir(path))


def diff(root: Path, before: State, upper: Path, drift: set[str] | None = None) -> State:
    """Write what changed in ``root`` since ``before`` into ``upper`` (overlay format);
    return what each path looks like now. Directories whose mtime alone changed (which
    the layer does not record) are added to ``drift``.

    A directory removed and made again becomes an opaque directory holding all of its
    new contents, as overlayfs records it, so both snapshotters give the same layer for
    the same step (see :func:`_made_again`).
    """
    from dockbuild.userns import in_user_namespace

    rootless = in_user_namespace()
    after: State = {}
    remade: list[str] = []  # directories made again: everything below them is new
    children: dict[str, set[str]] | None = None  # of ``before``: made when first needed
    base = str(root)
    pending = [""]
    while pending:
        rel_dir = pending.pop()
        fresh = bool(rel_dir) and any(rel_dir == r or rel_dir.startswith(r + "/") for r in remade)
        with os.scandir(os.path.join(base, rel_dir) if rel_dir else base) as it:
            entries = sorted(it, key=lambda e: e.name)
        subdirs = []
        for entry in entries:
            rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
            st = _rec(entry.stat(follow_symlinks=False), entry.path)
            after[rel] = st
            is_dir = stat.S_ISDIR(st.st_mode)
            if is_dir:
                subdirs.append(rel)
            old = None if fresh else before.get(rel)
            if old is not None:
                if is_dir and stat.S_ISDIR(old.st_mode):
                    if st.st_ino == old.st_ino and st.st_ctime_ns == old.st_ctime_ns:
                        old_names: set[str] = set()
                    else:
                        if children is None:
                            children = _children(before)
                        old_names = children.get(rel, set())
                    if _made_again(st, old, old_names, entry.path):
                        remade.append(rel)
                        _copy_up(root, rel, upper)
                        mark_opaque(upper / rel, rootless)
                        continue
                if _same(st, old):
                    if drift is not None and st.st_mtime_ns != old.st_mtime_ns:
                        drift.add(rel)
                    continue
            _copy_up(root, rel, upper)
        pending.extend(reversed(subdirs))
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


def _children(state: State) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for rel in state:
        parent, _, name = rel.rpartition("/")
        out.setdefault(parent, set()).add(name)
    return out


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
        copy_owner_record(src, dst)
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
