"""File ops (COPY, ADD of local files, WORKDIR's mkdir, inline files) run in-process.

Each op writes into an empty ``upper`` directory that becomes the step's layer, on top of
the base chain, in overlay format: a parent directory that already exists below is
created in ``upper`` with the same owner, mode and mtime (as an overlay copy-up would),
a removed path becomes a 0:0 character device. Sources are read through a
:class:`SourceView`: a local context in place, or the merged view of a layer chain.
"""

from __future__ import annotations

import concurrent.futures
import errno
import os
import posixpath
import shutil
import stat
from collections.abc import Callable, Sequence
from pathlib import Path

from dockbuild import llb
from dockbuild.engine import archive, snapshots
from dockbuild.engine.sources.local import (
    LocalDir,
    glob_paths,
    has_glob,
    ignore_rules,
    is_ignored,
    match_path,
)
from dockbuild.errors import DockbuildError


class SourceView:
    """Read access to a filesystem tree by relative path ("" is the root)."""

    reset_owner = False  # a local context's files are owned by root in the image

    def host(self, rel: str) -> Path | None:
        """The host path holding the entry visible at ``rel``, or None."""
        raise NotImplementedError

    def children(self, rel: str) -> list[str]:
        raise NotImplementedError

    def lstat(self, rel: str) -> os.stat_result | None:
        p = self.host(rel)
        return os.lstat(p) if p is not None else None

    def resolve(self, rel: str) -> str:
        """Follow symlinks in ``rel`` (all components) without leaving the tree."""

        def link_target(parts: Sequence[str]) -> str | None:
            cand = "/".join(parts)
            st = self.lstat(cand)
            if st is None or not stat.S_ISLNK(st.st_mode):
                return None
            host = self.host(cand)
            return None if host is None else os.readlink(host)

        return snapshots.resolve_links(rel, link_target)

    def glob(self, pattern: str) -> list[str]:
        return glob_paths(
            pattern, lambda rel: sorted(self.children(rel)), lambda rel: self.lstat(rel) is not None
        )

    def scan(self, rel: str) -> list[tuple[str, str, os.stat_result]]:
        """The entries of the directory ``rel``, sorted: (name, host path, lstat)."""
        out = []
        for name in self.children(rel):
            host = self.host(f"{rel}/{name}" if rel else name)
            if host is not None:
                out.append((name, str(host), os.lstat(host)))
        return out


class LocalView(SourceView):
    reset_owner = True

    def __init__(self, local: LocalDir) -> None:
        self.local = local

    def host(self, rel: str) -> Path | None:
        p = self.local.host_path(rel)
        if not os.path.lexists(p):
            return None
        if rel and self.local.ignored(rel) and not self.local.reincludes(rel):
            return None
        return p

    def children(self, rel: str) -> list[str]:
        try:
            names = os.listdir(self.local.host_path(rel))
        except (NotADirectoryError, FileNotFoundError):
            return []
        out = []
        for name in sorted(names):
            child = f"{rel}/{name}" if rel else name
            if not self.local.ignored(child) or self.local.reincludes(child):
                out.append(name)
        return out

    def glob(self, pattern: str) -> list[str]:
        return self.local.glob(pattern)

    def scan(self, rel: str) -> list[tuple[str, str, os.stat_result]]:
        # One lstat per entry, from the directory listing: the hot loop of COPY . /app.
        local = self.local
        try:
            with os.scandir(local.host_path(rel)) as it:
                entries = sorted(it, key=lambda e: e.name)
        except (NotADirectoryError, FileNotFoundError):
            return []
        out = []
        for e in entries:
            if local.excludes:
                child = f"{rel}/{e.name}" if rel else e.name
                if local.ignored(child) and not local.reincludes(child):
                    continue
            out.append((e.name, e.path, e.stat(follow_symlinks=False)))
        return out


class LayersView(SourceView):
    """The merged view of a layer chain (bottom first)."""

    def __init__(self, layers: Sequence[Path]) -> None:
        self.layers = tuple(layers)

    def host(self, rel: str) -> Path | None:
        return snapshots.lookup(self.layers, rel)

    def children(self, rel: str) -> list[str]:
        return snapshots.list_dir(self.layers, rel)


def apply(
    actions: tuple[llb.FileAction, ...],
    base: Sequence[Path],
    upper: Path,
    sources: list[SourceView],
    reuse: Sequence[Path] = (),
) -> None:
    """Run ``actions`` in order; ``sources`` holds one view per Copy action.

    ``reuse``: layers an earlier run of the same step made. A file copied from a local
    context that such a layer already holds, with the same content (by the digests the
    context's tables recorded), owner, mode and mtime, is hardlinked from it instead of
    copied: layers are never written once made, so they can share the inode.
    """
    target = _Target(base, upper)
    views = iter(sources)
    for action in actions:
        if isinstance(action, llb.Copy):
            _copy(action, next(views), target, tuple(reuse))
        elif isinstance(action, llb.Mkdir):
            _mkdir(action, target)
        elif isinstance(action, llb.Mkfile):
            _mkfile(action, target)
        elif isinstance(action, llb.Rm):
            _rm(action, target)
    target.finish()


class _Target:
    """The destination: ``upper`` over ``base``, written only through ``upper``."""

    def __init__(self, base: Sequence[Path], upper: Path) -> None:
        self.base = tuple(base)
        self.upper = upper
        self.view = LayersView((*self.base, upper))
        self._dir_mtimes: dict[str, int] = {}

    def resolve_parent(self, dest: str) -> str:
        """``dest`` with symlinks in its parent directories followed (not the last part)."""
        parent, name = posixpath.split(dest.strip("/"))
        parent = self.view.resolve(parent) if parent else ""
        return f"{parent}/{name}" if parent else name

    def ensure_dir(self, rel: str, owner: tuple[int, int] | None = None, mode: int = 0o755) -> None:
        """Make ``rel`` a directory in ``upper``, copying up metadata from below; a
        directory missing below is made with ``mode`` and ``owner``."""
        if not rel:
            return
        parts = rel.split("/")
        for i in range(1, len(parts) + 1):
            sub = "/".join(parts[:i])
            up = self.upper / sub
            st_up = _lstat(up)
            if st_up is not None and stat.S_ISDIR(st_up.st_mode):
                continue
            if st_up is not None:
                up.unlink()
            below = LayersView(self.base).host(sub)
            if below is not None and stat.S_ISDIR((st := os.lstat(below)).st_mode):
                os.mkdir(up)
                os.chmod(up, stat.S_IMODE(st.st_mode))
                _chown(up, *archive.layer_owner(below, st))
                self._dir_mtimes.setdefault(sub, st.st_mtime_ns)
            else:
                os.mkdir(up)
                os.chmod(up, mode)
                if owner is not None:
                    _chown(up, *owner)

    def clear(self, rel: str) -> None:
        """Remove whatever ``upper`` holds at ``rel`` (not what lies below it)."""
        p = self.upper / rel
        st = _lstat(p)
        if st is None:
            return
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(p)
        else:
            p.unlink()

    def keep_mtime(self, rel: str, mtime_ns: int) -> None:
        self._dir_mtimes[rel] = mtime_ns

    def finish(self) -> None:
        # Directory mtimes last, deepest first: writing children changes them.
        for rel in sorted(self._dir_mtimes, key=lambda r: r.count("/"), reverse=True):
            p = self.upper / rel
            if _lstat(p) is not None:
                ns = self._dir_mtimes[rel]
                os.utime(p, ns=(ns, ns), follow_symlinks=False)

    def exists_as_dir(self, rel: str) -> bool:
        host = self.view.host(self.view.resolve(rel)) if rel else self.upper
        return host is not None and os.path.isdir(host)


def _lstat(p: str | Path) -> os.stat_result | None:
    try:
        return os.lstat(p)
    except FileNotFoundError:
        return None


# -- owners and modes ------------------------------------------------------------------


def _chown(target: str | Path | int, uid: int, gid: int) -> None:
    """Set a new file's owner (a descriptor, or a path whose symlink is not followed),
    recording one the user namespace cannot map (``archive.set_owner``)."""
    if not archive.set_owner(target, uid, gid):
        raise DockbuildError(
            f"cannot give a symlink the owner {uid}:{gid}: this rootless build maps a "
            "single id (root), and a symlink has nowhere to record another owner",
            hint="give the user a subordinate id range (usermod --add-subuids 100000-165535 "
            "--add-subgids 100000-165535 USER, with the uidmap package installed), or run as root",
        )


def _resolve_chown(chown: llb.Chown | None, target: _Target) -> tuple[int, int] | None:
    if chown is None:
        return None

    def table(path: str) -> list[list[str]]:
        host = target.view.host(target.view.resolve(path))
        if host is None or not host.is_file():
            return []
        return [line.split(":") for line in host.read_text(errors="replace").splitlines()]

    # As BuildKit's readUser: a name missing from the destination's /etc/passwd or
    # /etc/group (or a missing file) resolves to 0, without an error.
    # "root" is id 0 without a lookup, as BuildKit's llb parses ids (so it works with
    # --link, on scratch).
    uid, gid = 0, 0
    if chown.user.isdigit() or chown.user == "root":
        uid = gid = 0 if chown.user == "root" else int(chown.user)
    else:
        for fields in table("etc/passwd"):
            if len(fields) > 3 and fields[0] == chown.user:
                uid, gid = _int(fields[2]), _int(fields[3])
                break
    if chown.group:
        if chown.group.isdigit() or chown.group == "root":
            gid = 0 if chown.group == "root" else int(chown.group)
        else:
            for fields in table("etc/group"):
                if len(fields) > 2 and fields[0] == chown.group:
                    gid = _int(fields[2])
                    break
    return uid, gid


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise DockbuildError(f"invalid id {text!r} in the destination's /etc/passwd or /etc/group") from None


def _apply_mode(spec: str, current: int, is_dir: bool) -> int:
    """``--chmod``: octal, or symbolic like chmod(1) (``u+x``, ``g=u``), except that, as
    in BuildKit's parser (dchapes-mode), ``X`` counts only after ``+`` (``go=rX`` is
    ``go=r``)."""
    if not spec:
        return current
    if all(c in "01234567" for c in spec):
        return int(spec, 8)
    mode = current
    for clause in spec.split(","):
        i = 0
        who = ""
        while i < len(clause) and clause[i] in "ugoa":
            who += clause[i]
            i += 1
        who = who or "a"
        if "a" in who:
            who = "ugo"
        while i < len(clause):
            op = clause[i]
            if op not in "+-=":
                raise DockbuildError(f"invalid chmod {spec!r}")
            i += 1
            perms = ""
            while i < len(clause) and clause[i] not in "+-=":
                perms += clause[i]
                i += 1
            bits = 0
            for w in who:
                shift = {"u": 6, "g": 3, "o": 0}[w]
                for p in perms:
                    if p in "ugo":
                        src = {"u": 6, "g": 3, "o": 0}[p]
                        bits |= ((current >> src) & 7) << shift
                    elif p == "r":
                        bits |= 4 << shift
                    elif p == "w":
                        bits |= 2 << shift
                    elif p == "x" or (p == "X" and op == "+" and (is_dir or current & 0o111)):
                        bits |= 1 << shift
                    elif p == "s" and w in "ug":
                        bits |= 0o4000 if w == "u" else 0o2000
                    elif p == "t":
                        bits |= 0o1000
                    elif p not in "X":
                        raise DockbuildError(f"invalid chmod {spec!r}")
            if op == "+":
                mode |= bits
            elif op == "-":
                mode &= ~bits
            else:
                mask = 0
                for w in who:
                    mask |= 7 << {"u": 6, "g": 3, "o": 0}[w]
                mode = (mode & ~mask) | bits
    return mode


# -- actions ---------------------------------------------------------------------------


def _copy(action: llb.Copy, view: SourceView, target: _Target, reuse: tuple[Path, ...] = ()) -> None:
    src = action.src.strip("/")
    if src == ".":
        src = ""
    owner = _resolve_chown(action.chown, target)
    copier = _Copier(view, target, owner, action.mode, action.timestamp, action.exclude)
    if isinstance(view, LocalView):
        copier.reuse = reuse
    try:
        _copy_with(action, src, view, target, copier)
    except BaseException:
        copier.abort()
        raise
    copier.finish()


_ROOT_DIR = os.stat_result((stat.S_IFDIR | 0o755, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0.0, 0.0, 0.0, 0, 0, 0))


def _copy_with(action: llb.Copy, src: str, view: SourceView, target: _Target, copier: _Copier) -> None:
    owner = copier.owner
    dest = action.dest
    dest_rel = target.resolve_parent(dest) if dest.strip("/") else ""
    if action.parents:
        _copy_parents(action, src, dest_rel, copier)
        return
    wildcard = action.allow_wildcard and has_glob(src)
    if wildcard:
        matches = view.glob(src)
        if not matches and not action.allow_empty_wildcard:
            raise DockbuildError(f"failed to compute cache key: no source files were specified: {action.src!r} matched nothing")
    else:
        rel = view.resolve(src) if action.follow_symlinks else src
        if src and view.lstat(rel) is None:
            raise DockbuildError(f'failed to compute cache key: "/{src}": not found')
        matches = [src]
    # A wildcard does not make the destination a directory: as fsutil's copy, only a
    # trailing "/" or an existing directory does (`COPY f*.go foo2.go` writes a file).
    dest_is_dir = dest.endswith("/")
    for name in matches:
        # A followed link is copied under its own name (fsutil prepareTargetDir joins
        # the destination with the source path's base, not the link target's).
        rel = view.resolve(name) if action.follow_symlinks and name else name
        st = view.lstat(rel) if rel else _ROOT_DIR  # an empty tree still has its root
        assert st is not None
        # --exclude patterns apply below each source, never to a wildcard's match itself:
        # fsutil's copy.Copy copies each match with no path components to match yet
        # (BuildKit's reference says otherwise; moby/buildkit#5489).
        if action.attempt_unpack and stat.S_ISREG(st.st_mode):
            host = view.host(rel)
            if host is not None and is_archive(host):
                _unpack(host, target.view.resolve(dest_rel) if dest_rel else "", copier)
                continue
        if stat.S_ISDIR(st.st_mode) and action.dir_copy_contents:
            copier.root = rel
            copier.into_dir(rel, st, dest_rel)
            continue
        copier.root = posixpath.dirname(rel)
        if dest_is_dir or target.exists_as_dir(dest_rel):
            out = posixpath.join(target.view.resolve(dest_rel), posixpath.basename(name) or "")
        else:
            out = dest_rel
        target.ensure_dir(posixpath.dirname(out), owner, copier.dir_mode)
        copier.entry(rel, out, top=True)


def _copy_parents(action: llb.Copy, base: str, dest_rel: str, copier: _Copier) -> None:
    """``COPY --parents``: each match keeps its path below ``base`` (the ``/./`` pivot).
    A wildcard in ``base`` is resolved first, as BuildKit's copy resolves its source:
    the patterns then apply below each matching directory."""
    view, target = copier.view, copier.target
    out_root = target.view.resolve(dest_rel) if dest_rel else ""
    target.ensure_dir(out_root, copier.owner, copier.dir_mode)
    # "./x" and "x" are one base: matches are cut below it by length.
    base = posixpath.normpath(base).lstrip("/") if base else ""
    base = "" if base == "." else base
    if has_glob(base):
        for match in view.glob(base):
            st = view.lstat(view.resolve(match))
            if st is not None and stat.S_ISDIR(st.st_mode):
                _copy_below(action, view.resolve(match), out_root, copier, required=False)
        return
    _copy_below(action, base, out_root, copier, required=True)


def _copy_below(action: llb.Copy, base: str, out_root: str, copier: _Copier, required: bool) -> None:
    view, target = copier.view, copier.target
    copier.root = base
    for pattern in action.include:
        full = posixpath.join(base, pattern) if base else pattern
        full = full.strip("/")
        if "**" in pattern:
            matches = _walk_match(view, base, pattern)
        elif has_glob(pattern):
            matches = view.glob(full)
        elif view.lstat(full) is not None:
            matches = [full]
        elif not required:
            matches = []
        else:
            raise DockbuildError(f'failed to compute cache key: "/{full}": not found')
        for rel in matches:
            below = rel[len(base) + 1 :] if base else rel
            if copier.excluded(below):
                continue
            # The parents between the pivot and the match are copied with their metadata.
            parts = below.split("/")
            for i in range(1, len(parts)):
                sub = "/".join(parts[:i])
                out_dir = posixpath.join(out_root, sub) if out_root else sub
                if not target.exists_as_dir(out_dir):
                    target.ensure_dir(out_dir, copier.owner)
                    copier.dir_metadata(posixpath.join(base, sub) if base else sub, out_dir)
            copier.entry(rel, posixpath.join(out_root, below) if out_root else below, top=True)


def _walk_match(view: SourceView, base: str, pattern: str) -> list[str]:
    """Paths below ``base`` whose path relative to it matches ``pattern`` (with ``**``);
    a matching directory is taken whole."""
    found: list[str] = []

    def visit(rel: str) -> None:
        for name in view.children(rel):
            child = f"{rel}/{name}" if rel else name
            below = child[len(base) + 1 :] if base else child
            if match_path(pattern, below):
                found.append(child)
                continue
            st = view.lstat(child)
            if st is not None and stat.S_ISDIR(st.st_mode):
                visit(child)

    visit(base)
    return found


def is_archive(path: Path) -> bool:
    """Whether ``path`` is a tar archive, plain or compressed (gzip, bzip2, xz), by content."""
    import tarfile

    try:
        with tarfile.open(path, "r:*") as tf:
            return tf.next() is not None
    except (tarfile.TarError, OSError, EOFError, ValueError):
        return False


def _safe_member_path(name: str) -> str:
    # Like BuildKit's fs.RootPath: ".." never climbs above the extraction root.
    return posixpath.normpath("/" + name).lstrip("/")


def _unpack(archive: Path, dest_rel: str, copier: _Copier) -> None:
    """Extract a local tar into ``dest_rel`` (ADD): archive owners, modes and mtimes kept,
    ``--chown`` applied when given; every write stays inside the layer."""
    import tarfile

    target = copier.target
    target.ensure_dir(dest_rel, copier.owner)
    with tarfile.open(archive, "r:*") as tf:
        for member in tf:
            name = _safe_member_path(member.name)
            if not name:
                continue
            full = posixpath.join(dest_rel, name) if dest_rel else name
            rel = target.resolve_parent(full)
            target.ensure_dir(posixpath.dirname(rel), copier.owner)
            uid, gid = copier.owner or (member.uid, member.gid)
            mode = _apply_mode(copier.mode, member.mode & 0o7777, member.isdir())
            mtime = (copier.timestamp if copier.timestamp is not None else int(member.mtime)) * 10**9
            out = target.upper / rel if rel else target.upper
            if member.isdir():
                if not rel:
                    continue
                existing = _lstat(out)
                if existing is None or not stat.S_ISDIR(existing.st_mode):
                    target.clear(rel)
                    if target.exists_as_dir(rel):
                        target.ensure_dir(rel)
                    else:
                        os.mkdir(out)
                os.chmod(out, mode)
                _chown(out, uid, gid)
                target.keep_mtime(rel, mtime)
                continue
            target.clear(rel)
            if member.islnk():
                link_rel = target.resolve_parent(
                    posixpath.join(dest_rel, _safe_member_path(member.linkname))
                )
                if _lstat(target.upper / link_rel) is not None:
                    os.link(target.upper / link_rel, out)
                    continue
                found = target.view.host(link_rel)
                if found is None:
                    raise DockbuildError(f"ADD {archive.name}: hardlink {member.name} points to a missing {member.linkname}")
                shutil.copy2(found, out, follow_symlinks=False)
            elif member.issym():
                os.symlink(member.linkname, out)
            elif member.isreg():
                src = tf.extractfile(member)
                assert src is not None
                with open(out, "wb") as f:
                    shutil.copyfileobj(src, f, 1 << 20)
                _chown(out, uid, gid)  # before the mode: chown clears setuid bits
                os.chmod(out, mode)
            elif member.isfifo():
                os.mkfifo(out, mode)
            elif member.ischr() or member.isblk():
                kind = stat.S_IFCHR if member.ischr() else stat.S_IFBLK
                os.mknod(out, kind | mode, os.makedev(member.devmajor, member.devminor))
            else:
                continue
            _chown(out, uid, gid)
            os.utime(out, ns=(mtime, mtime), follow_symlinks=False)


class _Copier:
    def __init__(
        self,
        view: SourceView,
        target: _Target,
        owner: tuple[int, int] | None,
        mode: str,
        timestamp: int | None,
        exclude: tuple[str, ...],
    ) -> None:
        self.view = view
        self.target = target
        self.owner = owner
        self.mode = mode
        # As fsutil's MkdirAll: the directories a copy creates above what it copies take
        # an octal --chmod (its permission bits); a symbolic one leaves them 0755.
        self.dir_mode = int(mode, 8) & 0o777 if mode and all(c in "01234567" for c in mode) else 0o755
        self.timestamp = timestamp
        self.rules = ignore_rules(exclude)
        self.links: dict[tuple[int, int], str] = {}
        self.reuse: tuple[Path, ...] = ()  # see apply(); only for a LocalView
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._pending: list[concurrent.futures.Future[object]] = []
        self._pending_outs: set[str] = set()

    def _submit(self, out: str, fn: Callable[..., object], *args: object) -> None:
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=4)
        self._pending.append(self._pool.submit(fn, *args))
        self._pending_outs.add(out)
        if len(self._pending) > 256:  # bound memory; surface errors early
            self._drain(64)

    def _drain(self, keep: int = 0) -> None:
        while len(self._pending) > keep:
            self._pending.pop(0).result()
        if not self._pending:
            self._pending_outs.clear()

    def finish(self) -> None:
        """Wait for every file being copied; the first error is raised."""
        try:
            self._drain()
        finally:
            self.abort()

    def abort(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._pending.clear()
        self.root = ""  # --exclude patterns match paths relative to this source path

    def excluded(self, rel: str) -> bool:
        return bool(self.rules) and is_ignored(self.rules, rel)

    def dir_metadata(self, src: str, out: str) -> None:
        """Give the directory ``out`` the mode, owner and mtime of the source dir ``src``."""
        host = self.view.host(self.view.resolve(src))
        if host is None:
            return
        st = os.lstat(host)
        if not stat.S_ISDIR(st.st_mode):
            return
        dest = self.target.upper / out
        uid, gid = self.owner or self._source_owner(host, st)
        os.chmod(dest, stat.S_IMODE(st.st_mode))
        _chown(dest, uid, gid)
        mtime = self.timestamp * 10**9 if self.timestamp is not None else st.st_mtime_ns
        self.target.keep_mtime(out, mtime)

    def _source_owner(self, host: str | Path, st: os.stat_result) -> tuple[int, int]:
        """The owner a copy keeps without --chown: root for a local context's file, else
        the owner the file has in its layer, also one only recorded there (see archive.set_owner)."""
        return (0, 0) if self.view.reset_owner else archive.layer_owner(host, st)

    def into_dir(self, src: str, st: os.stat_result, dest_rel: str) -> None:
        """The contents of the directory ``src`` into the directory ``dest_rel``. As
        fsutil's prepareTargetDir: a missing destination is made 0755 (or the octal
        --chmod), owned by root or the --chown owner, not with the source directory's
        metadata; an existing one keeps its owner and mode. Either way it takes the
        source directory's mtime."""
        target = self.target
        if not dest_rel:
            self.children(src, "")
            return
        out = target.view.resolve(dest_rel)
        fresh = False
        if not target.exists_as_dir(out):
            target.ensure_dir(posixpath.dirname(out), self.owner, self.dir_mode)
            target.clear(out)  # a file or dangling link there is replaced
            target.ensure_dir(out, self.owner or (0, 0), self.dir_mode)
            fresh = True
        else:
            target.ensure_dir(out)  # copied up with its own metadata
        self.children(src, out, fresh)
        mtime = self.timestamp * 10**9 if self.timestamp is not None else st.st_mtime_ns
        target.keep_mtime(out, mtime)

    def children(self, src: str, out: str, fresh: bool = False) -> None:
        """Copy the entries of ``src`` into ``out`` (``fresh``: a directory this copy just
        created, which holds nothing yet to replace)."""
        for name, host, st in self.view.scan(src):
            s = f"{src}/{name}" if src else name
            if self.rules:
                below = s[len(self.root) + 1 :] if self.root else s
                if self.excluded(below):
                    continue
            self.entry(s, f"{out}/{name}" if out else name, host=host, st=st, fresh=fresh)

    def entry(
        self,
        src: str,
        out: str,
        top: bool = False,
        host: str | Path | None = None,
        st: os.stat_result | None = None,
        fresh: bool = False,
    ) -> None:
        if host is None:
            host = self.view.host(src)
            assert host is not None
        if st is None:
            st = os.lstat(host)
        dest = os.path.join(self.target.upper, out)
        uid, gid = self.owner or self._source_owner(host, st)
        mode = _apply_mode(self.mode, stat.S_IMODE(st.st_mode), stat.S_ISDIR(st.st_mode))
        mtime = self.timestamp * 10**9 if self.timestamp is not None else st.st_mtime_ns
        if stat.S_ISDIR(st.st_mode):
            existing = None if fresh else _lstat(dest)
            if existing is not None and not stat.S_ISDIR(existing.st_mode):
                os.unlink(dest)
                existing = None
            created = False
            if existing is None:
                if not fresh and self.target.exists_as_dir(out):
                    self.target.ensure_dir(out)  # merge into the directory below
                else:
                    os.mkdir(dest)
                    created = True
            os.chmod(dest, mode)
            _chown(dest, uid, gid)
            self.children(src, out, created)
            self.target.keep_mtime(out, mtime)
            return
        if out in self._pending_outs:
            self._drain()  # two sources for one destination: the later one wins
        if not fresh:
            self.target.clear(out)
        link_key = (st.st_dev, st.st_ino)
        if st.st_nlink > 1 and link_key in self.links:
            first = self.links[link_key]
            if first in self._pending_outs:
                self._drain()  # the file to link to is still being written
            os.link(os.path.join(self.target.upper, first), dest)
            return
        if stat.S_ISLNK(st.st_mode):
            os.symlink(os.readlink(host), dest)
        elif stat.S_ISREG(st.st_mode):
            # Contents are copied by a few threads: creating many small files is bound
            # by system calls, which run without the GIL.
            if isinstance(self.view, LocalView) and st.st_nlink == 1:
                self._submit(out, self._copy_local, str(host), st, out, dest, mode, uid, gid, mtime)
            else:
                self._submit(out, _copy_regular, host, dest, mode, uid, gid, mtime, st.st_size)
            if st.st_nlink > 1:  # another path of this copy may name the same file
                self.links[link_key] = out
            return
        elif stat.S_ISFIFO(st.st_mode):
            os.mkfifo(dest, mode)
        elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
            if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                return  # a whiteout in a source layer is not a file to copy
            os.mknod(dest, st.st_mode, st.st_rdev)
        elif stat.S_ISSOCK(st.st_mode):
            # As fsutil's copyDevice (mknod without S_IFSOCK) and its context transfer
            # (the socket bit cleared): a socket becomes an empty regular file.
            os.close(os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            os.chmod(dest, mode)
        else:
            return
        _chown(dest, uid, gid)
        os.utime(dest, ns=(mtime, mtime), follow_symlinks=False)
        if st.st_nlink > 1:
            self.links[link_key] = out

    def _copy_local(
        self, host: str, st: os.stat_result, out: str, dest: str, mode: int, uid: int, gid: int, mtime: int
    ) -> None:
        """One regular file from a local context: linked from a reusable layer when one
        holds it already, else copied; either way remembered for the next copy."""
        assert isinstance(self.view, LocalView)  # only a local context's files come here
        local = self.view.local
        digest = local.known_digest(host, st)
        if digest is not None:
            for layer in self.reuse:
                try:
                    cst = os.lstat(os.path.join(layer, out))
                except OSError:
                    continue
                if (
                    stat.S_ISREG(cst.st_mode)
                    and cst.st_size == st.st_size
                    and cst.st_mtime_ns == mtime
                    and stat.S_IMODE(cst.st_mode) == mode
                    and archive.layer_owner(os.path.join(layer, out), cst) == (uid, gid)
                    and local.copied_digest(cst) == digest
                ):
                    try:
                        os.link(os.path.join(layer, out), dest)
                    except OSError:
                        break  # too many links, another file system: copy it
                    local.remember_copy(os.lstat(dest), digest)  # the link moved its ctime
                    return
        written = _copy_regular(host, dest, mode, uid, gid, mtime, st.st_size, st)
        if digest is not None and written is not None:
            local.remember_copy(written, digest)


def _copy_regular(
    src: str | Path,
    dest: str | Path,
    mode: int,
    uid: int,
    gid: int,
    mtime: int,
    size: int,
    expect: os.stat_result | None = None,
) -> os.stat_result | None:
    """Copy one file's contents and metadata (owner before mode: chown clears setuid).

    Return the new file's stat data if the source still has the stat data ``expect``
    once copied (so what was written is what ``expect`` describes), else None."""
    fin = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            if size:
                _copy_data(fin, fd, size)
            _chown(fd, uid, gid)
            os.fchmod(fd, mode)
            os.utime(fd, ns=(mtime, mtime))
            if expect is None:
                return None
            now = os.fstat(fin)
            if (now.st_ino, now.st_size, now.st_mtime_ns, now.st_ctime_ns) != (
                expect.st_ino, expect.st_size, expect.st_mtime_ns, expect.st_ctime_ns
            ):
                return None
            return os.fstat(fd)
        finally:
            os.close(fd)
    finally:
        os.close(fin)


def _copy_data(fin: int, fout: int, size: int) -> None:
    """The bytes of ``fin`` into ``fout``, copied by the kernel (copy_file_range: a
    reflink where the filesystem can, else no round trip through Python)."""
    copied = 0
    try:
        # The size lstat saw: one call for a small file, not a second one to meet the end.
        while copied < size and (n := os.copy_file_range(fin, fout, size - copied)):
            copied += n
        if copied:
            return
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM):
            raise
    # Another filesystem on an older kernel, or one whose files cannot be copied this way
    # (they read as empty): read and write.
    os.lseek(fin, 0, os.SEEK_SET)
    os.lseek(fout, 0, os.SEEK_SET)
    os.ftruncate(fout, 0)
    while chunk := os.read(fin, 1 << 20):
        view = memoryview(chunk)
        while view:
            view = view[os.write(fout, view):]


def _mkdir(action: llb.Mkdir, target: _Target) -> None:
    owner = _resolve_chown(action.chown, target)
    rel = target.resolve_parent(action.path)
    if not rel:
        return
    if target.exists_as_dir(rel):
        return
    parent = posixpath.dirname(rel)
    if parent and not action.make_parents and not target.exists_as_dir(parent):
        raise DockbuildError(f"mkdir {action.path}: no such file or directory")
    parts = parent.split("/") if parent else []
    ancestors = ("/".join(parts[: i + 1]) for i in range(len(parts)))
    created = [d for d in ancestors if not target.exists_as_dir(d)]
    target.ensure_dir(parent, owner)
    if action.timestamp is not None:
        for made in created:  # as fsutil's MkdirAll: every directory it makes gets the time
            target.keep_mtime(made, action.timestamp * 10**9)
    target.clear(rel)
    p = target.upper / rel
    os.mkdir(p)
    os.chmod(p, action.mode)
    if owner is not None:
        _chown(p, *owner)
    if action.timestamp is not None:
        target.keep_mtime(rel, action.timestamp * 10**9)


def _mkfile(action: llb.Mkfile, target: _Target) -> None:
    owner = _resolve_chown(action.chown, target)
    rel = target.resolve_parent(action.path)
    target.ensure_dir(posixpath.dirname(rel), owner)
    target.clear(rel)
    p = target.upper / rel
    with open(p, "wb") as f:
        f.write(action.data)
    os.chmod(p, action.mode)
    if owner is not None:
        _chown(p, *owner)
    if action.timestamp is not None:
        os.utime(p, ns=(action.timestamp * 10**9,) * 2)


def _rm(action: llb.Rm, target: _Target) -> None:
    rels = target.view.glob(action.path) if action.allow_wildcard else [action.path.strip("/")]
    for rel in rels:
        rel = target.resolve_parent(rel)
        if target.view.host(rel) is None:
            if action.allow_not_found:
                continue
            raise DockbuildError(f"rm {action.path}: no such file or directory")
        target.clear(rel)
        if LayersView(target.base).host(rel) is not None:
            target.ensure_dir(posixpath.dirname(rel))
            archive.make_whiteout(target.upper / rel)  # a link to the marker where mknod is refused
